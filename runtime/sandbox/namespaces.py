"""Namespaces for the engine: its own mount, network (only a loopback) and IPC namespaces,
inside a user namespace of its own where harness has no privilege (a pod).

- Mount: the engine's root is a fresh, read-only tmpfs holding only what its Landlock rules
  name (system dirs, the venv, the model, read-only; its runtime dir, writable), a few device
  files and a private /dev/shm of bounded size. harness's TLS files, secrets and config, other
  instances' sockets and other services' Unix sockets do not exist there (Landlock ABI <= 7
  does not stop connecting to path sockets; absence does), nor does anybody else's /dev/shm.
- Network: vLLM listens only on its Unix socket, but torch.distributed (gloo) opens TCP
  listeners even at world size 1. With only lo they are reachable by nobody, not the pod's
  network either, and the engine can connect to nothing outside. The socket is a path, so
  the front still reaches it.
- IPC: System V shared memory, semaphores and message queues of its own.

Landlock forbids changing the mount topology to any process it confines, and harness confines
itself before it verifies the weights. So a helper (`python -m runtime.sandbox.namespaces`),
started before that, creates the namespaces, builds the root, sends their descriptors back
and exits; stage 2 enters them later with setns(2). Root (CAP_SYS_ADMIN) creates them
directly. Without privilege a user namespace comes first: its creator holds capabilities
inside it, over its own namespaces only. The engine keeps its uid and gid there (mapped to
themselves, nothing else mapped), so files look the same and it can become nobody else.

A node may refuse: the user.max_user_namespaces sysctl, an AppArmor userns restriction as on
Ubuntu 24.04, a container profile without `unshare` or `mount`. Under `auto` the engine then
keeps harness's namespaces and an event says why; `required` refuses to start (exit 5).
- PID: where the node allows a procfs of its own in it (not under a container runtime's masked
  /proc), so that the engine sees and signals only its own processes (`_pid_namespace`).
  Elsewhere the event names why not, and Landlock's signal scope and the seccomp profile's
  own-pid rules keep the engine from acting on the processes it sees.

Why one module of this size: it is also a program of its own, the helper above, run before
harness confines itself; the user, mount, network, IPC and PID steps happen in that order in
one process and share its mount helpers. Besides the standard library it imports only
runtime/sandbox's own modules.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.sandbox import _linux, privileges
from runtime.sandbox.stage_plan import NamespacesPlan, NamespacesReport, PrivilegesPlan

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# mount(2) flags (linux/mount.h) and the statvfs flags a bind must keep in a user namespace
# (the kernel refuses a remount that would clear a flag the original mount has: locked).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2
PROC_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC  # the engine's own procfs (runtime/sandbox/pidns.py)
_KEEP = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}
# The order stage 2 enters them: the user namespace first (it grants the rights to the rest).
# The PID namespace applies to stage 2's children only (runtime/sandbox/pidns.py).
KINDS = ("user", "mnt", "net", "ipc", "pid")
_CLONE = {
    "user": _linux.CLONE_NEWUSER,
    "mnt": _linux.CLONE_NEWNS,
    "net": _linux.CLONE_NEWNET,
    "ipc": _linux.CLONE_NEWIPC,
    "pid": _linux.CLONE_NEWPID,
}
_NAMES = {"user": "user", "mnt": "mount", "net": "network", "ipc": "ipc", "pid": "pid"}
SHM = "/dev/shm"  # noqa: S108 - the system path, replaced by the engine's own tmpfs

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


@dataclass(frozen=True)
class RootPlan:
    """What the engine's root holds (built from its Landlock plan: the same paths)."""

    mount_point: str  # an empty folder of harness's, where the new root is built
    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    shm_bytes: int = 1 << 30
    # harness's own files (config, TLS, signature, secrets): covered wherever a folder the
    # engine is given holds them (the image keeps its config in /etc/harness).
    hide: list[str] = field(default_factory=list)
    # The uid/gid the PID namespace's init runs as once its procfs is mounted (None: keep).
    init_uid: int | None = None
    init_gid: int | None = None


