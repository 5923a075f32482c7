"""The Sigstore bundle and its DSSE envelope: step 1, parsed strictly, and checked to carry what
the configured method verifies; and the PAE, what a signature covers."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from runtime.integrity.oms.common import RESIGN, TAMPERED, Method, fail

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
_NOT_A_BUNDLE = (
    "check that model.signature.path is the model's OMS bundle (model.sig); if it is, " + TAMPERED
)


@dataclass(frozen=True)
class Bundle:
    material: dict[str, Any]
    payload_type: str
    payload: bytes
    signature: bytes


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise fail(f"{field} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise fail(f"{field} is not valid base64") from None


def parse_bundle(data: bytes) -> Bundle:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise fail("the signature file is not JSON", fix=_NOT_A_BUNDLE) from None
    if not isinstance(doc, dict):
        raise fail("the signature file is not a JSON object", fix=_NOT_A_BUNDLE)
    if doc.get("mediaType") not in BUNDLE_MEDIA_TYPES:
        raise fail(
            f"unsupported bundle mediaType {doc.get('mediaType')!r} (Sigstore bundle v0.2 and "
            "v0.3 are accepted)",
            fix=RESIGN,
        )
    envelope = doc.get("dsseEnvelope")
    material = doc.get("verificationMaterial")
    if not isinstance(envelope, dict) or not isinstance(material, dict):
        raise fail("the bundle has no dsseEnvelope or verificationMaterial")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise fail(f"payloadType {envelope.get('payloadType')!r} is not {PAYLOAD_TYPE}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise fail("the envelope must carry exactly one signature")
    return Bundle(
        material=material,
        payload_type=PAYLOAD_TYPE,
        payload=b64(envelope.get("payload"), "dsseEnvelope.payload"),
        signature=b64(
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
        raise fail(f"verificationMaterial holds both {present[0]} and {present[1]}")
    carried = _carried(material)
    if carried == method:
        return
    if carried is None:
        raise fail(
            "the bundle's verificationMaterial carries no public key, certificate chain, or "
            "Sigstore certificate with a transparency-log entry",
            fix=RESIGN,
        )
    raise fail(
        f"the bundle carries {_CARRIES[carried]}, but it is checked with the {method!r} method",
        fix=f"verify it with the method it was signed with: {_CONFIGURE[carried]}",
    )
