"""Seccomp for the engine: OCI profiles (the format Docker, podman and the kubelet read),
compiled with libseccomp (pyseccomp) and installed in stage 2 right before exec.

The kernel holds the allowlist. Everything else goes to a user-space supervisor in harness
(SECCOMP_RET_USER_NOTIF), which answers EPERM and emits a `seccomp_violation` event naming the
syscall and pid (`enforce`), or lets it through and reports it (`complain`). If the supervisor
dies, notified calls fail with ENOSYS: closed, not open. `kill` needs no supervisor: the kernel
kills the process. What each layer reports, and why: docs/sandbox.md.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyseccomp

from runtime import vllm_options
from runtime.errors import ConfigError
from runtime.sandbox.stage_plan import SeccompPlan

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


_ACTIONS = (
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
)
_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_NATIVE_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


@dataclass(frozen=True)
class ArgRule:
    index: int
    value: int
    value_two: int
    op: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "value": self.value, "op": self.op}
        if self.value_two:
            out["valueTwo"] = self.value_two
        return out


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[ArgRule, ...] = ()
    includes: dict[str, Any] = field(default_factory=dict)
    excludes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    source: str
    default_action: str
    default_errno_ret: int
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]


def _invalid(source: str, where: str, problem: str) -> ConfigError:
    return ConfigError(
        f"seccomp profile {source}: {where}: {problem}",
        fix="correct the profile (OCI runtime-spec linux.seccomp format), or record a new one "
        "with `harness profile`",
    )


def load_profile(path: Path) -> Profile:
    return parse_profile(_read(path), str(path))


def _read(path: Path) -> Any:
    """A profile file's JSON, or the ConfigError that names what is wrong with it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"seccomp profile {path}: no such file",
            fix="check the path (for the engine: sandbox.seccomp_profile), or record a profile "
            "with `harness profile`",
        ) from exc
    except (OSError, ValueError) as exc:
        raise _invalid(str(path), "file", f"not readable JSON ({exc})") from exc


def parse_profile(data: Any, source: str) -> Profile:
    """Validate the fields harness and runc understand; refuse anything it cannot enforce."""
    if not isinstance(data, dict):
        raise _invalid(source, "top level", "must be a JSON object")
    default = data.get("defaultAction")
    if default not in _ACTIONS:
        raise _invalid(source, "defaultAction", f"{default!r} is not one of {', '.join(_ACTIONS)}")
    default_errno = data.get("defaultErrnoRet", errno.EPERM)
    if not isinstance(default_errno, int) or not 0 < default_errno < 4096:
        raise _invalid(source, "defaultErrnoRet", f"{default_errno!r} is not an errno")
    arches = data.get("architectures", [])
    arch_map = data.get("archMap") or []
    if not arches and arch_map:
        arches = [a.get("architecture") for a in arch_map if isinstance(a, dict)]
    if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
        raise _invalid(source, "architectures", "must be a list of SCMP_ARCH_* names")
    raw_rules = data.get("syscalls", [])
    if not isinstance(raw_rules, list):
        raise _invalid(source, "syscalls", "must be a list")
    rules = tuple(_parse_rule(raw, f"syscalls[{i}]", source) for i, raw in enumerate(raw_rules))
    return Profile(source, default, default_errno, tuple(arches), rules)


def _parse_rule(raw: Any, where: str, source: str) -> Rule:
    if not isinstance(raw, dict):
        raise _invalid(source, where, "must be an object")
    names = raw.get("names", [raw["name"]] if "name" in raw else None)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _invalid(source, f"{where}.names", "must be a non-empty list of syscall names")
    action = raw.get("action")
    if action not in _ACTIONS:
        raise _invalid(source, f"{where}.action", f"{action!r} is not a seccomp action")
    errno_ret = raw.get("errnoRet")
    if errno_ret is not None and (not isinstance(errno_ret, int) or not 0 < errno_ret < 4096):
        raise _invalid(source, f"{where}.errnoRet", f"{errno_ret!r} is not an errno")
    args = []
    for j, arg in enumerate(raw.get("args") or []):
        here = f"{where}.args[{j}]"
        if not isinstance(arg, dict) or arg.get("op") not in _OPS:
            raise _invalid(source, here, f"op must be one of {', '.join(_OPS)}")
        index, value, two = arg.get("index"), arg.get("value", 0), arg.get("valueTwo", 0)
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise _invalid(source, f"{here}.index", "must be 0..5")
        if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in (value, two)):
            raise _invalid(source, here, "value and valueTwo must be unsigned 64-bit integers")
        args.append(ArgRule(index, value, two, arg["op"]))
    return Rule(
        tuple(names),
        action,
        errno_ret,
        tuple(args),
        raw.get("includes") or {},
        raw.get("excludes") or {},
    )


