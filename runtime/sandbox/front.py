"""Harness's own sandbox: Landlock from the start, a seccomp filter once the engine is ready.

`confine`: Landlock binds the calling thread and what it starts later, so it is applied right
after the configuration is read, before harness starts any thread or the engine: every
thread, the engine's stage 2 and the engine itself inherit it (the engine's own, narrower
domain is nested in it). From then on harness reads only the system, its code, the model and
signature, its secrets and TLS files; it writes only the engine's private runtime dir and
/dev/shm (both for the engine's sake). Not the rest of the filesystem: a front taken over
through its TLS or HTTP handling cannot plant files or read other mounted secrets.

`apply`: once the engine is ready harness only serves: it never starts another program,
mounts, traces, loads BPF, enters a new namespace or opens raw sockets. A filter on every
thread (TSYNC) refuses exactly that and allows the rest: a deny list, not a profile, because
the front's rarer paths (certificate rotation, OTLP export, drain) must not fail on a syscall
a recording missed. The engine already runs and is not affected. Refused calls go to a
supervisor process of their own (runtime/sandbox/front_reporter.py), which answers EPERM and
reports each as a `seccomp_violation` with `scope: front`; where it cannot start, the filter
refuses with a plain EPERM and the report says that refusals go unreported.

In a container, the runtime's profile already refuses what it does not list, silently: its
default is TRACE (ENOSYS with no tracer), the one action below the engine filter's
notifications. When harness knows that profile (`sandbox.container_profile`), its filter is
the same allowlist less the deny list above, with everything else notified: the calls the
container would refuse are refused the same, one step earlier, and reported. Calls newer than
any the profile names keep their ENOSYS without an event, as in the engine's filter (a newer
libc probes them and falls back).

Why one module of this size: harness's own confinement is one policy in two halves
(`confine` at start, `apply` once ready) over the same paths and rules, and the container
profile it must fit; the supervisor that reports refusals is its own module
(front_reporter.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp

from runtime import telemetry
from runtime.config import Config
from runtime.errors import ConfigError, SandboxError
from runtime.sandbox import _linux, landlock, stage_plan
from runtime.sandbox.seccomp import bpf, oci, policy

# Nothing the front does after startup needs a new program.
NO_EXEC = ("execve", "execveat")
DENIED = (*policy.FIXED_DENY, *NO_EXEC)
_AF_PACKET = 17
_SOCK_PACKET = 10  # the obsolete packet socket type, in any family
_RAW_TYPES = (socket.SOCK_RAW, _SOCK_PACKET)


ENGINE_SHM = "the engine's /dev/shm (its mount namespace)"
ENGINE_PROC = "the engine's /proc (its PID namespace)"

# Where the images keep the shipped profiles (the Containerfiles copy seccomp/ there).
IMAGE_PROFILES = Path("/usr/share/harness/seccomp")
_IMAGE_PROFILE = {"cpu": "harness-cpu.json", "cuda": "harness-gpu.json"}


@dataclass(frozen=True)
class ContainerProfile:
    """The seccomp profile the container runtime applied to harness, when harness knows it."""

    profile: oci.Profile | None
    source: str  # its path, or why there is none

    def report(self) -> dict[str, Any]:
        key = "container_profile" if self.profile is not None else "container_profile_unknown"
        return {key: self.source}

    def describe(self, cfg: Config) -> dict[str, Any]:
        """harness's own filter, loaded once the engine is ready (`harness check`)."""
        if cfg.sandbox.seccomp == "off":
            return {"status": "off (unsafe)"}
        return {
            "status": "enforced",
            "mode": "container_profile" if self.profile is not None else "deny_list",
            **self.report(),
            "denied": list(DENIED),
            "violations": "seccomp_violation events, scope front",
        }


def container_profile(cfg: Config) -> ContainerProfile:
    """`sandbox.container_profile`, read and compiled (not loaded) at startup, before harness
    confines itself: one that does not parse or compile, or that is no allowlist, is exit 2
    now rather than after the engine has loaded."""
    setting = cfg.sandbox.container_profile
    if setting == "off":
        return ContainerProfile(None, "sandbox.container_profile = off")
    if setting == "auto":
        if not _linux.seccomp_filtered():
            return ContainerProfile(None, "harness started under no seccomp filter")
        if not _shipped_profile_applies():
            return ContainerProfile(
                None, "the filter harness started under is not the shipped container profile"
            )
        path = IMAGE_PROFILES / _IMAGE_PROFILE[cfg.engine.device]
        if not path.is_file():
            return ContainerProfile(
                None, f"no {path} here (auto reads the image's copy of the shipped profile)"
            )
    else:
        path = Path(setting)
    profile = oci.load_profile(path)
    if profile.default_action in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG"):
        raise ConfigError(
            f"sandbox.container_profile: {path}: its default action is "
            f"{profile.default_action}: a deny list, which harness's filter cannot stand within",
            fix="give the allowlist profile the container runtime applies, or set "
            'sandbox.container_profile = "off"',
        )
    try:
        _within(profile, pyseccomp.ERRNO(errno.EPERM))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"sandbox.container_profile: {path}: libseccomp refuses it: {exc}",
            fix="check the profile with `harness seccomp check`, or set "
            'sandbox.container_profile = "off"',
        ) from exc
    return ContainerProfile(profile, str(path))


