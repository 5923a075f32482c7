"""The I/O edge of weight integrity: walk the model dir, read each file once through a
no-follow descriptor, validate it, and fingerprint it so that a change between verification
and load is caught (re-checked once the engine is ready)."""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import IntegrityError
from runtime.integrity import policy
from runtime.integrity.safetensors_header import header_length, parse_header

MAX_JSON_BYTES = 64 << 20


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
    total_bytes: int
    tensors: int
    seconds: float


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


def verify(root: Path) -> Verified:
    """Policy, strict headers, JSON checks; fingerprints taken from the descriptors read."""
    started = time.monotonic()
    root = _root(root)
    files: dict[str, Fingerprint] = {}
    tensors = 0
    for name in policy.check_listing(_entries(root)):
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"model dir: {name}: changed while being checked")
            if name.endswith(".safetensors"):
                length = header_length(handle.read(8), st.st_size, name)
                raw = handle.read(length)
                tensors += parse_header(raw, st.st_size - 8 - length, name).tensors
            elif name.endswith(".json"):
                _check_json(name, handle.read(MAX_JSON_BYTES + 1))
            files[name] = Fingerprint.of(st)
    return Verified(
        root=root,
        files=files,
        total_bytes=sum(f.size for f in files.values()),
        tensors=tensors,
        seconds=time.monotonic() - started,
    )


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
    now = {e.name for e in _entries(verified.root) if e.kind != "dir"}
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
