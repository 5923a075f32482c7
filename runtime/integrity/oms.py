"""OpenSSF model signing (OMS v1.0) bundles. Pure: bytes and keys in, facts or an error out.

A bundle is a Sigstore bundle (v0.3 JSON) whose DSSE envelope carries an in-toto Statement v1
with predicate https://model_signing/signature/v1.0: one SHA-256 digest per file, and a subject
digest over them. Verification, in order:
  1. parse the bundle strictly (one signature, known media and payload types);
  2. check the signature over the DSSE PAE with the trusted key (method-specific: a key
     pinned by its hint, or a certificate chained to a configured root, for code signing,
     valid at signing time and now, carrying an allowed identity; or Sigstore keyless,
     checked by sigstore-python against a pinned trust root);
  3. parse the statement strictly (safe resource names, no duplicates, sha256 hex);
  4. recompute the subject digest from the resources;
then the caller compares the resources with the files it hashed (compare_manifest).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from runtime.errors import IntegrityError
from runtime.identity import certificate_sans, match_identity

if TYPE_CHECKING:  # sigstore is imported where used: it costs ~0.3 s at start-up
    from sigstore.models import TrustedRoot

BUNDLE_MEDIA_TYPES = frozenset(
    {
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
    }
)
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RESIGN = "sign the model again (harness sign, or model_signing sign) and deploy that signature"


@dataclass(frozen=True)
class Bundle:
    material: dict[str, Any]
    payload_type: str
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class Statement:
    model_name: str
    root_digest: str
    method: str
    resources: dict[str, str]  # name (or 'name:start:end' for shards) -> sha256 hex
    shard_size: int | None = None


def _fail(what: str, fix: str = _RESIGN) -> IntegrityError:
    return IntegrityError(f"signature: {what}", fix=fix)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(f"{field} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _fail(f"{field} is not valid base64") from None


def parse_bundle(data: bytes) -> Bundle:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail("the signature file is not JSON") from None
    if not isinstance(doc, dict):
        raise _fail("the signature file is not a JSON object")
    if doc.get("mediaType") not in BUNDLE_MEDIA_TYPES:
        raise _fail(f"unsupported bundle mediaType {doc.get('mediaType')!r}")
    envelope = doc.get("dsseEnvelope")
    material = doc.get("verificationMaterial")
    if not isinstance(envelope, dict) or not isinstance(material, dict):
        raise _fail("the bundle has no dsseEnvelope or verificationMaterial")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise _fail(f"payloadType {envelope.get('payloadType')!r} is not {PAYLOAD_TYPE}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise _fail("the envelope must carry exactly one signature")
    return Bundle(
        material=material,
        payload_type=PAYLOAD_TYPE,
        payload=_b64(envelope.get("payload"), "dsseEnvelope.payload"),
        signature=_b64(
            signatures[0].get("sig") if isinstance(signatures[0], dict) else None,
            "dsseEnvelope.signatures[0].sig",
        ),
    )


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The bundle's publicKey.hint: hex SHA-256 of the PEM public key (model_signing's)."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def _ec_hash(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    by_curve = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}
    if key.curve.name not in by_curve:
        raise _fail(
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
    _ec_hash(key)
    return key


def verify_with_key(bundle: Bundle, key: ec.EllipticCurvePublicKey) -> str:
    """Step 2, key method. Returns the signer's description."""
    hint = (bundle.material.get("publicKey") or {}).get("hint")
    expected = key_hint(key)
    if hint != expected:
        raise _fail(
            f"signed with another key: the bundle's key hint is {hint!r}, the configured "
            f"public key's is {expected}",
            fix="configure the public key that matches the signing key, or sign again",
        )
    _verify_dsse(bundle, key, "the configured public key")
    return f"key:sha256:{expected}"


def _verify_dsse(bundle: Bundle, key: ec.EllipticCurvePublicKey, whose: str) -> None:
    try:
        key.verify(
            bundle.signature, pae(bundle.payload_type, bundle.payload), ec.ECDSA(_ec_hash(key))
        )
    except InvalidSignature:
        raise _fail(
            f"the DSSE signature does not verify with {whose}: the signed statement was "
            "altered, or signed by a different key"
        ) from None


