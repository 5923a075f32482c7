"""Steps 3 and 4 and the manifest: the in-toto statement and its resources (files or shards),
parsed strictly, its subject digest recomputed; then, against the files on disk, their sizes
(shards, before hashing) and their digests."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from runtime.errors import IntegrityError
from runtime.integrity.oms.common import RESIGN, TAMPERED, fail

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_SHARD_SIZE = 1 << 40


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


def _safe_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def parse_statement(payload: bytes) -> Statement:
    """Steps 3 and 4: a strict in-toto statement whose subject digest matches its resources."""
    doc, subject = _header(payload)
    root = (subject.get("digest") or {}).get("sha256")
    predicate = doc.get("predicate") or {}
    method, shard_size = _serialization(predicate.get("serialization") or {})
    resources = _resources(predicate.get("resources"), shard_size)
    computed = root_digest(resources)
    if root != computed:
        raise fail(f"the subject digest {root!r} does not match its resources ({computed})")
    empty_files = None
    if shard_size is not None:
        resources, empty_files = _empty_files(resources, predicate.get("empty_files"))
    elif "empty_files" in predicate:
        raise fail("empty_files is only used with the shards serialization")
    return Statement(
        model_name=str(subject.get("name")),
        root_digest=computed,
        method=method,
        resources=resources,
        shard_size=shard_size,
        empty_files=empty_files,
    )


def _header(payload: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The statement's own fields: JSON, an in-toto Statement v1 with the OMS predicate type,
    and one subject. Returns the statement and its subject."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise fail("the signed payload is not JSON") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise fail("the signed payload is not an in-toto Statement v1")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise fail(
            f"predicateType {doc.get('predicateType')!r} is not {PREDICATE_TYPE}",
            fix="sign with model_signing >= 1.0 or harness sign",
        )
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise fail("the statement must have exactly one subject")
    return doc, subjects[0]


def _serialization(serialization_: dict[str, Any]) -> tuple[str, int | None]:
    """The predicate's serialization: its method ('files', or 'shards' with their size; None
    for files) and its hash, SHA-256."""
    method = serialization_.get("method")
    shard_size = None
    if method == "shards":
        shard_size = _shard_size(serialization_.get("shard_size"))
    elif method != "files":
        raise fail(
            f"serialization method {method!r} is not supported ('files' or 'shards')",
            fix="sign with the default 'files' serialization",
        )
    if serialization_.get("hash_type", "sha256") != "sha256":
        raise fail(
            f"hash_type {serialization_.get('hash_type')!r} is not sha256",
            fix="sign with SHA-256 (the default)",
        )
    return method, shard_size


def resource_algorithm(shard_size: int | None) -> str:
    """What each resource's `algorithm` field says: per file, or per shard of this size."""
    return "sha256" if shard_size is None else f"sha256-sharded-{shard_size}"


def _resources(items: Any, shard_size: int | None) -> dict[str, str]:
    """The predicate's resources, in the statement's order: name -> digest, each name once."""
    if not isinstance(items, list) or not items:
        raise fail("the statement lists no files (an empty model is refused)")
    algorithm = resource_algorithm(shard_size)
    resources: dict[str, str] = {}
    for item in items:
        name, digest = _resource(item, shard_size, algorithm)
        if name in resources:
            raise fail(f"resource {name} is listed twice")
        resources[name] = digest
    return resources


def _resource(item: Any, shard_size: int | None, algorithm: str) -> tuple[str, str]:
    """One resource: a plain relative path (for shards, a whole shard of one) and a hex digest
    of the serialization's algorithm."""
    if not isinstance(item, dict):
        raise fail("a resource is not an object")
    name, digest = item.get("name"), item.get("digest")
    file_name = _shard_file(name, shard_size) if shard_size and isinstance(name, str) else name
    if not _safe_name(file_name):
        raise fail(f"resource name {name!r} is not a plain relative path")
    if (
        item.get("algorithm") != algorithm
        or not isinstance(digest, str)
        or not _HEX64.fullmatch(digest)
    ):
        raise fail(f"resource {name}: expected a {algorithm} hex digest")
    return name, digest


def _empty_files(
    resources: dict[str, str], listed: Any
) -> tuple[dict[str, str], frozenset[str] | None]:
    """Shards: split off the empty files a signer recorded, from harness's `empty_files` (a
    predicate field model_signing ignores) or as 'name:0:0' shards (earlier harness
    signatures). None when neither is there: the signer did not record empty files."""
    names: set[str] = set()
    if listed is not None:
        if not isinstance(listed, list) or not all(_safe_name(name) for name in listed):
            raise fail("empty_files is not a list of plain relative paths")
        if len(set(listed)) != len(listed):
            raise fail("empty_files lists a file twice")
        names.update(listed)
    kept = {}
    for name, digest in resources.items():
        file, start, end = _shard_range(name)
        if start == end == 0:
            if digest != _EMPTY_SHA256:
                raise fail(f"resource {name}: an empty range whose digest is not SHA-256('')")
            names.add(file)
        else:
            kept[name] = digest
    for name in sorted(names & {_shard_range(n)[0] for n in kept}):
        raise fail(f"{name} is recorded as an empty file and also has shards")
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
        raise fail(
            f"shard_size {value!r} is not a whole number of bytes from 1 to {MAX_SHARD_SIZE} "
            "(1 TiB)",
            fix=RESIGN,
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
            raise fail(
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
