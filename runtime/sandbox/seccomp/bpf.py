"""A profile compiled with libseccomp (pyseccomp) into the BPF that stage 2 loads: the
profile's allowlist with harness's fixed rules on top (policy.py), and the stage-2 plan that
carries it. Stage 2 itself needs no libseccomp.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyseccomp

from runtime.sandbox.seccomp.oci import (
    OPS,
    Profile,
    Rule,
    applies,
    invalid,
    native_arch,
    parse_profile,
)
from runtime.sandbox.seccomp.policy import (
    ALWAYS_ALLOW,
    CLONE_NAMESPACES,
    ENOSYS_ALWAYS,
    FIXED_DENY,
    HANDOFF_ALLOW,
    SELF_ONLY,
    STUB_END,
)
from runtime.sandbox.stage_plan import SeccompPlan


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
    return [pyseccomp.Arg(a.index, OPS[a.op], a.value, a.value_two) for a in rule.args]


def _self_only(name: str, rule: Rule) -> list[Any]:
    # A profile's own check on the same argument stands (libseccomp takes one per argument).
    taken = {a.index for a in rule.args}
    return [pyseccomp.Arg(i, pyseccomp.EQ, v) for i, v in SELF_ONLY[name] if i not in taken]


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
        raise invalid(profile.source, "architectures", f"{arch} (this machine) is not listed")
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
