"""The few raw Linux calls Python 3.11 does not expose, via ctypes. Kept small on purpose."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(0x{flags:x}): {os.strerror(err)}")


# prctl(2) options and the capability ABI (linux/prctl.h, linux/capability.h).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}

_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}): {os.strerror(err)}")
    return result


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def clear_capabilities() -> None:
    """capset(2) with empty effective, permitted and inheritable sets (setuid alone does not
    clear the inheritable set)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    number = _SYS_CAPSET[os.uname().machine]
    if _libc.syscall(number, ctypes.byref(header), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        return int(handle.read())


# seccomp(2) (linux/seccomp.h): a filter compiled by harness, loaded by stage 2.
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
_BPF_INSTRUCTION = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(bpf: bytes, *, listener: bool) -> int | None:
    """Load a BPF program into this thread's filters (no_new_privs must be set). Returns the
    notification listener's fd when `listener`, else None."""
    count, rest = divmod(len(bpf), _BPF_INSTRUCTION)
    if rest or not 0 < count <= 0xFFFF:
        raise OSError(22, f"seccomp: {len(bpf)} bytes is no BPF program")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(count, ctypes.cast(program, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    number = _SYS_SECCOMP[os.uname().machine]
    result = _libc.syscall(number, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
    return int(result) if listener else None


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise OSError(2, f"no {field}: line in /proc/self/status")


def threads() -> int:
    """This process's threads, as the kernel counts them (Python's count misses foreign ones)."""
    return _status("Threads")


def syscall_errno(number: int, *args: int) -> int:
    """Make a raw syscall: 0 when it succeeded, else its errno (for probes)."""
    return 0 if _libc.syscall(number, *args) >= 0 else ctypes.get_errno()


def seccomp_filtered() -> bool:
    """This process already runs under a seccomp filter (a container runtime's, say)."""
    return _status("Seccomp") == 2  # SECCOMP_MODE_FILTER