def _shipped_profile_applies() -> bool:
    """The runtime applied the shipped profile, or one that refuses as it does: times(2),
    which it does not list and every runtime's default profile allows, comes back ENOSYS.
    Under Docker's, podman's or Kubernetes' RuntimeDefault it succeeds, and harness keeps its
    deny list rather than hold itself to a profile that is not the one in force."""
    number = bpf.syscall_number("times")
    return number is not None and _linux.syscall_errno(number, 0) == errno.ENOSYS


def confine(
    cfg: Config,
    runtime_root: Path,
    engine_shm: str | None = None,
    engine_proc: str | None = None,
) -> dict[str, Any]:
    """Landlock on harness itself (sandbox.landlock decides, as for the engine). Returns the
    report; raises SandboxError (exit 5) when `required` cannot be met."""
    mode = cfg.sandbox.landlock
    threads = len(os.listdir("/proc/self/task"))
    try:
        if threads != 1 and mode != "off":  # the others would stay outside the domain
            raise OSError(
                errno.EBUSY, f"{threads} threads already run: Landlock would bind only this one"
            )
        if mode != "off":  # no_new_privs: Landlock's condition without CAP_SYS_ADMIN
            _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
        applied = landlock.apply(landlock.build_front(cfg, runtime_root, engine_shm, engine_proc))
        report = stage_plan.fields(applied)
        if applied.enforced:  # named by a descriptor: say what it is
            rules = report["filesystem"]
            for kind, path, label in (
                ("write", engine_shm, ENGINE_SHM),
                ("read_execute", engine_proc, ENGINE_PROC),
                ("write_files", engine_proc, ENGINE_PROC),
            ):
                if path and path in rules.get(kind, []):
                    rules[kind][rules[kind].index(path)] = label
    except OSError as exc:
        if mode == "required":
            raise SandboxError(
                f"sandbox.landlock = required: harness cannot confine itself: {exc.strerror}",
                fix="run on a kernel with Landlock enabled (lsm=landlock), or set "
                "sandbox.landlock = best_effort",
            ) from exc
        report = {"mode": mode, "enforced": False, "reason": exc.strerror}
    return {"scope": "front", **report}


def _violation_event(record: dict[str, Any]) -> None:
    telemetry.emit("seccomp_violation", "blocked", **record)


def _probes_event(probes: dict[str, int]) -> None:
    if probes:
        telemetry.emit(
            "seccomp_startup_probes",
            "blocked",
            scope="front",
            mode="enforce",
            probes=probes,
            meaning="known probes of the front as its event loop started (uvloop's io_uring), "
            "refused without an alert; from now on the same calls are seccomp_violation events",
        )


def _reporter_gone() -> None:
    telemetry.emit(
        "seccomp_install",
        "failed",
        scope="front",
        reason="the front filter's supervisor process exited: harness's refused calls now "
        "fail with ENOSYS and are no longer reported",
    )


class _Reporter:
    """The supervisor process and harness's end of its socket (see front_reporter.py)."""

    def __init__(self) -> None:
        self.channel, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.sandbox.front_reporter", "--channel-fd",
                 str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            self.channel.close()
            raise
        finally:
            theirs.close()

    def hand_over(self, listener: int) -> bool:
        try:
            socket.send_fds(self.channel, [b"L"], [listener])
        except OSError:
            return False  # it died first: with the listener closed, refusals are ENOSYS
        finally:
            os.close(listener)  # harness keeps no way to answer its own calls
        return True

    def relay(
        self,
        on_violation: Callable[[dict[str, Any]], None],
        on_probes: Callable[[dict[str, int]], None],
        on_gone: Callable[[], None],
    ) -> None:
        """A thread that turns the supervisor's lines into events; EOF means it is gone."""

        def run() -> None:
            with self.channel.makefile("rb") as lines:
                for line in lines:
                    record = json.loads(line)
                    if "startup_probes" in record:
                        on_probes(record["startup_probes"])
                    else:
                        on_violation(record)
            self.proc.wait()
            on_gone()

        threading.Thread(target=run, name="front-seccomp-events", daemon=True).start()


# The running supervisor process, told by `serving()` that the front's loop runs.
_current: _Reporter | None = None


def serving() -> None:
    """The front's event loop runs: from now on every refused call is an alert."""
    if _current is not None:
        with contextlib.suppress(OSError):  # it is gone, and harness has said so (on_gone)
            _current.channel.sendall(b"serving\n")