def native_arch() -> str:
    return _NATIVE_ARCH.get(platform.machine(), f"unsupported:{platform.machine()}")


def applies(rule: Rule, arch: str, caps: frozenset[str]) -> bool:
    """Docker's includes/excludes, for a process that holds `caps` (the engine: none)."""
    inc, exc = rule.includes, rule.excludes
    if inc.get("arches") and arch not in {f"SCMP_ARCH_{a.upper()}" for a in inc["arches"]}:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("minKernel"):
        want = tuple(int(x) for x in str(inc["minKernel"]).split(".")[:2])
        have = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
        if have < want:
            return False
    if exc.get("arches") and arch in {f"SCMP_ARCH_{a.upper()}" for a in exc["arches"]}:
        return False
    return not (exc.get("caps") and set(exc["caps"]) & caps)


def syscall_number(name: str) -> int | None:
    """The native number of `name`, or None when this libseccomp does not know it."""
    try:
        number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    except ValueError:
        return None
    # Negative: a name libseccomp knows for other architectures only (a pseudo-syscall).
    return number if number >= 0 else None


_CLONE_NR = syscall_number("clone")


def syscall_name(number: int) -> str:
    try:
        return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode()
    except ValueError:
        return f"syscall_{number}"


def _action_value(action: str, errno_ret: int) -> int:
    return {
        "SCMP_ACT_ALLOW": pyseccomp.ALLOW,
        "SCMP_ACT_ERRNO": pyseccomp.ERRNO(errno_ret),
        "SCMP_ACT_KILL": pyseccomp.KILL_THREAD,
        "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
        "SCMP_ACT_TRAP": pyseccomp.TRAP,
        "SCMP_ACT_TRACE": pyseccomp.TRACE(errno_ret),
        "SCMP_ACT_LOG": pyseccomp.LOG,
        "SCMP_ACT_NOTIFY": pyseccomp.NOTIFY,
    }[action]


def rule_args(rule: Rule) -> list[Any]:
    # OCI's MASKED_EQ: value is the mask, valueTwo the datum; libseccomp takes them that way.
    return [pyseccomp.Arg(a.index, _OPS[a.op], a.value, a.value_two) for a in rule.args]


def _self_only(name: str, rule: Rule) -> list[Any]:
    # A profile's own check on the same argument stands (libseccomp takes one per argument).
    taken = {a.index for a in rule.args}
    return [pyseccomp.Arg(i, pyseccomp.EQ, v) for i, v in SELF_ONLY[name] if i not in taken]


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


def no_namespaces() -> Any:
    return pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_NAMESPACES, 0)


def creates_namespace(nr: int, args: Any) -> bool:
    """A clone(2) call that asks for a namespace (the supervisor refuses it in every mode)."""
    return nr == _CLONE_NR and bool(args[0] & CLONE_NAMESPACES)


@dataclass
class Compiled:
    """A filter ready to load, and what went into it (for reports and `seccomp check`)."""

    filter: Any
    allowed: list[str]
    conditional: list[str]
    denied: list[str]
    unknown: list[str]
    skipped_rules: int
    stub_from: int | None
    notify: bool


