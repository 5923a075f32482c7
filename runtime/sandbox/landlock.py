"""Landlock for the engine: read-only code and model, writes only to its runtime dir and
/dev/shm, no TCP except allowlisted ports, no signals or abstract sockets out of its domain.
Applied in stage 2 (single-threaded, after no_new_privs), so every engine process inherits it.

And for harness itself (`build_front`, applied by sandbox.front): the engine's paths, plus
what only the front reads (its code, the signature material, secrets and TLS files); the
engine's domain is nested in it.

Best effort by design: the kernel's ABI version (detected at run time) decides what can be
enforced, and the report says exactly what was. `required` refuses to start without Landlock.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.sandbox.stage_plan import LandlockPlan, LandlockReport

if TYPE_CHECKING:  # stage 2 imports this module: no pydantic there
    from runtime.config import Config

_SYS = {
    "x86_64": (444, 445, 446),
    "aarch64": (444, 445, 446),
}
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

# linux/landlock.h: filesystem rights, and the ABI that introduced each.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Everything but executing: the engine never needs to run what it wrote.
WRITE = (
    FS_WRITE_FILE
    | FS_READ_FILE
    | FS_READ_DIR
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_SYM
    | FS_REFER
    | FS_TRUNCATE
)
# Device files the engine reads and writes (/dev/null for subprocesses; GPUs need ioctls).
DEVICE = FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV
# Existing files the engine may write (and truncate: fopen "w"), never create or remove.
WRITE_FILE = FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def _syscall(index: int, *args: Any) -> int:
    number = _SYS[os.uname().machine][index]
    result = _libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when Landlock is absent or disabled at boot."""
    try:
        return _syscall(0, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, KeyError):
        return 0


# What any Python program on Debian reads: code, shared libraries, ld.so.cache, passwd (torch
# calls getpwuid), CPU topology in /proc and /sys.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# The GPUs' device files, for engine.device = "cuda".
NVIDIA_DEVICES = "/dev/nvidia*"


@functools.cache
def gpu_devices() -> tuple[str, ...]:
    """The NVIDIA device files, listed once per process. harness lists them while it builds
    its own rules, before it confines itself: from then on it cannot list /dev, and the
    engine's rules, built later, must name the same files (a listing then finds none, and
    CUDA fails in the engine with EACCES on every device)."""
    return tuple(sorted(glob.glob(NVIDIA_DEVICES)))


def build(cfg: Config, runtime_root: Path, tcp_ports: list[int]) -> LandlockPlan:
    """The engine's rules. Pure apart from resolving the interpreter's real location."""
    python = Path(cfg.engine.python)
    # The model, each LoRA adapter and the draft model: every folder of verified weights.
    read = [*SYSTEM_READ, *(str(section.dir) for _label, section in cfg.artifacts())]
    venv = python.parent.parent
    if (venv / "pyvenv.cfg").is_file():
        read.append(str(venv))
    read.append(str(Path(os.path.realpath(python)).parent.parent))  # the base interpreter
    read += [str(p) for p in cfg.sandbox.extra_read_paths]
    # /dev/shm: torch and vLLM share tensors and semaphores there (named, not per-process).
    shm = "/dev/shm"  # noqa: S108 - a fixed system path, not a temp file name
    write = [str(runtime_root), shm, *(str(p) for p in cfg.sandbox.extra_write_paths)]
    devices = list(DEVICES)
    write_files: list[str] = []
    if cfg.engine.device == "cuda":
        devices += gpu_devices()
        # cuInit names the driver's threads through /proc/<pid>/task/<tid>/comm and fails
        # with CUDA_ERROR_OPERATING_SYSTEM when it cannot. Landlock rules bind inodes, and
        # vLLM's workers are processes started later: only /proc itself covers their pids.
        # The files' owners and modes still decide which of them the engine may write.
        write_files.append("/proc")
    return LandlockPlan(
        mode=cfg.sandbox.landlock,
        read=list(dict.fromkeys(read)),
        write=write,
        devices=devices,
        tcp_ports=sorted({*cfg.sandbox.allowed_tcp_ports, *tcp_ports}),
        write_files=write_files,
    )


def build_front(
    cfg: Config, runtime_root: Path, engine_shm: str | None = None, engine_proc: str | None = None
) -> LandlockPlan:
    """Harness's own rules: everything the engine may do (its domain is nested in this one,
    so it can never have more), and what only the front reads. TLS files are allowed by
    their folder: a rotation replaces them, often by swapping a symlink there. TCP stays
    open (the front binds its ports and exports OTLP); signals and abstract Unix sockets
    reach only the domain, which holds the engine (ABI >= 6): even as root, harness cannot
    signal processes it did not start. `engine_shm`: the engine's own /dev/shm (a tmpfs in its
    mount namespace, named through a descriptor), which the engine inherits these rules for;
    `engine_proc` likewise, its own procfs (its PID namespace's)."""
    engine = build(cfg, runtime_root, [])
    tls, otlp = cfg.front.tls, cfg.telemetry
    front_only = [
        sys.prefix,  # the front's own interpreter, where engine.python is another one
        sys.base_prefix,
        str(Path(__file__).resolve().parent.parent),  # harness's code (lazy imports)
        *(str(Path(p).parent) for p in (tls.cert, tls.key, tls.client_ca)),
        *(str(p) for p in (cfg.secrets.dir, otlp.otlp_ca, otlp.otlp_client_cert) if p),
    ]
    for _label, section in cfg.artifacts():
        sig = section.signature
        if sig is not None:
            front_only += [str(sig.path), *(str(p) for p in sig.certificate_chain)]
            front_only += [str(p) for p in (sig.public_key, sig.trust_config) if p is not None]
    if cfg.sandbox.seccomp != "off":
        from runtime.sandbox.seccomp import configured  # libseccomp: harness's side only

        front_only.append(str(configured.profile_path(cfg)))
    proc = [engine_proc] if engine_proc else []
    return LandlockPlan(
        mode=cfg.sandbox.landlock,
        read=list(dict.fromkeys([*engine.read, *front_only, *proc])),
        write=[*engine.write, *([engine_shm] if engine_shm else [])],
        devices=engine.devices,
        write_files=[*engine.write_files, *(proc if "/proc" in engine.write_files else [])],
        remove_dirs=[str(runtime_root.parent)],
        restrict_tcp=False,
    )


