"""OpenSSF model signing (OMS v1.0) bundles. Pure: bytes and keys in, facts or an error out.

A bundle is a Sigstore bundle (v0.2 or v0.3 JSON) whose DSSE envelope carries an in-toto
Statement v1 with predicate https://model_signing/signature/v1.0: one SHA-256 digest per file
(or per shard), and a subject digest over them. Verification, in order:
  1. parse the bundle strictly (one signature, known media and payload types) and check that
     its verification material is what the configured method verifies (check_method);
  2. check the signature over the DSSE PAE with the trusted key (method-specific: a key
     named by its hint or carried as rawBytes, or a certificate chained to a configured root,
     for code signing, valid at signing time and now, carrying an allowed identity; or
     Sigstore keyless, checked by sigstore-python against a pinned trust root);
  3. parse the statement strictly (safe resource names, no duplicates, sha256 hex);
  4. recompute the subject digest from the resources;
then the caller checks the file sizes against a shards manifest before hashing (check_sizes)
and compares the resources with the files it hashed (compare_manifest).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from dataclasses import dataclass
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

if TYPE_CHECKING:  # sigstore is imported where used: it costs ~0.3 s at start-up
    from sigstore.models import TrustedRoot

# v0.2 differs from v0.3 only in what a keyless bundle carries (a one-certificate chain, an
# inclusion proof required), which sigstore-python checks; v0.1 (no inclusion proof) is not
# accepted.
BUNDLE_MEDIA_TYPES = frozenset(
    {
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
    }
)
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_SHARD_SIZE = 1 << 40
_RESIGN = "sign the model again (harness sign, or model_signing sign) and deploy that signature"
# A signature that does not verify, or files that differ from it, may be an attack: re-signing
# what is on disk would bless it.
TAMPERED = (
    "treat it as tampering: do not serve this model; check the configured trust "
    "(model.signature.*) and where the model and its signature came from"
)
_NOT_A_BUNDLE = (
    "check that model.signature.path is the model's OMS bundle (model.sig); if it is, " + TAMPERED
)
Method = Literal["key", "certificate", "sigstore"]


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
    # shards only: the 0-byte files the signer recorded. The shards serialization lists no
    # shard for an empty file, so without this record (model_signing writes none: None) an
    # empty file is not covered by the signature.
    empty_files: frozenset[str] | None = None


def _fail(what: str, fix: str = TAMPERED) -> IntegrityError:
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
        raise _fail("the signature file is not JSON", fix=_NOT_A_BUNDLE) from None
    if not isinstance(doc, dict):
        raise _fail("the signature file is not a JSON object", fix=_NOT_A_BUNDLE)
    if doc.get("mediaType") not in BUNDLE_MEDIA_TYPES:
        raise _fail(
            f"unsupported bundle mediaType {doc.get('mediaType')!r} (Sigstore bundle v0.2 and "
            "v0.3 are accepted)",
            fix=_RESIGN,
        )
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


# What each method verifies, and how to configure it, for a bundle checked with the wrong one.
_CARRIES: dict[Method, str] = {
    "key": "a public key (a bare-key signature)",
    "certificate": "an X.509 certificate chain and no transparency-log entry (a certificate "
    "signature)",
    "sigstore": "a Sigstore certificate and transparency-log entry (a keyless signature)",
}
_CONFIGURE: dict[Method, str] = {
    "key": 'model.signature.method = "key" with public_key (harness verify --public-key)',
    "certificate": 'model.signature.method = "certificate" with certificate_chain and '
    "identities (harness verify --certificate-chain, --identity)",
    "sigstore": 'model.signature.method = "sigstore" with trust_config, issuer and identities '
    "(harness verify --trust-config, --sigstore-issuer, --sigstore-identity)",
}
_MATERIAL_FIELDS = ("publicKey", "x509CertificateChain", "certificate")


def _carried(material: dict[str, Any]) -> Method | None:
    """The method a bundle's verification material was made for, or None if none fits."""
    if "publicKey" in material:
        return "key"
    certificate = "certificate" in material or "x509CertificateChain" in material
    if certificate and material.get("tlogEntries"):  # Sigstore's leaf: v0.3 alone, v0.2 as a chain
        return "sigstore"
    if "x509CertificateChain" in material:
        return "certificate"
    return None