@dataclass
class Prepared:
    """The helper's outcome, held by harness until stage 2 enters the namespaces."""

    mode: str
    report: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)

    @property
    def isolated(self) -> bool:
        return bool(self.fds)

    @property
    def shm_path(self) -> str | None:
        """The engine's /dev/shm as harness can name it (its own Landlock rules need it)."""
        return f"/proc/self/fd/{self.fds['shm']}" if "shm" in self.fds else None

    @property
    def proc_path(self) -> str | None:
        """The engine's own procfs (its PID namespace's), likewise."""
        return f"/proc/self/fd/{self.fds['proc']}" if "proc" in self.fds else None

    def stage2(self) -> NamespacesPlan:
        return NamespacesPlan(self.mode, {k: v for k, v in self.fds.items() if k in KINDS})

    def release(self) -> None:
        """Once stage 2 holds them: all but the lifeline of the PID namespace's init, which
        ends the namespace when closed (with `close`, or when harness dies)."""
        for kind in [k for k in self.fds if k != "lifeline"]:
            os.close(self.fds.pop(kind))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def prepare(mode: str, root: RootPlan, wrapper: list[str] | None = None) -> Prepared:
    """Run the helper (before harness confines itself). `auto` falls back with the reason in
    the report; `required` raises OSError. `wrapper`: a program the helper runs under (tests:
    another uid, a container's seccomp profile)."""
    if mode == "off":
        return Prepared(mode, {"isolated": False, "namespaces": [], "reason": "disabled by config"})
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [*(wrapper or []), sys.executable, "-I", "-m", "runtime.sandbox.namespaces"]
    argv += ["--channel-fd", str(child.fileno())]
    with parent:
        try:
            proc = subprocess.Popen(
                argv,
                env={},  # it needs none, and its PID namespace's init outlives it
                stdin=subprocess.DEVNULL,
                pass_fds=(child.fileno(),),
                start_new_session=True,
            )
        finally:
            child.close()
        chunks, received = [], []
        try:
            parent.sendall(json.dumps(asdict(root)).encode())
            parent.shutdown(socket.SHUT_WR)
            while True:
                data, fds, _flags, _addr = socket.recv_fds(
                    parent, 1 << 16, 16, socket.MSG_CMSG_CLOEXEC
                )
                received += fds
                if not data:
                    break
                chunks.append(data)
        except OSError:
            chunks = []  # the helper died before it answered: reported below
    proc.wait()
    try:
        report: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        report = {"error": f"the helper ended (exit {proc.returncode}) without a report"}
    if "error" in report:
        for fd in received:
            os.close(fd)
        reason = f"namespaces: {report['error']}"
        if mode == "required":
            raise OSError(errno.EPERM, reason)
        return Prepared(mode, {"isolated": False, "namespaces": [], "reason": reason})
    fds = dict(zip(report.pop("fds"), received, strict=True))
    return Prepared(mode, {"isolated": True, **report}, fds)


def enter(plan: NamespacesPlan) -> NamespacesReport:
    """Stage 2: join the namespaces the helper made (user first). Single-threaded, as setns
    into a user namespace requires."""
    entered = []
    for kind in KINDS:
        fd = plan.fds.get(kind)
        if fd is None:
            continue
        if _libc.setns(fd, _CLONE[kind]) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({_NAMES[kind]}): {os.strerror(err)}")
        os.close(fd)
        entered.append(_NAMES[kind])
    return NamespacesReport(plan.mode, entered)


# --- the helper: a fresh process with no Landlock domain --------------------------------


def _create(root: RootPlan) -> tuple[dict[str, Any], dict[str, int]]:
    created = []
    if os.geteuid() != 0:
        _enter_user_namespace(os.geteuid(), os.getegid())
        created.append("user")
    _linux.unshare(_linux.CLONE_NEWNS | _linux.CLONE_NEWNET | _linux.CLONE_NEWIPC)
    created += ["mount", "network", "ipc"]
    _loopback_up()
    contents = _build_root(root)
    kinds = ["user", "mnt", "net", "ipc"] if "user" in created else ["mnt", "net", "ipc"]
    fds = {kind: os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC) for kind in kinds}
    fds["shm"] = os.open(SHM, os.O_PATH | os.O_CLOEXEC)
    report: dict[str, Any] = {"namespaces": created, "interfaces": ["lo"], "root": contents}
    try:  # last: this process can start no other afterwards
        init, pid_fds = _pid_namespace(root)
    except OSError as exc:
        report["pid_refused"] = str(exc)
    else:
        created.append("pid")
        report["pid_init"] = init
        fds.update(pid_fds)
    return report, fds


