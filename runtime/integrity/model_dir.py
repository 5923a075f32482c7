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
from typing import Any

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
    # From the verified config.json: the front refuses token ids at or above it. None: the
    # config names none.
    vocab_size: int | None = None


def _unreadable(exc: OSError) -> None:
    # os.walk skips a folder it cannot list: a model would look empty, or smaller.
    raise IntegrityError(
        f"model dir: {exc.filename}: cannot list: {exc.strerror}",
        fix="make the folder readable by harness's uid (and within its Landlock rules)",
    )


def _entries(root: Path) -> list[policy.Entry]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable, followlinks=False):
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
    shard_size: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    check_sizes: Callable[[dict[str, int]], None] | None = None,
    kind: policy.ArtifactKind | None = "model",
) -> Verified:
    """Policy, strict headers, JSON checks, then SHA-256 of every file - or, with
    `shard_size`, of every shard `name:start:end` (OMS "shards"), so one large file is hashed
    on every core; an empty file has no shard, as in model_signing. Work runs in threads
    (OpenSSL's SHA-256 releases the GIL); each part is read through a no-follow descriptor
    whose inode and times must match the first look.
    `exclude`: relative names to leave out (a signature file kept inside the model dir).
    `progress(parts_done, parts_total, bytes_done)` is called as each part completes.
    `check_sizes({name: size})` is called before any hashing: a caller that knows what was
    signed refuses a mismatch there, before a small shard size multiplies the work.
    `kind`: a model (config.json) or a LoRA adapter (adapter_config.json); None: either,
    as its files say (signing)."""
    started = time.monotonic()
    root = _root(root)
    entries = [e for e in _entries(root) if not (e.kind == "file" and e.name in exclude)]
    if kind is None:
        kind = policy.kind_of(e.name for e in entries if e.kind == "file")
    names = policy.check_listing(entries, kind)
    workers = max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        looked = dict(zip(names, pool.map(lambda n: _inspect(root, n), names), strict=True))
        if check_sizes is not None:
            check_sizes({name: fingerprint.size for name, (fingerprint, _t) in looked.items()})
        parts = [
            (name, begin, end)
            for name in names
            for begin, end in _ranges(looked[name][0].size, shard_size)
        ]
        futures = {
            pool.submit(_hash_range, root, name, begin, end, looked[name][0]): (name, begin, end)
            for name, begin, end in parts
        }
        digests: dict[str, str] = {}
        done_bytes = 0
        for future in as_completed(futures):
            name, begin, end = futures[future]
            key = name if shard_size is None else f"{name}:{begin}:{end}"
            digests[key] = future.result()  # the first failure stops verification
            done_bytes += end - begin
            if progress is not None:
                progress(len(digests), len(parts), done_bytes)
    return Verified(
        root=root,
        files={name: fingerprint for name, (fingerprint, _t) in looked.items()},
        digests=dict(sorted(digests.items())),
        excluded=exclude,
        total_bytes=sum(fingerprint.size for fingerprint, _t in looked.values()),
        tensors=sum(tensors for _f, tensors in looked.values()),
        seconds=time.monotonic() - started,
        # config.json's vocab_size (a multimodal model's is its text_config's)
        vocab_size=policy.vocab_size(_read_json(root, "config.json", looked["config.json"][0]))
        if "config.json" in looked
        else None,
    )


def _ranges(size: int, shard_size: int | None) -> list[tuple[int, int]]:
    if shard_size is None:
        return [(0, size)]  # an empty file too: its digest is SHA-256 of nothing
    return [(begin, min(begin + shard_size, size)) for begin in range(0, size, shard_size)]


def _open(root: Path, name: str) -> int:
    return os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _inspect(root: Path, name: str) -> tuple[Fingerprint, int]:
    """Validate one file's contents (headers, JSON) and take its fingerprint."""
    fd = _open(root, name)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(
                f"model dir: {name}: changed while being checked",
                fix="something is writing to the model dir: mount it read-only",
            )
        tensors = 0
        if name.endswith(".safetensors"):
            length = header_length(os.pread(fd, 8, 0), st.st_size, name)
            raw = os.pread(fd, length, 8)
            tensors = parse_header(raw, st.st_size - 8 - length, name).tensors
        elif name.endswith(".json"):
            _check_json(name, os.pread(fd, MAX_JSON_BYTES + 1, 0))
        return Fingerprint.of(st), tensors
    finally:
        os.close(fd)


def _hash_range(root: Path, name: str, begin: int, end: int, expected: Fingerprint) -> str:
    fd = _open(root, name)
    try:
        if Fingerprint.of(os.fstat(fd)) != expected:
            raise IntegrityError(
                f"model dir: {name}: changed while being checked",
                fix="something is writing to the model dir: mount it read-only",
            )
        hasher = hashlib.sha256()
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        position = begin
        while position < end:
            count = os.preadv(fd, [view[: min(_CHUNK, end - position)]], position)
            if count == 0:
                break
            hasher.update(view[:count])
            position += count
        if position != end or Fingerprint.of(os.fstat(fd)) != expected:
            raise IntegrityError(
                f"model dir: {name}: changed while being hashed",
                fix="something is writing to the model dir: mount it read-only",
            )
        return hasher.hexdigest()
    finally:
        os.close(fd)


def read_json(verified: Verified, name: str) -> Any:
    """A JSON file of a verified folder, read from the file verified: the same inode,
    unchanged (its contents were parsed and checked by `verify`)."""
    return _read_json(verified.root, name, verified.files[name])


def _read_json(root: Path, name: str, expected: Fingerprint) -> Any:
    fd = _open(root, name)
    try:
        if Fingerprint.of(os.fstat(fd)) != expected:
            raise IntegrityError(
                f"model dir: {name}: changed while being checked",
                fix="something is writing to the model dir: mount it read-only",
            )
        return json.loads(os.pread(fd, MAX_JSON_BYTES + 1, 0))
    finally:
        os.close(fd)


def _check_json(name: str, data: bytes) -> None:
    if len(data) > MAX_JSON_BYTES:
        raise IntegrityError(
            f"model dir: {name}: larger than {MAX_JSON_BYTES} bytes",
            fix="a config or tokenizer file this large is not expected: check what it is",
        )
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