def check_method(bundle: Bundle, method: Method) -> None:
    """The bundle carries what `method` verifies: a clear error naming the right method (and
    its option) before any method-specific message would mislead."""
    material = bundle.material
    present = [field for field in _MATERIAL_FIELDS if field in material]
    if len(present) > 1:
        raise _fail(f"verificationMaterial holds both {present[0]} and {present[1]}")
    carried = _carried(material)
    if carried == method:
        return
    if carried is None:
        raise _fail(
            "the bundle's verificationMaterial carries no public key, certificate chain, or "
            "Sigstore certificate with a transparency-log entry",
            fix=_RESIGN,
        )
    raise _fail(
        f"the bundle carries {_CARRIES[carried]}, but it is checked with the {method!r} method",
        fix=f"verify it with the method it was signed with: {_CONFIGURE[carried]}",
    )


def key_hint(public_key: PublicKeyTypes) -> str:
    """The bundle's publicKey.hint: hex SHA-256 of the PEM public key (model_signing's). Also
    the key fingerprint harness reports."""
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


KeyMatch = Literal["hint", "raw_bytes"]
_OTHER_KEY_FIX = (
    "configure the public key that matches the signing key (model.signature.public_key); "
    "if the configured key is right, " + TAMPERED[0].lower() + TAMPERED[1:]
)