def _pid_namespace(root: RootPlan) -> tuple[int, dict[str, int]]:
    """A PID namespace whose init (pid 1) has mounted a procfs of its own on the engine's
    /proc, then waits. Without a procfs of its own a PID namespace would be worse than none:
    the engine's pids (1, 2, ...) would name other processes in the outer /proc, which vLLM
    reads through psutil. It is mounted here because Landlock forbids mounting to harness and all it
    starts, and by the namespace's first process because a procfs shows the PID namespace of
    whoever mounts it. Stage 2 enters it with setns, so that the engine, its child, starts
    inside (runtime/sandbox/pidns.py). A container runtime's masked /proc is the usual
    refusal: its locked mounts hide parts of the outer procfs, and the kernel refuses a new
    procfs, which would not, in a user namespace (OSError, reported as `pid_refused`).

    init reaps what the engine's processes leave behind, and exits when harness closes the
    lifeline or dies; the kernel then kills whatever is left in the namespace. Returns its pid
    and the fds for harness: the namespace, and harness's end of the lifeline."""
    _linux.unshare(_linux.CLONE_NEWPID)
    ours, theirs = socket.socketpair()
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    init = os.fork()
    if init == 0:
        # Nothing of the helper's (its channel to harness above all: harness would wait for
        # its end) stays open here: only the lifeline and the two pipes to the helper.
        _close_all_but(ours.fileno(), go_r, ready_w)
        os.read(go_r, 1)  # until the helper holds the namespace: see below
        _init(ours, ready_w, root)
    os.close(go_r)
    os.close(ready_w)
    ours.close()
    try:
        # The namespace can be opened once it has a process, and through this process's
        # /proc only until init's procfs covers it.
        namespace = os.open("/proc/self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(go_w)
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
        raise
    os.write(go_w, b"g")
    os.close(go_w)
    answer = os.read(ready_r, 64)
    os.close(ready_r)
    if answer != b"ok":
        os.close(namespace)
        theirs.close()
        os.waitpid(init, 0)
        step, _, code = answer.decode().partition(":")
        err = int(code) if code.isdigit() else errno.EIO
        raise OSError(err, f"{step or 'init'} in a new PID namespace: {os.strerror(err)}")
    # harness names it in its own Landlock rules (the engine's are nested in them).
    proc = os.open("/proc", os.O_PATH | os.O_CLOEXEC)
    return init, {"pid": namespace, "lifeline": theirs.detach(), "proc": proc}


def _close_all_but(*keep: int) -> None:
    last = 2
    for fd in sorted(keep):
        os.closerange(last + 1, fd)
        last = fd
    os.closerange(last + 1, os.sysconf("SC_OPEN_MAX"))


def _init(lifeline: socket.socket, ready_w: int, root: RootPlan) -> None:
    """pid 1 of the engine's PID namespace: mount its procfs, say so, leave root and every
    capability, then reap until the lifeline closes. Never returns.

    The engine sees it (pid 1) and may share its uid and user namespace (a pod), but without
    the engine's filter or Landlock: so it is not dumpable (no /proc/1/mem, environ or fd for
    the engine's uid), holds no capability, has nothing but /dev/null on stdio, and ignores
    SIGINT (Python's default handler would make it the one signal that ends it)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        step = "mount proc"
        try:
            _mount("proc", "/proc", "proc", PROC_FLAGS)
            step = "leave root"
            _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
            privileges.drop(PrivilegesPlan(root.init_uid, root.init_gid))
            _linux.prctl(_linux.PR_SET_DUMPABLE, 0)  # after the uid change, which may reset it
        except OSError as exc:
            os.write(ready_w, f"{step}:{exc.errno}".encode())
            os._exit(1)
        os.write(ready_w, b"ok")
        os.close(ready_w)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _close_all_but(lifeline.fileno())
        poller = select.poll()  # poll(2): select(2) is not in the container's profile
        poller.register(lifeline, select.POLLIN)
        while True:
            readable = poller.poll(1000)
            _reap()
            if readable and not lifeline.recv(1):
                break  # harness closed it, or is gone
    finally:
        os._exit(0)


def _reap() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _enter_user_namespace(uid: int, gid: int) -> None:
    """A user namespace in which the engine is uid/gid, as outside, and nobody else.
    setgroups must be denied before an unprivileged process may write its gid map."""
    _linux.unshare(_linux.CLONE_NEWUSER)
    for name, line in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(line)


def _loopback_up() -> None:
    # Any socket takes interface ioctls; a TCP one is what every profile here allows.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _build_root(plan: RootPlan) -> dict[str, Any]:
    """The engine's root, built on a tmpfs at plan.mount_point, then made / (pivot_root)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates out
    new = plan.mount_point
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    bound: list[str] = []
    missing: list[str] = []
    linked: dict[str, str] = {}
    specials = {"/proc", "/sys"}
    for path, writable in _ordered(plan):
        if path in specials:
            continue
        if not os.path.lexists(path):
            missing.append(path)
            continue
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), new + path)  # /bin -> usr/bin: merged /usr
            linked[path] = os.readlink(path)
            continue
        real = os.path.realpath(path)
        if not writable and any(_within(real, b) for b in bound):
            continue  # already visible, read-only, through a folder above it
        # The folder holding the new root (the runtime dir) is bound without what is mounted
        # below it, or the new root would appear inside itself.
        _bind(real, new + real, read_only=not writable, recursive=not _within(new, real))
        bound.append(real)
        if real != path and not os.path.lexists(new + path):
            os.makedirs(os.path.dirname(new + path), exist_ok=True)
            os.symlink(real, new + path)
            linked[path] = real
    # /proc and /sys as the container or host has them (masks included); the PID namespace's
    # init mounts the engine's own procfs over this /proc where the node allows it. /proc
    # stays writable for the CUDA driver's own /proc/<pid>/task/<tid>/comm; Landlock decides
    # what the engine writes there.
    for special, read_only in (("/proc", False), ("/sys", True)):
        if os.path.isdir(special):
            _bind(special, new + special, read_only=read_only)
    hidden = _hide(new, plan, bound)
    devices = _devices(new, plan.devices)
    os.makedirs(new + SHM, exist_ok=True)
    _mount("tmpfs", new + SHM, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={plan.shm_bytes}")
    old = new + "/.old"
    os.mkdir(old)
    if _libc.syscall(_SYS_PIVOT_ROOT[os.uname().machine], new.encode(), old.encode()) != 0:
        _fail("pivot_root")
    os.chdir("/")
    if _libc.umount2(b"/.old", MNT_DETACH) != 0:
        _fail("umount /.old")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return {
        "read_only": [p for p in bound if p not in plan.write],
        "writable": [p for p in bound if p in plan.write],
        "symlinks": linked,
        "devices": devices,
        "shm_bytes": plan.shm_bytes,
        "hidden": hidden,
        "missing_paths": missing,
    }


def _ordered(plan: RootPlan) -> list[tuple[str, bool]]:
    """Folders above before folders below, so that a writable runtime dir inside a read-only
    tree is mounted over it, not under it."""
    entries = {p: False for p in plan.read}
    entries.update({p: True for p in plan.write if p != SHM})
    return sorted(entries.items(), key=lambda item: item[0].count("/"))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _hide(new: str, plan: RootPlan, bound: list[str]) -> list[str]:
    """Cover harness's files that a bound folder holds: their folder with an empty read-only
    tmpfs, unless that folder is itself one the engine needs (or holds one); then the file
    with /dev/null. The folder as configured first, then the file's real one: a Kubernetes
    volume's files are links into a `..<time>` folder that a rotation replaces, and only the
    configured folder covers the next one too. Returns what was covered."""
    needed = [*plan.read, *plan.write]
    covered: list[str] = []
    candidates = [os.path.abspath(p) for p in plan.hide]
    candidates += [os.path.realpath(p) for p in plan.hide]
    for path in dict.fromkeys(candidates):
        if not os.path.lexists(path) or not any(_within(os.path.realpath(path), b) for b in bound):
            continue
        real_dir = os.path.isdir(path) and not os.path.islink(path)
        folder = path if real_dir else os.path.dirname(path)
        if os.path.realpath(folder) != folder or any(_within(folder, c) for c in covered):
            continue  # reached through a link (its real folder is a candidate too), or done
        if not any(_within(n, folder) for n in needed) and folder not in bound:
            flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            _mount("tmpfs", new + folder, "tmpfs", flags, "size=4k,mode=0555")
            covered.append(folder)
        elif not real_dir and not os.path.islink(path):
            _bind("/dev/null", new + path, read_only=True, recursive=False)
            covered.append(path)
    return covered


def _devices(new: str, names: list[str]) -> list[str]:
    os.makedirs(new + "/dev", exist_ok=True)
    present = []
    for name in names:
        if not os.path.exists(name) or not name.startswith("/dev/"):
            continue
        # A device file, or a folder of them (/dev/nvidia-caps): bound with what is below.
        _bind(name, new + name, read_only=False, recursive=os.path.isdir(name))
        present.append(name)
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{new}/dev/{link}")
    return present


def _bind(source: str, target: str, *, read_only: bool, recursive: bool = True) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):  # a file: its mount point (unless one is there)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    _mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only and recursive and _read_only_below(target):
        return
    if read_only:
        kept = os.statvfs(target).f_flag
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for statvfs_flag, mount_flag in _KEEP.items():
            if kept & statvfs_flag:
                flags |= mount_flag
        _mount(None, target, None, flags)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns")]