def describe(cfg: Config, runtime_root: Path, ranks: int) -> dict[str, dict[str, Any]]:
    """The engine's rules and harness's own (`harness check`); `ranks`: the engine's
    processes that meet over TCP (tensor and pipeline parallel)."""
    abi = abi_version()
    tcp = "connect only to the rendezvous ports" if abi >= 4 else "not restricted"
    if ranks > 1:
        tcp = "not restricted: the ranks meet over gloo; served only in the engine's own netns"
    front = build_front(cfg, runtime_root)
    return {
        "landlock": {**_describe_rules(build(cfg, runtime_root, []), abi), "tcp": tcp},
        "front_landlock": {
            **_describe_rules(front, abi),
            "scope": "harness itself, from start-up (the engine's domain is nested in it)",
            "remove_empty_dirs": front.remove_dirs,
            "tcp": "not restricted (the front binds and exports)",
        },
    }


def _describe_rules(rules: LandlockPlan, abi: int) -> dict[str, Any]:
    mode = rules.mode
    return {
        "status": "off (unsafe)" if mode == "off" else "enforced" if abi else "unavailable",
        "mode": mode,
        "abi": abi,
        "read_execute": rules.read,
        "write": rules.write,
        "devices": rules.devices,
        "write_existing_files": rules.write_files,
        "scoped": ["abstract_unix_socket", "signal"] if abi >= 6 and rules.scoped else [],
    }


def apply(plan: LandlockPlan) -> LandlockReport:
    """Restrict this thread and everything it starts from now on (stage 2: the engine;
    sandbox.front: harness itself). Returns the report; raises OSError when `required`
    cannot be met."""
    mode = plan.mode
    if mode == "off":
        return LandlockReport(mode, enforced=False, reason="disabled by config")
    abi = abi_version()
    if abi < 1:
        if mode == "required":
            raise OSError(95, "Landlock is not available in this kernel (engine.landlock)")
        return LandlockReport(mode, enforced=False, abi=0, reason="kernel has no Landlock")
    fs_mask = _FS_BY_ABI[max(a for a in _FS_BY_ABI if a <= abi)]
    attr = _RulesetAttr(handled_access_fs=fs_mask)
    size = ctypes.sizeof(ctypes.c_uint64)
    tcp = abi >= 4 and plan.restrict_tcp
    scoped = abi >= 6 and plan.scoped
    if tcp:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 2 * ctypes.sizeof(ctypes.c_uint64)
    if scoped:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = ctypes.sizeof(_RulesetAttr)
    ruleset = _syscall(0, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    skipped: list[str] = []
    try:
        for paths, access in (
            (plan.read, READ),
            (plan.write, WRITE),
            (plan.devices, DEVICE),
            (plan.write_files, WRITE_FILE),
            (plan.remove_dirs, FS_REMOVE_DIR),
        ):
            for path in paths:
                if not _add_path(ruleset, path, access & fs_mask):
                    skipped.append(path)
        if tcp:
            # Port 0 is bind(2)'s "any free port": gloo probes its address that way and
            # listens on such ports. Connecting stays limited to the listed ports.
            for port, access in [
                (0, NET_BIND_TCP),
                *((p, NET_BIND_TCP | NET_CONNECT_TCP) for p in plan.tcp_ports),
            ]:
                rule = _NetPortAttr(access, port)
                _syscall(1, ruleset, _RULE_NET_PORT, ctypes.byref(rule), ctypes.c_uint32(0))
        _syscall(2, ruleset, ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return LandlockReport(
        mode,
        enforced=True,
        abi=abi,
        filesystem={
            "read_execute": list(plan.read),
            "write": list(plan.write),
            "devices": list(plan.devices),
            "write_files": list(plan.write_files),
            "remove_empty_dirs": list(plan.remove_dirs),
            "missing_paths": skipped,
        },
        tcp={
            "enforced": tcp,
            "connect_ports": plan.tcp_ports if tcp else "any",
            "bind_ports": [0, *plan.tcp_ports] if tcp else "any",
        },
        scoped=["abstract_unix_socket", "signal"] if scoped else [],
    )


def _add_path(ruleset: int, path: str, access: int) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # nothing to allow there; reported, not fatal
    try:
        if not os.path.isdir(path):
            # A rule on a file may only carry file rights.
            access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
        rule = _PathBeneathAttr(access, fd)
        _syscall(1, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0))
    finally:
        os.close(fd)
    return True
