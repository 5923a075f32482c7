"""What `harness sign` writes: the statement, shaped as model_signing 1.x writes it, and the OMS
bundle that signs it with a private key (and, optionally, its certificate chain)."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.errors import IntegrityError
from runtime.integrity.oms.envelope import PAYLOAD_TYPE, pae
from runtime.integrity.oms.manifest import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ordered,
    resource_algorithm,
    root_digest,
)
from runtime.integrity.oms.signers import ec_hash, key_hint


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
    algorithm = resource_algorithm(shard_size)
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
    signature = private_key.sign(pae(PAYLOAD_TYPE, statement), ec.ECDSA(ec_hash(public)))
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
