"""The I/O edge of weight integrity: walk the model dir, read each file once through a
no-follow descriptor, validate it, and fingerprint it so that a change between verification
and load is caught (re-checked once the engine is ready)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtime.errors import IntegrityError
from runtime.integrity import policy
from runtime.integrity.safetensors_header import header_length, parse_header

MAX_JSON_BYTES = 64 << 20
_CHUNK = 8 << 20  # large reads: hashing is the cost, not syscalls


@dataclass(frozen=True)
class Fingerprint:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Verified:
    root: Path
    files: dict[str, Fingerprint]
    digests: dict[str, str]  # name -> SHA-256 hex
    excluded: frozenset[str]
    total_bytes: int
    tensors: int
    seconds: float


@dataclass(frozen=True)
class _Inspected:
    fingerprint: Fingerprint
    digest: str
    tensors: int


def _entries(root: Path) -> list[policy.Entry]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            kind: policy.Kind = (
                "symlink" if stat.S_ISLNK(mode)
                else "dir" if stat.S_ISDIR(mode)
                else "file" if stat.S_ISREG(mode)
                else "other"
            )  # fmt: skip
            entries.append(policy.Entry(path.relative_to(root).as_posix(), kind))
    return entries


def _root(root: Path) -> Path:
    if not root.is_dir():
        raise IntegrityError(
            f"model.dir {root}: not a folder", fix="point model.dir at the model's folder"
        )
    return root.resolve()


def verify(
    root: Path,
    *,
    exclude: frozenset[str] = frozenset(),
    progress: Callable[[int, int, int], None] | None = None,
) -> Verified:
    """Policy, strict headers, JSON checks and SHA-256 of every file, hashed in parallel
    (OpenSSL's SHA-256 releases the GIL); fingerprints come from the descriptors read.
    `exclude`: relative names to leave out (a signature file kept inside the model dir).
    `progress(files_done, files_total, bytes_done)` is called as each file completes."""
    started = time.monotonic()
    root = _root(root)
    entries = [e for e in _entries(root) if not (e.kind == "file" and e.name in exclude)]
    names = policy.check_listing(entries)
    workers = min(len(names), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        futures = {pool.submit(_inspect, root, name): name for name in names}
        inspected: dict[str, _Inspected] = {}
        done_bytes = 0
        for future in as_completed(futures):
            item = future.result()  # the first failure stops verification
            inspected[futures[future]] = item
            done_bytes += item.fingerprint.size
            if progress is not None:
                progress(len(inspected), len(names), done_bytes)
        inspected = {name: inspected[name] for name in names}
    return Verified(
        root=root,
        files={n: i.fingerprint for n, i in inspected.items()},
        digests={n: i.digest for n, i in inspected.items()},
        excluded=exclude,
        total_bytes=sum(i.fingerprint.size for i in inspected.values()),
        tensors=sum(i.tensors for i in inspected.values()),
        seconds=time.monotonic() - started,
    )


def _inspect(root: Path, name: str) -> _Inspected:
    fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise IntegrityError(f"model dir: {name}: changed while being checked")
        tensors = 0
        if name.endswith(".safetensors"):
            length = header_length(os.pread(fd, 8, 0), before.st_size, name)
            raw = os.pread(fd, length, 8)
            tensors = parse_header(raw, before.st_size - 8 - length, name).tensors
        elif name.endswith(".json"):
            _check_json(name, os.pread(fd, MAX_JSON_BYTES + 1, 0))
        digest = _sha256(handle)
        if Fingerprint.of(os.fstat(fd)) != Fingerprint.of(before):
            raise IntegrityError(
                f"model dir: {name}: changed while being hashed",
                fix="something is writing to the model dir: mount it read-only",
            )
    return _Inspected(Fingerprint.of(before), digest, tensors)


def _sha256(handle: BinaryIO) -> str:
    hasher = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while count := handle.readinto(buffer):
        hasher.update(view[:count])
    return hasher.hexdigest()


def _check_json(name: str, data: bytes) -> None:
    if len(data) > MAX_JSON_BYTES:
        raise IntegrityError(f"model dir: {name}: larger than {MAX_JSON_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(
            f"model dir: {name}: not valid JSON: {exc}", fix="fix or remove the file"
        ) from None
    policy.check_json(name, doc)


def recheck(verified: Verified) -> None:
    """Nothing was added, removed, replaced or modified since `verify`."""
    now = {e.name for e in _entries(verified.root) if e.kind != "dir"} - verified.excluded
    for name in sorted(now ^ verified.files.keys()):
        change = "appeared" if name in now else "disappeared"
        raise IntegrityError(
            f"model dir: {name} {change} after verification",
            fix="something is writing to the model dir: mount it read-only",
        )
    for name, before in verified.files.items():
        try:
            after = Fingerprint.of(os.lstat(verified.root / name))
        except FileNotFoundError:
            after = None
        if after != before:
            fields = [
                f
                for f in before.__dataclass_fields__
                if getattr(before, f) != getattr(after, f, None)
            ]
            raise IntegrityError(
                f"model dir: {name} changed after verification ({', '.join(fields)})",
                fix="something is writing to the model dir: mount it read-only",
            )


def writable_reason(root: Path) -> str | None:
    """Why the running uid could change the weights, or None when it cannot."""
    if os.statvfs(root).f_flag & os.ST_RDONLY:
        return None
    for dirpath, _dirs, names in os.walk(root):
        for path in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
            if os.access(path, os.W_OK, follow_symlinks=False):
                return f"{path} is writable by uid {os.geteuid()} and not on a read-only mount"
    return None