_SYS_MOUNT_SETATTR = 442  # the same on x86_64 and aarch64 (generic syscall table)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1


def _read_only_below(target: str) -> bool:
    """Read-only on the bind and every mount below it (a remount reaches only the top one:
    /sys/fs/cgroup, a container's /etc/hosts). Only sets a flag, so the others, locked or
    not, stay. False on kernels before 5.12 (no mount_setattr): the caller remounts the top."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    args = (
        ctypes.c_int(_AT_FDCWD),
        target.encode(),
        ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), *args) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            return False
        _fail(f"mount_setattr read-only {target}")
    return True


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    encoded = [s.encode() if s is not None else None for s in (source, target, fstype)]
    if _libc.mount(*encoded, flags, data.encode() or None) != 0:
        _fail(f"mount {source or ''} on {target}")


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.sandbox.namespaces")
    parser.add_argument("--channel-fd", type=int, required=True)
    args = parser.parse_args()
    channel = socket.socket(fileno=args.channel_fd)
    raw = b""
    while chunk := channel.recv(1 << 16):
        raw += chunk
    try:
        report, fds = _create(RootPlan(**json.loads(raw)))
    except OSError as exc:
        channel.sendall(json.dumps({"error": str(exc)}).encode())
        return 5
    report["fds"] = list(fds)
    socket.send_fds(channel, [json.dumps(report).encode()], list(fds.values()))
    return 0


def root_plan(
    mount_point: Path, fence: Any, shm_bytes: int, hide: list[str], drop: Any
) -> RootPlan:
    """The root from the engine's Landlock plan (landlock.LandlockPlan): what it may read,
    write and open as devices is what exists for it. `drop`: the engine's PrivilegesPlan,
    whose uid the PID namespace's init takes too."""
    return RootPlan(
        mount_point=str(mount_point),
        read=list(fence.read),
        write=list(fence.write),
        devices=list(fence.devices),
        shm_bytes=shm_bytes,
        hide=hide,
        init_uid=drop.uid,
        init_gid=drop.gid,
    )


if __name__ == "__main__":
    raise SystemExit(main())