def _bundle_chain(material: dict[str, Any]) -> list[x509.Certificate]:
    entries = (material.get("x509CertificateChain") or {}).get("certificates")
    if not isinstance(entries, list) or not entries:
        raise _fail(
            "the bundle carries no certificate chain (signed with a bare key?)",
            fix="verify with the method the model was signed with, or sign with a certificate",
        )
    chain = []
    for index, entry in enumerate(entries):
        raw = _b64(
            entry.get("rawBytes") if isinstance(entry, dict) else None, f"certificate {index}"
        )
        try:
            chain.append(x509.load_der_x509_certificate(raw))
        except ValueError:
            raise _fail(f"certificate {index} in the bundle is not DER X.509") from None
    return chain


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    return getattr(oid, "_name", None) or oid.dotted_string


def _check_signing_usage(leaf: x509.Certificate) -> None:
    """Stricter than model_signing: digitalSignature AND the codeSigning EKU, not a CA."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise _fail(
            f"the signing certificate has no {_oid_name(exc.oid)} extension",
            fix="issue a signing certificate with KeyUsage digitalSignature and the "
            "codeSigning extended key usage",
        ) from None
    if not usage.digital_signature:
        raise _fail(
            "the signing certificate's KeyUsage lacks digitalSignature",
            fix="issue a signing certificate with KeyUsage digitalSignature",
        )
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        names = ", ".join(_oid_name(oid) for oid in eku)
        raise _fail(
            f"the signing certificate is not for code signing (its extended key usage: {names})",
            fix="sign with a certificate whose extended key usage includes codeSigning",
        )
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise _fail(
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
        raise _fail(
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
            raise _fail(
                f"signer identity not allowed: the certificate's SANs ({shown}) match none of "
                f"{', '.join(identities)}",
                fix="add the signer's identity to model.signature.identities if you trust it",
            )
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _fail(
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
        raise _fail(f"not a Sigstore keyless bundle: {exc}") from None
    allowed = policy.AnyOf([policy.Identity(identity=i, issuer=issuer) for i in identities])
    try:
        payload_type, payload = Verifier(trusted_root=root).verify_dsse(bundle, allowed)
    except SigstoreError as exc:
        raise _fail(
            f"Sigstore verification failed (identities {', '.join(identities)}, issuer "
            f"{issuer}): {exc}",
            fix="check model.signature.identities and issuer against the signer's OIDC "
            "identity, and that trust_config is the root of the Sigstore instance used",
        ) from None
    if payload_type != PAYLOAD_TYPE:
        raise _fail(f"payloadType {payload_type!r} is not {PAYLOAD_TYPE}")
    san = certificate_sans(bundle.signing_certificate)
    who = next((value for _kind, value in san if value in identities), identities[0])
    return f"sigstore:{who} (issuer {issuer})", payload


def _safe_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def parse_statement(payload: bytes) -> Statement:
    """Steps 3 and 4: a strict in-toto statement whose subject digest matches its resources."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail("the signed payload is not JSON") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise _fail("the signed payload is not an in-toto Statement v1")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise _fail(f"predicateType {doc.get('predicateType')!r} is not {PREDICATE_TYPE}")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise _fail("the statement must have exactly one subject")
    root = (subjects[0].get("digest") or {}).get("sha256")
    predicate = doc.get("predicate") or {}
    serialization_ = predicate.get("serialization") or {}
    method = serialization_.get("method")
    shard_size = None
    if method == "shards":
        shard_size = _shard_size(serialization_.get("shard_size"))
    elif method != "files":
        raise _fail(
            f"serialization method {method!r} is not supported ('files' or 'shards')",
            fix="sign with the default 'files' serialization",
        )
    algorithm = "sha256" if shard_size is None else f"sha256-sharded-{shard_size}"
    if serialization_.get("hash_type", "sha256") != "sha256":
        raise _fail(
            f"hash_type {serialization_.get('hash_type')!r} is not sha256",
            fix="sign with SHA-256 (the default)",
        )
    resources: dict[str, str] = {}
    items = predicate.get("resources")
    if not isinstance(items, list) or not items:
        raise _fail("the statement lists no files (an empty model is refused)")
    for item in items:
        if not isinstance(item, dict):
            raise _fail("a resource is not an object")
        name, digest = item.get("name"), item.get("digest")
        file_name = _shard_file(name, shard_size) if shard_size and isinstance(name, str) else name
        if not _safe_name(file_name):
            raise _fail(f"resource name {name!r} is not a plain relative path")
        if (
            item.get("algorithm") != algorithm
            or not isinstance(digest, str)
            or not _HEX64.fullmatch(digest)
        ):
            raise _fail(f"resource {name}: expected a {algorithm} hex digest")
        if name in resources:
            raise _fail(f"resource {name} is listed twice")
        resources[name] = digest
    computed = root_digest(resources)
    if root != computed:
        raise _fail(f"the subject digest {root!r} does not match its resources ({computed})")
    return Statement(
        model_name=str(subjects[0].get("name")),
        root_digest=computed,
        method=method,
        resources=resources,
        shard_size=shard_size,
    )


