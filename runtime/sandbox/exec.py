"""Stage 2: a fresh, single-threaded process that applies the engine's sandbox plan and execs
vLLM (as `runc init` does). Never run from `preexec_fn`, never in a process with threads:
prctl, setns, Landlock and seccomp act on the calling thread alone.

It imports the standard library and harness's stage-2 modules only (runtime.sandbox:
stage_plan, _linux, namespaces, pidns, privileges, landlock): no pydantic, no libseccomp. harness
compiled the filter; here it is loaded as BPF.

Protocol: the plan (runtime.sandbox.stage_plan.StagePlan, strictly parsed) arrives as JSON on
the inherited fd `--plan-fd`. One report (stage_plan.StageReport, JSON) goes back on the
Unix socket `--report-fd`, then EOF; it carries the seccomp listener fd when there is one
(SCM_RIGHTS), and `error` when a step failed and nothing was exec'd (fail closed).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

# Everything stage 2 runs is imported before Landlock, which may hide harness's own files.
from runtime.sandbox import _linux, landlock, namespaces, pidns, privileges, stage_plan
from runtime.sandbox.stage_plan import StagePlan, StageReport


class StageError(Exception):
    def __init__(self, message: str, report: StageReport) -> None:
        super().__init__(message)
        self.report = report


def apply(plan: StagePlan) -> StageReport:
    """Every step before seccomp, in the order the kernel requires. Raises StageError with
    the report so far on a failure: the caller must then not exec."""
    report = StageReport()
    parent = os.getppid()

    def step(section: str, action: Callable[[Any], Any]) -> None:
        """`action` takes the section's report so far (or None) and returns it updated."""
        nonlocal report
        started = time.monotonic()
        before = getattr(report, section)
        try:
            done = action(before)
        except OSError as exc:
            raise StageError(f"{section}: {exc}", report) from exc
        spent = time.monotonic() - started + (before.seconds or 0.0 if before else 0.0)
        report = replace(report, **{section: replace(done, seconds=round(spent, 6))})

    # setns into a user namespace, and Landlock's and seccomp's thread scope, need one thread.
    if _linux.threads() != 1:
        raise StageError("stage 2 must be single-threaded", report)
    spaces, drop, fence = plan.namespaces, plan.privileges, plan.landlock
    if spaces is None or drop is None or fence is None:
        # `harness profile --container`: harness itself under the recording filter, with
        # only no_new_privs (which loading a filter without CAP_SYS_ADMIN requires).
        step("privileges", lambda _: privileges.prepare(None))
        return report
    # 1. The namespaces first: the user namespace grants the rights to enter the others,
    #    and Landlock, once applied, forbids entering a mount namespace.
    step("namespaces", lambda _: namespaces.enter(spaces))
    # 2. rlimits (no core dumps, the task cap) and no_new_privs, which Landlock requires of a
    #    process without CAP_SYS_ADMIN.
    step("privileges", lambda _: privileges.prepare(drop))
    # 3. In a PID namespace, only stage 2's children are inside: from here on this process
    #    is the engine, and stage 2's own waits for it (pidns.py).
    if "pid" in spaces.fds:
        step("namespaces", lambda r: replace(r, pid_in_namespace=pidns.fork_engine(drop, plan)))
        parent = 0  # the waiter, outside the namespace: the engine dies with it
    # 4. Landlock before the uid change: each rule is made by opening its path, which the
    #    engine's uid may not be able to reach.
    step("landlock", lambda _: landlock.apply(fence))
    # 5. Leave root and every capability, before the parent-death signal, which a credential
    #    change clears.
    step("privileges", lambda r: privileges.drop(drop, r))
    # 6. Die with harness (or the waiter) (SIGKILL), kept across execve.
    step("privileges", lambda r: replace(r, parent_death_signal=die_with(parent)))
    return report


def die_with(parent: int) -> str:
    """SIGKILL when harness dies, whatever kills it: the engine never serves on without its
    front and supervisor. Kept across execve (vLLM is no set-uid program); a credential
    change clears it, so it comes after the privilege drop. If harness is already gone, the
    signal would never come: stop here."""
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        raise OSError(errno.ESRCH, "harness exited before the engine started")
    return "SIGKILL"


def load_filter(plan: StagePlan) -> int | None:
    """7. The seccomp filter, last: nothing above may need a call it refuses. Returns the
    notification listener, which the caller hands to harness before anything else."""
    if not plan.seccomp.bpf:
        return None
    try:
        return _linux.seccomp_filter(plan.seccomp.bpf, listener=plan.seccomp.notify)
    except OSError as exc:
        if plan.seccomp.notify and exc.errno in (errno.EBUSY, errno.ECANCELED):
            # Only one filter in a process's ancestry may have a listener.
            raise OSError(
                exc.errno,
                "a seccomp filter with a notification listener is already installed above "
                "harness (a container runtime's, or a recording); use sandbox.seccomp = "
                '"kill", which needs no listener',
            ) from exc
        raise


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.sandbox.exec")
    parser.add_argument("--plan-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args()
    with os.fdopen(args.plan_fd, "rb") as plan_file:
        data = plan_file.read()
    channel = socket.socket(fileno=args.report_fd)
    channel.set_inheritable(False)  # the engine never holds a way back to harness
    report = StageReport()
    try:
        plan = stage_plan.from_json(data)
        report = apply(plan)
    except (StageError, OSError, ValueError) as exc:
        partial = exc.report if isinstance(exc, StageError) else report
        channel.sendall(stage_plan.report_to_json(replace(partial, error=str(exc))))
        return 5
    # Encoded before the filter is loaded: after it, only the hand-off's own calls are sure
    # to pass before harness's supervisor holds the listener.
    report = replace(report, seccomp=plan.seccomp.report)
    message = stage_plan.report_to_json(report)
    try:
        listener = load_filter(plan)
    except OSError as exc:  # say that it did not load, not only what was compiled
        failed = {**plan.seccomp.report, "installed": False}
        channel.sendall(
            stage_plan.report_to_json(replace(report, seccomp=failed, error=f"seccomp: {exc}"))
        )
        return 5
    # From here on every syscall is filtered: hand the listener over first (HANDOFF_ALLOW).
    if listener is not None:
        socket.send_fds(channel, [message], [listener])
        os.close(listener)
    else:
        channel.sendall(message)
    channel.shutdown(socket.SHUT_WR)
    os.chdir(plan.cwd)
    try:
        os.execve(plan.argv[0], plan.argv, plan.env)  # noqa: S606 - argv, no shell
    except OSError as exc:
        print(f"harness stage-2: execve {plan.argv[0]}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(main())
