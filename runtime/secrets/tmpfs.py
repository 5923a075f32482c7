"""Secrets: read from an in-memory filesystem only, held by the front only.

Vault Agent renders secrets into a memory-backed volume (`/vault/secrets`), the Secrets Store
CSI driver mounts a tmpfs with one file per object. A secret that reached a disk, a file
another user could change or read, or a secret-like environment variable (inherited by every
child, visible in /proc/PID/environ and in crash reports) is refused before anything starts.
Values are never logged, never passed in an environment, never given to the engine.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.config import SECRET_LIKE, SecretsSection
from runtime.errors import SecretsError

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


@dataclass(frozen=True)
class Secret:
    name: str
    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, <{len(self.value)} bytes>)"


def filesystem_of(path: str, mountinfo: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding `path` (resolved), from the text
    of /proc/self/mountinfo. Pure."""
    best = ("", "")
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        point = _unescape(left.split()[4])
        fstype = right.split()[0]
        if _within(path, point) and len(point) >= len(best[0]):  # the last, deepest mount wins
            best = (point, fstype)
    return best


def _unescape(text: str) -> str:
    return (
        text.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def check_file(name: str, st: os.stat_result, max_bytes: int, euid: int) -> None:
    """Refuse a secret file anyone else could swap, change or read. Pure over `st`."""
    fix = "have the secret written as a regular file, mode 0400 or 0600, owned by this uid"
    if stat.S_ISLNK(st.st_mode):
        raise SecretsError(f"secret {name}: is a symlink", fix=fix)
    if not stat.S_ISREG(st.st_mode):
        raise SecretsError(f"secret {name}: is not a regular file", fix=fix)
    if st.st_mode & 0o022:
        raise SecretsError(
            f"secret {name}: is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            fix=fix,
        )
    if st.st_mode & 0o004:
        raise SecretsError(
            f"secret {name}: is readable by others (mode {stat.S_IMODE(st.st_mode):04o})", fix=fix
        )
    if st.st_uid not in (0, euid):
        raise SecretsError(
            f"secret {name}: is owned by uid {st.st_uid}, not {euid} or root", fix=fix
        )
    if st.st_size > max_bytes:
        raise SecretsError(
            f"secret {name}: is {st.st_size} bytes, over the {max_bytes}-byte cap",
            fix="raise secrets.max_file_bytes if this secret is really that big",
        )


def parse(name: str, data: bytes) -> dict[str, bytes]:
    """Raw file -> {name: bytes}; `*.json` -> its string members; `*.env` -> KEY=VALUE lines."""
    if name.endswith(".json"):
        try:
            doc = json.loads(data)
        except ValueError:
            raise SecretsError(
                f"secret {name}: not valid JSON", fix="fix the template that renders it"
            ) from None
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise SecretsError(
                f"secret {name}: must be a JSON object of strings",
                fix="fix the template that renders it",
            )
        return {f"{name}:{k}": v.encode() for k, v in doc.items()}
    if name.endswith(".env"):
        out = {}
        for number, line in enumerate(data.decode(errors="strict").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise SecretsError(
                    f"secret {name}: line {number} is not KEY=VALUE",
                    fix="fix the template that renders it",
                )
            out[f"{name}:{key.strip()}"] = value.strip().encode()
        return out
    return {name: data}


def load(
    section: SecretsSection, mountinfo_path: str = "/proc/self/mountinfo"
) -> dict[str, Secret]:
    """Every file of the secrets dir, checked, parsed and held in memory."""
    root = section.dir
    try:
        resolved = os.path.realpath(root, strict=True)
    except OSError as exc:
        raise SecretsError(
            f"secrets.dir {root}: {exc.strerror}",
            fix="mount the secrets volume there (Vault Agent, CSI driver)",
        ) from None
    point, fstype = filesystem_of(resolved, Path(mountinfo_path).read_text())
    if fstype not in MEMORY_FILESYSTEMS:
        raise SecretsError(
            f"secrets.dir {root} is on {fstype or 'an unknown filesystem'} (mounted at "
            f"{point or '?'}), not in memory: a secret there has reached a disk",
            fix="mount an in-memory volume there (Kubernetes: emptyDir medium Memory, the "
            "Vault Agent injector, or the Secrets Store CSI driver)",
        )
    try:
        secrets = _read_all(_version_dir(resolved), section.max_file_bytes)
    except FileNotFoundError as exc:
        # The kubelet removes the previous version right after swapping ..data.
        raise SecretsError(
            f"secrets.dir {root}: {exc.filename} went away while it was read (a rotation)",
            fix="start again: the next start reads the new version",
        ) from None
    for required in section.required:
        if required not in secrets:
            raise SecretsError(
                f"secret {required} is missing from {root}",
                fix="check the Vault template or the CSI SecretProviderClass",
            )
    return secrets


def check_engine_cannot_read(
    private: list[tuple[str, Path]],
    reachable: list[str] | None,
    uid: int,
    groups: set[int],
    hidden: list[str] | None = None,
) -> None:
    """Refuse to start when the engine could read one of harness's private files: the secrets
    dir, the TLS key (`private`: (setting, path) pairs). Such a file is in the engine's reach
    when it lies within a path the engine may open (`reachable`: its Landlock and mount
    namespace paths, links resolved; None: any path, without Landlock), or holds one, and its
    mode lets the engine's uid or groups read it (in a pod the engine keeps harness's uid);
    unless its mount namespace covers it (`hidden`). A warning would leave it readable."""
    reach = None if reachable is None else [os.path.realpath(p) for p in reachable]
    covered = [os.path.realpath(p) for p in hidden or []] + [*(hidden or [])]
    for setting, given in private:
        real = os.path.realpath(given)
        if not os.path.exists(real):
            continue  # a missing TLS key is step 4's error (exit 2)
        if any(_within(path, c) for path in (os.path.abspath(given), real) for c in covered):
            continue
        if reach is not None:
            inside = [p for p in reach if _within(real, p) or _within(p, real)]
            if not inside:
                continue
            where = f"within {inside[0]}, which the engine may read"
        else:
            where = "where the engine's uid may read anything: Landlock is not enforced"
        if os.path.isdir(real):
            files = [Path(e.path) for e in sorted(os.scandir(real), key=lambda e: e.name)]
        else:
            files = [Path(real)]
        for path in files:
            st = path.stat()
            mode = stat.S_IMODE(st.st_mode)
            readable = (
                (st.st_uid == uid and mode & 0o400)
                or (st.st_gid in groups and mode & 0o040)
                or mode & 0o004
            )
            if stat.S_ISREG(st.st_mode) and readable:
                raise SecretsError(
                    f"{path.name}: the engine could read it: {setting} {given} is {where}, and "
                    f"the file (owner {st.st_uid}, group {st.st_gid}, mode {mode:04o}) is "
                    f"readable by the engine's uid {uid} or its groups",
                    fix=f"keep {setting} out of the engine's paths (system folders, the venv, "
                    "the model, its runtime dir, sandbox.extra_*_paths; /dev/shm where it has "
                    "no mount namespace of its own), or run harness as root so that the "
                    "engine runs as engine.uid",
                )


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _read_all(folder: str, max_bytes: int) -> dict[str, Secret]:
    secrets: dict[str, Secret] = {}
    euid = os.geteuid()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):  # the kubelet's and CSI driver's ..data / ..<time>
            continue
        st = entry.stat(follow_symlinks=False)
        check_file(entry.name, st, max_bytes, euid)
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.read(fd, max_bytes + 1)
        finally:
            os.close(fd)
        for key, value in parse(entry.name, data).items():
            secrets[key] = Secret(key, value)
    return secrets


def _version_dir(root: str) -> str:
    """The folder to read. A Kubernetes Secret volume (and the Secrets Store CSI driver) is
    written by the kubelet's atomic writer: the files sit in a timestamped folder `..<time>`,
    `..data` links to it and is swapped on update, and each name is a symlink `name ->
    ..data/name`. Those symlinks are the only ones accepted, and only in that layout: the
    files are read from the one version `..data` points to now, so all come from one update.
    Any other folder is read as it is."""
    try:
        version = os.readlink(os.path.join(root, "..data"))
    except OSError:
        return root  # no ..data link: not the atomic writer's layout
    fix = "mount the Secret volume as the kubelet writes it, or give a folder of regular files"
    if "/" in version or not version.startswith("..") or version in ("..", "..data"):
        raise SecretsError(f"secrets.dir {root}: ..data points to {version!r}", fix=fix)
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        if not entry.is_symlink() or os.readlink(entry.path) != f"..data/{entry.name}":
            raise SecretsError(
                f"secrets.dir {root}: {entry.name} is not a link to ..data/{entry.name}, "
                "though the folder is laid out by the kubelet (it has a ..data link)",
                fix=fix,
            )
    return os.path.join(root, version)


def describe(section: SecretsSection, names: list[str]) -> dict[str, Any]:
    """`harness check`: where secrets come from and where they may not go."""
    allowed = f" (allowed: {', '.join(section.allow_env)})" if section.allow_env else ""
    return {
        "status": "enforced",
        "environment": "no secret-like variables" + allowed,
        "dir": str(section.dir) if section.dir else None,
        "filesystem": "tmpfs/ramfs required",
        "names": sorted(names),
        "engine": "gets none (allowlisted environment)",
    }


def secret_env_names(environ: dict[str, str], allowed: list[str]) -> list[str]:
    """Environment variables whose names look like secrets and are not allowlisted."""
    return sorted(n for n in environ if SECRET_LIKE.search(n) and n not in allowed)


def check_environment(environ: dict[str, str], allowed: list[str]) -> None:
    found = secret_env_names(environ, allowed)
    if found:
        raise SecretsError(
            f"secret-like environment variables are set: {', '.join(found)} (values not shown)",
            fix="deliver secrets as files in the secrets dir instead; if a name is not a "
            "secret, list it in secrets.allow_env",
        )