def _shard_size(value: Any) -> int:
    # model_signing writes it as a JSON number that may be a float (1000000.0)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != int(value)
        or not 4096 <= value <= 1 << 40
    ):
        raise _fail(f"shard_size {value!r} is not a whole number of bytes (4 KiB to 1 TiB)")
    return int(value)


def _shard_file(name: str, shard_size: int) -> str | None:
    """'dir/file:start:end' -> 'dir/file' when the range is a whole shard; None otherwise."""
    file, sep1, rest = name.rpartition(":")
    file, sep2, begin = file.rpartition(":")
    if not (sep1 and sep2 and begin.isdigit() and rest.isdigit()):
        return None
    start, end = int(begin), int(rest)
    if start % shard_size or not start <= end <= start + shard_size:
        return None
    return file


def root_digest(resources: dict[str, str]) -> str:
    """SHA-256 over the raw file digests in name order (OMS subject digest)."""
    hasher = hashlib.sha256()
    for name in sorted(resources):
        hasher.update(bytes.fromhex(resources[name]))
    return hasher.hexdigest()


def compare_manifest(signed: dict[str, str], actual: dict[str, str]) -> None:
    """Every file is signed, every signed file is there, and every digest matches."""
    for name in sorted(actual.keys() - signed.keys()):
        raise IntegrityError(
            f"model dir: {name} is not in the signed manifest (an extra or renamed file)",
            fix="remove it, or sign the model again if it belongs there",
        )
    for name in sorted(signed.keys() - actual.keys()):
        raise IntegrityError(
            f"model dir: {name} is in the signed manifest but missing",
            fix="restore the file, or deploy the model that was signed",
        )
    for name in sorted(signed):
        if signed[name] != actual[name]:
            raise IntegrityError(
                f"model dir: {name}: SHA-256 mismatch: signed {signed[name]}, "
                f"actual {actual[name]}",
                fix="the file differs from what was signed: redeploy the signed model",
            )


def statement_for(
    model_name: str,
    digests: dict[str, str],
    ignore_paths: list[str],
    shard_size: int | None = None,
) -> bytes:
    """The statement `harness sign` signs, shaped as model_signing 1.x writes it."""
    algorithm = "sha256" if shard_size is None else f"sha256-sharded-{shard_size}"
    serialization_: dict[str, Any] = {
        "ignore_paths": ignore_paths,
        "hash_type": "sha256",
        "method": "files" if shard_size is None else "shards",
        "allow_symlinks": False,
    }
    if shard_size is not None:
        serialization_["shard_size"] = shard_size
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(digests)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": serialization_,
            "resources": [
                {"name": name, "digest": digests[name], "algorithm": algorithm}
                for name in sorted(digests)
            ],
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign_with_key(
    statement: bytes,
    private_key: ec.EllipticCurvePrivateKey,
    certificates: list[x509.Certificate] | None = None,
) -> bytes:
    """An OMS bundle: with a bare-key hint, or with `certificates` (leaf first) as the
    verification material."""
    public = private_key.public_key()
    signature = private_key.sign(pae(PAYLOAD_TYPE, statement), ec.ECDSA(_ec_hash(public)))
    material: dict[str, Any] = {"publicKey": {"hint": key_hint(public)}, "tlogEntries": []}
    if certificates:
        if certificates[0].public_key() != public:
            raise IntegrityError(
                "the signing certificate does not belong to the private key",
                fix="pass the certificate issued for this private key",
            )
        material = {
            "x509CertificateChain": {
                "certificates": [
                    {
                        "rawBytes": base64.b64encode(
                            c.public_bytes(serialization.Encoding.DER)
                        ).decode()
                    }
                    for c in certificates
                ]
            },
            "tlogEntries": [],
        }
    bundle = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": material,
        "dsseEnvelope": {
            "payload": base64.b64encode(statement).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    return (json.dumps(bundle, indent=2) + "\n").encode()