def compile_profile(profile: Profile, mode: str = "as_written") -> Compiled:
    """Compile for the native arch. `as_written` keeps the profile's own actions (used by
    `seccomp check`); the engine modes add harness's fixed rules on top."""
    arch = native_arch()
    if profile.architectures and arch not in profile.architectures:
        raise _invalid(profile.source, "architectures", f"{arch} (this machine) is not listed")
    default = _action_value(profile.default_action, profile.default_errno_ret)
    fixed = mode != "as_written"
    if mode in ("enforce", "complain", "record"):
        default = pyseccomp.NOTIFY  # the supervisor answers, with the profile's errno
    elif mode == "kill":
        default = pyseccomp.KILL_PROCESS
    flt = pyseccomp.SyscallFilter(default)
    flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)  # binary tree: cost independent of rule order
    allowed: set[str] = set()
    conditional: set[str] = set()
    denied: set[str] = set()
    unknown: set[str] = set()
    skipped = 0
    highest = 0
    deny = set(FIXED_DENY) if fixed else set()
    special = set(ALWAYS_ALLOW) | set(ENOSYS_ALWAYS) if fixed else set()
    for rule in profile.rules:
        if not applies(rule, arch, frozenset()):
            skipped += 1
            continue
        action = _action_value(rule.action, rule.errno_ret or profile.default_errno_ret)
        if fixed and rule.action != "SCMP_ACT_ALLOW":
            continue  # in engine modes anything not allowed goes to the supervisor or kills
        for name in rule.names:
            number = syscall_number(name)
            if number is None:
                unknown.add(name)
                continue
            highest = max(highest, number)
            if name in deny or name in special:
                continue
            if action == default:
                continue  # libseccomp refuses rules that repeat the default
            args = rule_args(rule)
            if fixed and name in SELF_ONLY:
                args += _self_only(name, rule)
            flt.add_rule(action, name, *args)
            if rule.action == "SCMP_ACT_ALLOW":
                (conditional if args else allowed).add(name)
            else:
                denied.add(name)
    stub_from = None
    if fixed:
        for name in (*ALWAYS_ALLOW, *HANDOFF_ALLOW):
            if name == "clone":
                flt.add_rule(pyseccomp.ALLOW, name, no_namespaces())
                conditional.add(name)
            else:
                flt.add_rule(pyseccomp.ALLOW, name)
                allowed.add(name)
        for name in ENOSYS_ALWAYS:
            flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
        if mode != "record":  # a recording should see the newest syscalls the engine makes
            # Newer than anything the profile names: ENOSYS, as an older kernel would say,
            # except the fixed deny list, which the supervisor refuses and reports.
            stub_from = highest + 1
            fixed_numbers = set(profile_numbers(FIXED_DENY))
            for number in range(stub_from, STUB_END):
                if number not in fixed_numbers:
                    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), number)
    conditional -= allowed
    return Compiled(
        flt,
        sorted(allowed),
        sorted(conditional),
        sorted(denied),
        sorted(unknown),
        skipped,
        stub_from,
        notify=mode in ("enforce", "complain", "record"),
    )


def summarise(profile: Profile) -> dict[str, Any]:
    compiled = compile_profile(profile)
    return {
        "profile": profile.source,
        "default_action": profile.default_action,
        "default_errno": profile.default_errno_ret,
        "architectures": list(profile.architectures),
        "native_arch": native_arch(),
        "rules": len(profile.rules),
        "rules_not_applicable": compiled.skipped_rules,
        "allowed": len(compiled.allowed),
        "allowed_with_argument_checks": compiled.conditional,
        "other_actions": compiled.denied,
        "not_on_this_arch_or_unknown": compiled.unknown,
        "fixed_deny_list_allowed_by_profile": sorted(
            set(FIXED_DENY) & set(compiled.allowed) | set(FIXED_DENY) & set(compiled.conditional)
        ),
    }


# --- the stage-2 plan --------------------------------------------------------------------


def compile_plan(mode: str, profile_data: dict[str, Any], profile_path: str) -> SeccompPlan:
    """Compile the engine's filter here, in harness, as BPF for stage 2 to load: stage 2
    then needs no libseccomp (and no parsing of anything the profile says)."""
    if mode == "off":
        return SeccompPlan(mode, report={"mode": mode, "installed": False})
    profile = parse_profile(profile_data, profile_path)
    compiled = compile_profile(profile, mode)
    report = {
        "mode": mode,
        "installed": True,
        "profile": profile_path,
        "allowed": len(compiled.allowed),
        "allowed_with_argument_checks": compiled.conditional,
        "fixed_deny": len(FIXED_DENY),
        "enosys": [*ENOSYS_ALWAYS, f">= {compiled.stub_from}, but the fixed deny list"],
        "errno": profile.default_errno_ret,
        "default": {
            "enforce": "EPERM + seccomp_violation event",
            "complain": "allowed + seccomp_violation event (fixed deny list: EPERM)",
            "kill": "SIGSYS (the process is killed)",
            "record": "allowed and recorded",
        }[mode],
    }
    # Stage 2's waiting processes (runtime/sandbox/pidns.py) run the engine's profile too,
    # with no supervisor of their own: anything else kills them.
    guard = export_bpf(compile_profile(profile, "kill").filter) if mode != "record" else b""
    return SeccompPlan(
        mode, export_bpf(compiled.filter), compiled.notify, guard=guard, report=report
    )


def recording_plan() -> SeccompPlan:
    """`harness profile`: no rules of its own, so every syscall goes to the recording
    supervisor."""
    return compile_plan("record", {"defaultAction": "SCMP_ACT_ERRNO"}, "<recording>")


