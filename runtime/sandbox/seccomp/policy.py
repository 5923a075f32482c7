"""Harness's own seccomp rules for the engine, whatever its profile says: the fixed deny
list, what glibc needs, the calls the engine may aim at itself only, vLLM's startup probes and
the multi-GPU additions. Pure: no libseccomp (the numbers come from bpf.py); `own_thread` reads
/proc only.
"""

from __future__ import annotations

import os
import signal
from typing import Any

# Never allowed, whatever a recording saw: kernel attack surface or a way out of the sandbox
# (io_uring's operations bypass seccomp altogether).
FIXED_DENY = (
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    # The new mount API: the same powers as mount(2) by other calls.
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "pivot_root",
    "chroot",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
)
# glibc needs these whether or not a recording saw them: clone3 must fail with ENOSYS so that
# glibc falls back to clone (EPERM would break thread creation); denying rseq aborts glibc.
# clone only without CLONE_NAMESPACES (below). restart_syscall is how the kernel resumes a
# timed call (poll, nanosleep) that a signal interrupted: refused, that call comes back EPERM
# in a correct program, and a recording rarely sees it.
ALWAYS_ALLOW = ("clone", "rseq", "exit", "exit_group", "rt_sigreturn", "restart_syscall")
# clone(2) with any of these flags is unshare(2) by another name: a new user namespace opens
# kernel code that only its own "root" can reach, the usual way into the kernel. The engine's
# clone is allowed only without them; with them it is on the fixed deny list. (clone3 keeps
# its flags in memory seccomp cannot read: it is ENOSYS.) CLONE_NEWTIME is not among them: in
# clone(2) its bit is the exit signal.
CLONE_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
ENOSYS_ALWAYS = ("clone3",)
# Calls that change a process's limits, scheduling or I/O priority name their target. The engine
# may aim them at itself only, (index, value) pairs that must hold: pid 0 is the caller. In a pod
# the front runs under the engine's uid, and an engine free to name any pid lowered the front's
# open-files limit and parked it at SCHED_IDLE. Where a profile allows one of these, the engine
# modes allow pid 0 in the kernel; any other target goes to the supervisor, which lets a thread
# of the caller's own process through (`own_thread`: libzmq and OpenMP set their threads'
# scheduling by thread id, and libzmq aborts when refused) and refuses the rest (EPERM and an
# event). kill(2) is not here: vLLM signals its own workers by pid.
SELF_ONLY: dict[str, tuple[tuple[int, int], ...]] = {
    "prlimit64": ((0, 0),),
    "sched_setaffinity": ((0, 0),),
    "sched_setscheduler": ((0, 0),),
    "sched_setparam": ((0, 0),),
    "sched_setattr": ((0, 0),),
    "setpriority": ((0, 0), (1, 0)),  # PRIO_PROCESS, the caller
    "ioprio_set": ((0, 1), (1, 0)),  # IOPRIO_WHO_PROCESS, the caller
}  # the last pair names the target (events report it)
_PID_MAX = 1 << 22  # the kernel's limit for pid_max
# Stage 2 passes the listener fd to harness with sendmsg after the filter is loaded, before
# anyone answers notifications: that call, and the memory management Python may do on the
# way to it, must not need the supervisor.
HANDOFF_ALLOW = ("sendmsg", "brk", "mmap", "munmap")
# Syscall numbers above the profile's newest get ENOSYS (as runc does): a newer libc probing a
# syscall the profile predates falls back instead of failing with EPERM. Up to the end of the
# native table (x32 numbers start at 512).
STUB_END = 512
# socket(2)'s type argument carries SOCK_NONBLOCK/SOCK_CLOEXEC above the type itself.
SOCK_TYPE_MASK = 0xF

# vLLM's known startup probes: a stock start makes them and carries on without them. While the
# engine starts they are refused (in `complain` mode let through) without an alert and summed
# up in one `seccomp_startup_probes` event once it is ready; after that they are alerts.
_PROBE_DOMAINS = {2: "AF_INET", 10: "AF_INET6"}
_SOCK_DGRAM = 2


