"""Step 2, the signature over the DSSE PAE, one way per method: a bare key (named by its hint or
carried as rawBytes), an X.509 certificate chained to a configured root, or Sigstore keyless
(checked by sigstore-python, imported only when used)."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from runtime.errors import IntegrityError
from runtime.identity import certificate_sans, match_identity
from runtime.integrity.oms.common import RESIGN, TAMPERED, fail
from runtime.integrity.oms.envelope import PAYLOAD_TYPE, Bundle, b64, pae

if TYPE_CHECKING:  # sigstore is imported where used: it costs ~0.3 s at start-up
    from sigstore.models import TrustedRoot


def key_hint(public_key: PublicKeyTypes) -> str:
    """The bundle's publicKey.hint: hex SHA-256 of the PEM public key (model_signing's). Also
    the key fingerprint harness reports."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def ec_hash(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    by_curve = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}
    if key.curve.name not in by_curve:
        raise fail(
            f"unsupported key curve {key.curve.name}",
            fix="use an ECDSA P-256, P-384 or P-521 key",
        )
    return by_curve[key.curve.name]()


def load_public_key(pem: bytes, source: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise IntegrityError(
            f"{source}: not a PEM public key: {exc}",
            fix="pass the PEM public key that matches the signing key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IntegrityError(f"{source}: not an ECDSA key", fix="use an ECDSA P-256/384/521 key")
    ec_hash(key)
    return key


KeyMatch = Literal["hint", "raw_bytes"]
_OTHER_KEY_FIX = (
    "configure the public key that matches the signing key (model.signature.public_key); "
    "if the configured key is right, " + TAMPERED[0].lower() + TAMPERED[1:]
)


def _raw_public_key(value: Any) -> PublicKeyTypes:
    """publicKey.rawBytes: DER SubjectPublicKeyInfo by the Sigstore spec, PEM text as
    model_signing <= 1.0 wrote it."""
    raw = b64(value, "verificationMaterial.publicKey.rawBytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(raw)
        return serialization.load_der_public_key(raw)
    except ValueError:
        raise fail(
            "verificationMaterial.publicKey.rawBytes is not a PEM or DER public key"
        ) from None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_with_key(bundle: Bundle, key: ec.EllipticCurvePublicKey) -> tuple[str, KeyMatch]:
    """Step 2, key method. Returns the signer's description and how the bundle named its key:
    by `hint` (model_signing >= 1.1, harness) or by the key itself in `rawBytes` (model_signing
    <= 1.0, which wrote no hint), compared as a key, not as bytes."""
    material = bundle.material.get("publicKey")
    if not isinstance(material, dict):
        raise fail("verificationMaterial.publicKey is not an object")
    hint, raw = material.get("hint") or None, material.get("rawBytes")  # "" names no key
    expected = key_hint(key)
    if hint is None and raw is None:
        raise fail(
            "verificationMaterial.publicKey has neither a hint nor rawBytes: the bundle does "
            "not name the key that signed it",
            fix=RESIGN,
        )
    if hint is not None and hint != expected:
        raise fail(
            f"signed with another key: the bundle's key hint is {hint!r}, the configured "
            f"public key's (sha256 of its PEM) is {expected!r}",
            fix=_OTHER_KEY_FIX,
        )
    if raw is not None:
        theirs = _raw_public_key(raw)
        if _spki(theirs) != _spki(key):
            raise fail(
                f"signed with another key: the bundle's key (publicKey.rawBytes) has "
                f"fingerprint sha256:{key_hint(theirs)}, the configured public key "
                f"sha256:{expected} (SHA-256 of each PEM)",
                fix=_OTHER_KEY_FIX,
            )
    _verify_dsse(bundle, key, "the configured public key")
    return f"key:sha256:{expected}", "hint" if hint is not None else "raw_bytes"


def _verify_dsse(bundle: Bundle, key: ec.EllipticCurvePublicKey, whose: str) -> None:
    try:
        key.verify(
            bundle.signature, pae(bundle.payload_type, bundle.payload), ec.ECDSA(ec_hash(key))
        )
    except InvalidSignature:
        raise fail(
            f"the DSSE signature does not verify with {whose}: the signed statement was "
            "altered, or signed by a different key"
        ) from None


def _bundle_chain(material: dict[str, Any]) -> list[x509.Certificate]:
    entries = (material.get("x509CertificateChain") or {}).get("certificates")
    if not isinstance(entries, list) or not entries:
        raise fail("the bundle's x509CertificateChain holds no certificates", fix=RESIGN)
    chain = []
    for index, entry in enumerate(entries):
        raw = b64(
            entry.get("rawBytes") if isinstance(entry, dict) else None, f"certificate {index}"
        )
        try:
            chain.append(x509.load_der_x509_certificate(raw))
        except ValueError:
            raise fail(f"certificate {index} in the bundle is not DER X.509") from None
    return chain


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    return getattr(oid, "_name", None) or oid.dotted_string


def _check_signing_usage(leaf: x509.Certificate) -> None:
    """Stricter than model_signing: digitalSignature AND the codeSigning EKU, not a CA."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise fail(
            f"the signing certificate has no {_oid_name(exc.oid)} extension",
            fix="issue a signing certificate with KeyUsage digitalSignature and the "
            "codeSigning extended key usage",
        ) from None
    if not usage.digital_signature:
        raise fail(
            "the signing certificate's KeyUsage lacks digitalSignature",
            fix="issue a signing certificate with KeyUsage digitalSignature",
        )
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        names = ", ".join(_oid_name(oid) for oid in eku)
        raise fail(
            f"the signing certificate is not for code signing (its extended key usage: {names})",
            fix="sign with a certificate whose extended key usage includes codeSigning",
        )
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise fail(
                "the signing certificate is a CA certificate", fix="sign with a leaf certificate"
            )
    except x509.ExtensionNotFound:
        pass


def _check_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    trusted: list[x509.Certificate],
    when: datetime.datetime,
    label: str,
) -> None:
    store = crypto.X509Store()
    for cert in trusted:
        store.add_cert(crypto.X509.from_cryptography(cert))
    store.set_time(when)
    context = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in intermediates],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise fail(
            f"the signing certificate does not chain to the configured root {label} "
            f"({when:%Y-%m-%dT%H:%M:%SZ}): {exc}",
            fix="configure the CA that issued the signing certificate, or sign again with a "
            "valid certificate",
        ) from None


def verify_with_certificates(
    bundle: Bundle,
    trusted: list[x509.Certificate],
    identities: list[str] | None,
    now: datetime.datetime,
) -> tuple[str, str | None]:
    """Step 2, certificate method. Returns (signer description, matched identity)."""
    leaf, *intermediates = _bundle_chain(bundle.material)
    _check_signing_usage(leaf)
    # Without a timestamp, the leaf's notBefore stands for the signing time (as model_signing
    # does); the chain must hold then, and now (an expired or revoked-by-expiry leaf fails).
    _check_chain(leaf, intermediates, trusted, leaf.not_valid_before_utc, "at signing time")
    _check_chain(leaf, intermediates, trusted, now, "now")
    sans = certificate_sans(leaf)
    matched = None
    if identities is not None:
        matched = match_identity(sans, identities)
        if matched is None:
            shown = ", ".join(f"{kind}:{value}" for kind, value in sans) or "none"
            raise fail(
                f"signer identity not allowed: the certificate's SANs ({shown}) match none of "
                f"{', '.join(identities)}",
                fix="add the signer's identity to model.signature.identities if you trust it",
            )
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise fail(
            "the signing certificate's key is not ECDSA", fix="sign with an ECDSA P-256/384/521 key"
        )
    _verify_dsse(bundle, key, "the signing certificate's key")
    issuer = leaf.issuer.rfc4514_string()
    who = matched or ", ".join(value for _kind, value in sans) or leaf.subject.rfc4514_string()
    return f"certificate:{who} (issuer {issuer}, serial {leaf.serial_number:x})", matched


def load_sigstore_root(data: bytes, source: str) -> TrustedRoot:
    """A pinned Sigstore trust root: a TrustedRoot JSON, or a ClientTrustConfig wrapping one.
    Never the TUF-updated production root in a cache: what is trusted is this file."""
    from sigstore.models import ClientTrustConfig, TrustedRoot
    from sigstore_models.trustroot import v1 as trustroot_v1

    try:
        doc = json.loads(data)
        if str(doc.get("mediaType", "")).startswith(
            "application/vnd.dev.sigstore.clienttrustconfig"
        ):
            return ClientTrustConfig.from_json(data.decode()).trusted_root
        return TrustedRoot(trustroot_v1.TrustedRoot.from_json(data))
    except Exception as exc:  # sigstore raises several types for a bad file
        raise IntegrityError(
            f"{source}: not a Sigstore trusted root or client trust config: {exc}",
            fix="point trust_config at your Sigstore instance's trusted_root.json",
        ) from None


def verify_with_sigstore(
    raw_bundle: bytes, root: TrustedRoot, identities: list[str], issuer: str
) -> tuple[str, bytes]:
    """Step 2, Sigstore keyless: Fulcio chain and SCT, the transparency-log entry and its
    proof, the signer identity and OIDC issuer, the DSSE signature - all by sigstore-python
    against the pinned root, offline. Returns (signer description, the verified payload)."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle as SigstoreBundle
    from sigstore.verify import Verifier, policy

    try:
        bundle = SigstoreBundle.from_json(raw_bundle)
    except Exception as exc:  # malformed or not a keyless bundle
        raise fail(f"not a Sigstore keyless bundle: {exc}") from None
    allowed = policy.AnyOf([policy.Identity(identity=i, issuer=issuer) for i in identities])
    try:
        payload_type, payload = Verifier(trusted_root=root).verify_dsse(bundle, allowed)
    except SigstoreError as exc:
        raise fail(
            f"Sigstore verification failed (identities {', '.join(identities)}, issuer "
            f"{issuer}): {exc}",
            fix="check model.signature.identities and issuer against the signer's OIDC "
            "identity, and that trust_config is the root of the Sigstore instance used",
        ) from None
    if payload_type != PAYLOAD_TYPE:
        raise fail(f"payloadType {payload_type!r} is not {PAYLOAD_TYPE}")
    san = certificate_sans(bundle.signing_certificate)
    who = next((value for _kind, value in san if value in identities), identities[0])
    return f"sigstore:{who} (issuer {issuer})", payload