def export_bpf(flt: Any) -> bytes:
    """libseccomp's BPF program for `flt` (struct sock_filter[]), through a pipe: harness may
    write no file but its runtime dir, and a large program would fill the pipe's buffer, so
    a thread drains it."""
    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(read_fd, 1 << 16):
            chunks.append(data)

    reader = threading.Thread(target=drain, name="harness-bpf-export")
    reader.start()
    try:
        flt.export_bpf(_Fd(write_fd))
    finally:
        os.close(write_fd)
        reader.join()
        os.close(read_fd)
    return b"".join(chunks)


@dataclass(frozen=True)
class _Fd:
    fd: int

    def fileno(self) -> int:
        return self.fd


def profile_numbers(names: Iterable[str]) -> set[int]:
    return {n for n in map(syscall_number, names) if n is not None}


def shipped_profiles() -> list[Path]:
    """Where the recorded profiles live: the source tree, then the image's copy."""
    here = Path(__file__).resolve().parents[2] / "seccomp"
    return [here, Path("/usr/share/harness/seccomp")]


def profile_path(cfg: Any) -> Path:
    """The engine's profile: sandbox.seccomp_profile, or the shipped one for the device."""
    if cfg.sandbox.seccomp_profile is not None:
        return Path(cfg.sandbox.seccomp_profile)
    name = f"engine-{cfg.engine.device}.json"
    for folder in shipped_profiles():
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(
        f"sandbox.seccomp_profile: no profile given and no shipped {name} "
        f"(looked in {', '.join(str(f) for f in shipped_profiles())})",
        fix=f"record one on this kind of machine with `harness profile --config FILE --out "
        f"seccomp/{name}` and set sandbox.seccomp_profile; while you do, sandbox.seccomp = "
        f'"complain" with sandbox.seccomp_profile set to the nearest profile you have (such '
        f"as engine-cpu.json) reports what that profile would refuse",
    )


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


def engine_profile(cfg: Any) -> tuple[dict[str, Any], Path, bool]:
    """The engine's profile as OCI JSON, where it came from, and whether the multi-GPU
    rules (MULTI_GPU_RULES) were added to it."""
    path = profile_path(cfg)
    data = _read(path)
    multi = (
        cfg.sandbox.seccomp_profile is None
        and cfg.engine.device == "cuda"
        and vllm_options.ranks(cfg.engine.vllm) > 1
        and isinstance(data, dict)
    )
    if multi:
        data = {**data, "syscalls": [*data.get("syscalls", []), *MULTI_GPU_RULES]}
    return data, path, multi


def check_config(cfg: Any) -> Profile | None:
    """Fail at startup (exit 2), not in stage 2, when the configured profile is missing,
    malformed or does not compile here."""
    if cfg.sandbox.seccomp == "off":
        return None
    data, path, _ = engine_profile(cfg)
    profile = parse_profile(data, str(path))
    compile_profile(profile, cfg.sandbox.seccomp)
    return profile


def describe(cfg: Any) -> dict[str, Any]:
    """The engine's filter as `harness check` reports it."""
    mode = cfg.sandbox.seccomp
    if mode == "off":
        return {"status": "off (unsafe)", "mode": mode}
    data, path, multi_gpu = engine_profile(cfg)
    summary = summarise(parse_profile(data, str(path)))
    return {
        "status": "enforced" if mode in ("enforce", "kill") else "complain (reports only)",
        "mode": mode,
        "profile": summary["profile"],
        # Several GPUs: the shipped profile plus MULTI_GPU_RULES, not yet run on a GPU.
        "multi_gpu_rules": "added, not yet run on a GPU" if multi_gpu else "none",
        "allowed": summary["allowed"],
        "allowed_with_argument_checks": summary["allowed_with_argument_checks"],
        "fixed_deny_list": list(FIXED_DENY),
        "clone_namespace_flags_refused": hex(CLONE_NAMESPACES),
        "enosys": list(ENOSYS_ALWAYS),
    }


def exit_event(returncode: int | None, *, mode: str) -> dict[str, Any] | None:
    """A `seccomp_violation` record for a process the kernel killed with SIGSYS (`kill`
    mode), or None. The kernel leaves no trace of which syscall it was."""
    if returncode is None or returncode != -signal.SIGSYS:
        return None
    return {"signal": "SIGSYS", "mode": mode, "action": "killed", "syscall": "unknown"}