def startup_probe(name: str, args: Any) -> str | None:
    """The probe's label, if this call is one of vLLM's known startup probes. Pure."""
    if name == "io_uring_setup":  # is io_uring there? (on the fixed deny list)
        return name
    if name == "socket" and int(args[1]) & SOCK_TYPE_MASK == _SOCK_DGRAM:
        domain = _PROBE_DOMAINS.get(int(args[0]))
        if domain is not None:  # getting its own address by "connecting" a UDP socket
            return f"socket({domain}, SOCK_DGRAM)"
    return None


def own_thread(name: str, args: Any, caller: int) -> bool:
    """A SELF_ONLY call aimed at a thread of the caller's own process (`caller`: its thread
    id, as the supervisor sees it). Reads /proc: the supervisor checks afterwards that the
    caller still waits, so that the thread ids were not reused meanwhile."""
    pairs = SELF_ONLY.get(name)
    if pairs is None:
        return False
    *fixed, (index, _) = pairs
    if any(int(args[i]) != value for i, value in fixed):
        return False
    target = int(args[index])
    return 0 < target < _PID_MAX and _names_own_thread(caller, target)


def _names_own_thread(caller: int, target: int) -> bool:
    """`target` is one of the caller's threads as the caller names them: the last of its
    NSpid (in the engine's PID namespace, where it has one; otherwise harness's own ids)."""
    try:
        tasks = os.listdir(f"/proc/{caller}/task")
    except OSError:
        return False
    for task in tasks:
        ids = _nspid(f"/proc/{caller}/task/{task}/status")
        if ids is None:
            continue  # a thread that ended meanwhile
        if len(ids) == 1:  # no PID namespace of its own: the ids are harness's
            return str(target) in tasks
        if ids[-1] == target:
            return True
    return False


def _nspid(status_path: str) -> list[int] | None:
    try:
        with open(status_path) as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return [int(v) for v in line.split()[1:]]
    except OSError:
        return None
    return None


# What an engine of several GPUs needs beyond the shipped engine-cuda.json, added to it when
# engine.device is cuda, the engine has more than one rank and no sandbox.seccomp_profile is
# set. PREPARED FROM NCCL'S AND CUDA'S DOCUMENTED BEHAVIOUR, NOT YET RUN ON A GPU: record
# your own on a multi-GPU node (docs/deploy.md, On a GPU node) and set sandbox.seccomp_profile.
# - NCCL passes cuMem/IPC memory handles between ranks as file descriptors: over abstract
#   AF_UNIX datagram sockets with SCM_RIGHTS, or (NCCL_CUMEM with newer releases) by
#   pidfd_open + pidfd_getfd on the sibling rank. pidfd_getfd needs ptrace access to that
#   rank: same uid, dumpable (the engine is), and Yama's ptrace_scope 0 (1 allows only
#   descendants); it cannot reach harness: harness is not dumpable, and Landlock lets a
#   domain reach only its own or nested domains, never the parent harness's.
# - NCCL's shared-memory transport sizes its /dev/shm segments with fallocate; CUDA's
#   host-side IPC buffers may be memfd-backed.
# Each call missing from this list is refused with EPERM and reported as seccomp_violation.
MULTI_GPU_RULES: tuple[dict[str, Any], ...] = (
    {
        "names": ["pidfd_open", "pidfd_getfd", "memfd_create", "fallocate"],
        "action": "SCMP_ACT_ALLOW",
        "comment": "multi-GPU: NCCL handle passing, shared memory (not yet run on a GPU)",
    },
    {
        "names": ["socket"],
        "action": "SCMP_ACT_ALLOW",
        "args": [
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
            {"index": 1, "value": 15, "valueTwo": 2, "op": "SCMP_CMP_MASKED_EQ"},
        ],
        "comment": "multi-GPU: AF_UNIX, SOCK_DGRAM, NCCL's IPC socket (not yet run on a GPU)",
    },
)


def exit_event(returncode: int | None, *, mode: str) -> dict[str, Any] | None:
    """A `seccomp_violation` record for a process the kernel killed with SIGSYS (`kill`
    mode), or None. The kernel leaves no trace of which syscall it was."""
    if returncode is None or returncode != -signal.SIGSYS:
        return None
    return {"signal": "SIGSYS", "mode": mode, "action": "killed", "syscall": "unknown"}
