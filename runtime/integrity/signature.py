"""Weight verification end to end: the signature first (cheap, fails fast), then every file
hashed and compared with the signed manifest. Also `harness sign`."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.errors import ConfigError, IntegrityError
from runtime.integrity import model_dir, oms
from runtime.integrity.policy import ArtifactKind

# `harness sign --shard-size`: a signature lists every shard (about 150 bytes each)
MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class KeyTrust:
    """Trust material for the `key` method: the signer's PEM public key."""

    public_key: Path


@dataclass(frozen=True)
class CertificateTrust:
    """Trust material for the `certificate` method: PEM files holding the root CA(s) (and any
    intermediates), and the signer identities (SAN email/URI) allowed; None skips the
    identity check (CLI only, reported as such)."""

    chain: tuple[Path, ...]
    identities: tuple[str, ...] | None


@dataclass(frozen=True)
class SigstoreTrust:
    """Trust material for `sigstore` (keyless): a pinned trust root file, the signer
    identities (OIDC subject: email or URI) and their OIDC issuer."""

    trust_config: Path
    identities: tuple[str, ...]
    issuer: str


Trust = KeyTrust | CertificateTrust | SigstoreTrust


@dataclass(frozen=True)
class Result:
    verified: model_dir.Verified
    root_digest: str
    signer: str
    method: str
    signature: Path
    identity: str | None = None
    # key method: how the bundle named its key, "hint" or "raw_bytes" (model_signing <= 1.0)
    key_match: oms.KeyMatch | None = None
    # shards signed by a tool that records no empty files (model_signing): the 0-byte files
    # present, which the signature does not cover
    unsigned_empty_files: tuple[str, ...] = ()


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IntegrityError(f"{what} {path}: cannot read: {exc.strerror}", fix=fix) from None


def _exclude(root: Path, signature: Path) -> frozenset[str]:
    """A signature kept inside the model dir is not part of the model."""
    try:
        return frozenset({signature.resolve().relative_to(root.resolve()).as_posix()})
    except ValueError:
        return frozenset()


def verify_model(
    root: Path,
    signature: Path,
    trust: Trust,
    progress: Callable[[int, int, int], None] | None = None,
    kind: ArtifactKind | None = "model",
) -> Result:
    """`kind`: what the folder must be (a model or a LoRA adapter); None: as its files say."""
    raw = _read(signature, "signature", "sign the model (harness sign) and point at model.sig")
    bundle = oms.parse_bundle(raw)
    method: oms.Method = (
        "key"
        if isinstance(trust, KeyTrust)
        else "certificate"
        if isinstance(trust, CertificateTrust)
        else "sigstore"
    )
    oms.check_method(bundle, method)
    identity: str | None = None
    key_match: oms.KeyMatch | None = None
    if isinstance(trust, KeyTrust):
        key = oms.load_public_key(
            _read(trust.public_key, "public key", "point at the signer's PEM public key"),
            str(trust.public_key),
        )
        signer, key_match = oms.verify_with_key(bundle, key)
        if key_match == "raw_bytes":
            signer += " (key matched by publicKey.rawBytes)"
    elif isinstance(trust, CertificateTrust):
        trusted = _load_certificates(trust.chain)
        now = datetime.datetime.now(datetime.UTC)  # one `now` per verification
        identities = list(trust.identities) if trust.identities is not None else None
        signer, identity = oms.verify_with_certificates(bundle, trusted, identities, now)
    else:
        trusted_root = oms.load_sigstore_root(
            _read(trust.trust_config, "trust config", "point at the trusted_root.json"),
            str(trust.trust_config),
        )
        signer, verified_payload = oms.verify_with_sigstore(
            raw, trusted_root, list(trust.identities), trust.issuer
        )
        if verified_payload != bundle.payload:  # both parsers must agree on what was signed
            raise IntegrityError(
                "signature: the bundle's payload reads differently to two parsers",
                fix=oms.TAMPERED,
            )
    statement = oms.parse_statement(bundle.payload)
    unsigned_empty: tuple[str, ...] = ()

    def check_sizes(sizes: dict[str, int]) -> None:
        nonlocal unsigned_empty
        unsigned_empty = oms.check_sizes(statement, sizes)

    verified = model_dir.verify(
        root,
        exclude=_exclude(root, signature),
        shard_size=statement.shard_size,
        progress=progress,
        check_sizes=check_sizes if statement.shard_size is not None else None,
        kind=kind,
    )
    oms.compare_manifest(statement.resources, verified.digests)
    return Result(
        verified,
        statement.root_digest,
        signer,
        method,
        signature,
        identity,
        key_match=key_match,
        unsigned_empty_files=unsigned_empty,
    )


def _load_certificates(paths: tuple[Path, ...]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for path in paths:
        fix = "point certificate_chain at PEM CA certificates"
        try:
            certs += x509.load_pem_x509_certificates(_read(path, "certificate chain", fix))
        except ValueError as exc:
            raise IntegrityError(
                f"certificate chain {path}: not PEM certificates: {exc}", fix=fix
            ) from None
    if not certs:
        raise IntegrityError(
            "no trusted certificates configured",
            fix="configure the root CA that issues your signing certificates",
        )
    return certs


def sign_model(
    root: Path,
    private_key: Path,
    signature: Path,
    certificate: Path | None = None,
    chain: tuple[Path, ...] = (),
    shard_size: int | None = None,
) -> str:
    """Sign what the policy accepts (never an empty model, never a pickle). Returns the root
    digest. The bundle is written atomically, readable by all (it is public)."""
    pem = _read(private_key, "private key", "point at a PEM ECDSA private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(
            f"private key {private_key}: cannot load: {exc}",
            fix="use an unencrypted PEM ECDSA P-256/384/521 private key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IntegrityError(
            f"private key {private_key}: not an ECDSA key", fix="use an ECDSA P-256/384/521 key"
        )
    if shard_size is not None and not 1 <= shard_size <= oms.MAX_SHARD_SIZE:
        raise ConfigError(
            f"--shard-size {shard_size}: not a size from 1 byte to 1 TiB",
            fix="pass --shard-size BYTES, e.g. 1000000000 (model_signing's default)",
        )

    def check_sizes(sizes: dict[str, int]) -> None:
        assert shard_size is not None
        count = sum(-(-size // shard_size) for size in sizes.values())
        if count > MAX_SHARDS:
            raise ConfigError(
                f"--shard-size {shard_size}: the model makes {count} shards, more than "
                f"{MAX_SHARDS} (the signature would list every one)",
                fix="pass a larger --shard-size",
            )

    verified = model_dir.verify(
        root,
        exclude=_exclude(root, signature),
        shard_size=shard_size,
        check_sizes=check_sizes if shard_size is not None else None,
        kind=None,  # a model or a LoRA adapter, as its files say
    )
    empty = [name for name, f in verified.files.items() if f.size == 0] if shard_size else None
    statement = oms.statement_for(
        verified.root.name, verified.digests, sorted(verified.excluded), shard_size, empty
    )
    certificates = _load_certificates((certificate, *chain)) if certificate else None
    bundle = oms.sign_with_key(statement, key, certificates)
    tmp = signature.with_name(f".{signature.name}.tmp")
    tmp.write_bytes(bundle)
    os.chmod(tmp, 0o644)
    os.replace(tmp, signature)
    return oms.root_digest(oms.ordered(verified.digests, shard_size is not None))
