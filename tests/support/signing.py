"""Shared by the signature tests: the reference `model_signing` CLI and EC key pairs."""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.demo.pki import write_private_key

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def keypair(
    folder: Path, curve: ec.EllipticCurve | None = None, name: str = "k"
) -> tuple[Path, Path]:
    """A new EC key pair (P-256 by default) written as NAME.pem and NAME.pub."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    write_private_key(key, private)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public