def apply(
    container: ContainerProfile | None = None,
    on_violation: Callable[[dict[str, Any]], None] = _violation_event,
    on_gone: Callable[[], None] = _reporter_gone,
    on_probes: Callable[[dict[str, int]], None] = _probes_event,
) -> dict[str, Any]:
    """Install the filter on every thread of this process. Returns the report. Until
    `serving()`, the known startup probes are counted, not alerted."""
    global _current
    within = container.profile if container is not None else None
    try:
        reporter: _Reporter | None = _Reporter()
    except OSError:
        reporter = None
    report: dict[str, Any] | None = None
    if reporter is not None:
        try:
            report = _load(True, within)
        except OSError:  # a listener already above harness: only one per process tree
            reporter.proc.kill()
            reporter = None
    if report is None:
        report = _load(False, within)
    if container is not None:
        report.update(container.report())
    if reporter is None:
        report["violations"] = "EPERM, not reported: the supervisor process could not start"
    elif reporter.hand_over(report.pop("listener")):
        reporter.relay(on_violation, on_probes, on_gone)
        _current = reporter
        report["violations"] = "seccomp_violation events, scope front"
        report["supervisor_pid"] = reporter.proc.pid
    else:
        report["violations"] = "ENOSYS, not reported: the supervisor process exited at once"
    return report


def _load(notify: bool, within: oci.Profile | None) -> dict[str, Any]:
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    refuse = pyseccomp.NOTIFY if notify else pyseccomp.ERRNO(errno.EPERM)
    if within is not None:
        flt, extra = _within(within, refuse)
    else:
        flt, extra = _deny_list(refuse), {"mode": "deny_list"}
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)  # every thread, not just this one
    flt.load()
    listener: dict[str, int] = {}
    if notify:  # pyseccomp has no public accessor for the listener fd
        listener["listener"] = int(pyseccomp._libseccomp.seccomp_notify_fd(flt._filter))
    return {
        **listener,
        "scope": "front",
        **extra,
        "installed": True,
        "threads": "all (TSYNC)",
        "denied": [n for n in DENIED if bpf.syscall_number(n) is not None],
        "denied_sockets": ["AF_PACKET", "SOCK_RAW", "SOCK_PACKET"],
        "denied_clone_flags": hex(policy.CLONE_NAMESPACES),
        "no_new_privs": True,
    }


def _deny_list(refuse: int) -> Any:
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in DENIED:
        if bpf.syscall_number(name) is not None:
            flt.add_rule(refuse, name)
    # New namespaces through clone(2) (unshare is on the deny list already).
    for bit in range(64):
        if policy.CLONE_NAMESPACES & (1 << bit):
            flt.add_rule(refuse, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 1 << bit, 1 << bit))
    # Raw and packet sockets: the front speaks TCP and Unix sockets only.
    flt.add_rule(refuse, "socket", pyseccomp.Arg(0, pyseccomp.EQ, _AF_PACKET))
    for kind in _RAW_TYPES:
        flt.add_rule(
            refuse, "socket", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, policy.SOCK_TYPE_MASK, kind)
        )
    return flt


def _within(profile: oci.Profile, refuse: int) -> tuple[Any, dict[str, Any]]:
    """The container's allowlist less the deny list; the rest refused (`refuse`)."""
    flt = pyseccomp.SyscallFilter(refuse)
    flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    arch = oci.native_arch()
    withheld = {*DENIED, *policy.ALWAYS_ALLOW, *policy.ENOSYS_ALWAYS}
    highest, allowed = 0, set()
    for rule in profile.rules:
        numbers = [bpf.syscall_number(name) for name in rule.names]
        highest = max([highest, *(n for n in numbers if n is not None)])
        if rule.action != "SCMP_ACT_ALLOW" or not oci.applies(rule, arch, frozenset()):
            continue  # the container's own ERRNO rules win over any notification anyway
        for name, number in zip(rule.names, numbers, strict=True):
            if number is None or name in withheld:
                continue
            if name == "socket" and not _plain_socket(rule):
                continue
            flt.add_rule(pyseccomp.ALLOW, name, *bpf.rule_args(rule))
            allowed.add(name)
    for name in policy.ALWAYS_ALLOW:
        args = [bpf.no_namespaces()] if name == "clone" else []
        flt.add_rule(pyseccomp.ALLOW, name, *args)
    for name in policy.ENOSYS_ALWAYS:
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
    ruled = bpf.profile_numbers([*DENIED, *policy.ALWAYS_ALLOW, *policy.ENOSYS_ALWAYS])
    for number in range(highest + 1, policy.STUB_END):
        if number not in ruled:
            flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), number)
    return flt, {"mode": "container_profile", "allowed": len(allowed), "enosys_from": highest + 1}


def _plain_socket(rule: oci.Rule) -> bool:
    """A socket rule that names its family (not AF_PACKET) and its type (not SOCK_RAW or
    SOCK_PACKET): the front keeps it. Any other is refused."""
    args = {(a.index, a.op): a for a in rule.args}
    family = args.get((0, "SCMP_CMP_EQ"))
    kind = args.get((1, "SCMP_CMP_MASKED_EQ"))
    return (
        family is not None
        and family.value != _AF_PACKET
        and kind is not None
        and kind.value == policy.SOCK_TYPE_MASK
        and kind.value_two not in _RAW_TYPES
    )