def _raw_public_key(value: Any) -> PublicKeyTypes:
    """publicKey.rawBytes: DER SubjectPublicKeyInfo by the Sigstore spec, PEM text as
    model_signing <= 1.0 wrote it."""
    raw = _b64(value, "verificationMaterial.publicKey.rawBytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(raw)
        return serialization.load_der_public_key(raw)
    except ValueError:
        raise _fail(
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
        raise _fail("verificationMaterial.publicKey is not an object")
    hint, raw = material.get("hint") or None, material.get("rawBytes")  # "" names no key
    expected = key_hint(key)
    if hint is None and raw is None:
        raise _fail(
            "verificationMaterial.publicKey has neither a hint nor rawBytes: the bundle does "
            "not name the key that signed it",
            fix=_RESIGN,
        )
    if hint is not None and hint != expected:
        raise _fail(
            f"signed with another key: the bundle's key hint is {hint!r}, the configured "
            f"public key's (sha256 of its PEM) is {expected!r}",
            fix=_OTHER_KEY_FIX,
        )
    if raw is not None:
        theirs = _raw_public_key(raw)
        if _spki(theirs) != _spki(key):
            raise _fail(
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
        raise _fail("the bundle's x509CertificateChain holds no certificates", fix=_RESIGN)
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
        raise _fail(
            f"predicateType {doc.get('predicateType')!r} is not {PREDICATE_TYPE}",
            fix="sign with model_signing >= 1.0 or harness sign",
        )
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
    empty_files = None
    if shard_size is not None:
        resources, empty_files = _empty_files(resources, predicate.get("empty_files"))
    elif "empty_files" in predicate:
        raise _fail("empty_files is only used with the shards serialization")
    return Statement(
        model_name=str(subjects[0].get("name")),
        root_digest=computed,
        method=method,
        resources=resources,
        shard_size=shard_size,
        empty_files=empty_files,
    )


def _empty_files(
    resources: dict[str, str], listed: Any
) -> tuple[dict[str, str], frozenset[str] | None]:
    """Shards: split off the empty files a signer recorded, from harness's `empty_files` (a
    predicate field model_signing ignores) or as 'name:0:0' shards (earlier harness
    signatures). None when neither is there: the signer did not record empty files."""
    names: set[str] = set()
    if listed is not None:
        if not isinstance(listed, list) or not all(_safe_name(name) for name in listed):
            raise _fail("empty_files is not a list of plain relative paths")
        if len(set(listed)) != len(listed):
            raise _fail("empty_files lists a file twice")
        names.update(listed)
    kept = {}
    for name, digest in resources.items():
        file, start, end = _shard_range(name)
        if start == end == 0:
            if digest != _EMPTY_SHA256:
                raise _fail(f"resource {name}: an empty range whose digest is not SHA-256('')")
            names.add(file)
        else:
            kept[name] = digest
    for name in sorted(names & {_shard_range(n)[0] for n in kept}):
        raise _fail(f"{name} is recorded as an empty file and also has shards")
    return kept, frozenset(names) if listed is not None or names else None


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _shard_size(value: Any) -> int:
    # model_signing writes it as a JSON number that may be a float (1000000.0), and accepts
    # any positive size; check_sizes keeps a small one from multiplying the work.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != int(value)
        or not 1 <= value <= MAX_SHARD_SIZE
    ):
        raise _fail(
            f"shard_size {value!r} is not a whole number of bytes from 1 to {MAX_SHARD_SIZE} "
            "(1 TiB)",
            fix=_RESIGN,
        )
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


def _shard_range(name: str) -> tuple[str, int, int]:
    file, _sep, end = name.rpartition(":")
    file, _sep, start = file.rpartition(":")
    return file, int(start), int(end)


def check_sizes(statement: Statement, sizes: dict[str, int]) -> tuple[str, ...]:
    """Shards, before any hashing: each file's size is the one signed (the end of its last
    shard) and the manifest lists each of its shards, so the work is what was signed, and a
    small shard size cannot multiply it; each empty file is recorded. Returns the empty files
    that the signature does not cover (a signer that records none: model_signing)."""
    assert statement.shard_size is not None
    shard = statement.shard_size
    signed: dict[str, int] = {}
    shards: dict[str, int] = {}
    for name in statement.resources:
        file, _start, end = _shard_range(name)
        signed[file] = max(signed.get(file, 0), end)
        shards[file] = shards.get(file, 0) + 1
    empty = statement.empty_files
    for name in sorted(sizes):
        size = sizes[name]
        if size == 0 and name in signed:
            raise IntegrityError(
                f"model dir: {name} is empty, but was signed with {signed[name]} bytes",
                fix=TAMPERED,
            )
        if size == 0 and empty is not None and name not in empty:
            raise IntegrityError(
                f"model dir: {name} is an empty file that is not in the signed manifest (added "
                "after signing, or renamed)",
                fix="remove it, or sign the model again if it belongs there",
            )
        if size and empty is not None and name in empty:
            raise IntegrityError(
                f"model dir: {name} was signed as an empty file but now has {size} bytes",
                fix=TAMPERED,
            )
        if size and name not in signed:
            raise IntegrityError(
                f"model dir: {name} is not in the signed manifest (an extra or renamed file)",
                fix="remove it, or sign the model again if it belongs there",
            )
        if size and size != signed[name]:
            raise IntegrityError(
                f"model dir: {name} is {size} bytes, the signed manifest covers {signed[name]}",
                fix=TAMPERED,
            )
        if size and shards[name] != -(-size // shard):
            raise _fail(
                f"the signed manifest lists {shards[name]} shards of {name}, whose "
                f"{size} bytes make {-(-size // shard)} of {shard} bytes"
            )
    for name in sorted((signed.keys() | (empty or set())) - sizes.keys()):
        raise IntegrityError(
            f"model dir: {name} is in the signed manifest but missing",
            fix="restore the file, or deploy the model that was signed",
        )
    return tuple(n for n in sorted(sizes) if sizes[n] == 0 and empty is None)


def root_digest(resources: dict[str, str]) -> str:
    """The OMS subject digest: SHA-256 over the raw digests in the order given. A statement's
    own order is what model_signing hashes when it verifies; `ordered` is the order it signs
    in."""
    hasher = hashlib.sha256()
    for digest in resources.values():
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def _order_key(name: str, sharded: bool) -> tuple[list[str], int, int]:
    if sharded:
        file, start, end = _shard_range(name)
        return file.split("/"), start, end
    return name.split("/"), 0, 0


def ordered(digests: dict[str, str], sharded: bool) -> dict[str, str]:
    """model_signing's resource order: by path components, then shard offsets as numbers (so
    'a/b' before 'a.txt', and 'f:1000:2000' before 'f:10000:11000'); plain string order
    differs, and so would the subject digest."""
    return dict(sorted(digests.items(), key=lambda item: _order_key(item[0], sharded)))


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
                fix="the file differs from what was signed: " + TAMPERED,
            )


def statement_for(
    model_name: str,
    digests: dict[str, str],
    ignore_paths: list[str],
    shard_size: int | None = None,
    empty_files: list[str] | None = None,
) -> bytes:
    """The statement `harness sign` signs, shaped as model_signing 1.x writes it. With shards,
    `empty_files` also records the 0-byte files (which have no shard, as in model_signing), so
    that one added later is refused; model_signing ignores the field."""
    algorithm = "sha256" if shard_size is None else f"sha256-sharded-{shard_size}"
    digests = ordered(digests, shard_size is not None)
    serialization_: dict[str, Any] = {
        "ignore_paths": ignore_paths,
        "hash_type": "sha256",
        "method": "files" if shard_size is None else "shards",
        "allow_symlinks": False,
    }
    if shard_size is not None:
        serialization_["shard_size"] = shard_size
    predicate: dict[str, Any] = {
        "serialization": serialization_,
        "resources": [
            {"name": name, "digest": digest, "algorithm": algorithm}
            for name, digest in digests.items()
        ],
    }
    if shard_size is not None:  # OMS v1.0: verifiers ignore predicate fields they do not know
        predicate["empty_files"] = sorted(empty_files or [])
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(digests)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
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
