"""Stage 2: a fresh, single-threaded process that applies the engine's sandbox plan and execs
vLLM (as `runc init` does). Never run from `preexec_fn`, never in a process with threads:
prctl, Landlock and seccomp act on the calling thread.

Order: enter the namespaces the helper made (user where unprivileged, mount, network, IPC;
runtime.sandbox.namespaces) -> rlimits, no_new_privs -> Landlock -> bounding set, uid/gid,
capabilities -> parent-death signal (after the uid change, which clears it) -> seccomp ->
report -> execve.

Protocol: the plan arrives as JSON on the inherited fd `--plan-fd`. One JSON report goes back
on the Unix socket `--report-fd`, then EOF; it carries the seccomp listener fd when there is
one (SCM_RIGHTS), and {"error": ...} when a step failed and nothing was exec'd.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

# Everything stage 2 runs is imported before Landlock, which may hide harness's own files.
from runtime.sandbox import _linux, landlock, namespaces, privileges, seccomp


def _timed(step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.monotonic()
    report = step()
    report["seconds"] = round(time.monotonic() - started, 6)
    return report


def die_with(parent: int) -> dict[str, Any]:
    """SIGKILL when harness dies, whatever kills it: the engine never serves on without its
    front and supervisor. Kept across execve (vLLM is no set-uid program); a credential
    change clears it, so it comes after the privilege drop. If harness is already gone, the
    signal would never come: stop here."""
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        raise OSError(errno.ESRCH, "harness exited before the engine started")
    return {"parent_death_signal": "SIGKILL"}


def apply(plan: dict[str, Any]) -> tuple[dict[str, Any], seccomp.Compiled | None]:
    """Every step of the plan up to seccomp, which is compiled here and loaded by the caller
    right before the hand-off. Raises with the report so far on a failure: the caller must
    then not exec (fail closed)."""
    report: dict[str, Any] = {}
    parent = os.getppid()
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("namespaces", lambda: namespaces.enter(plan["namespaces"])),
        ("privileges", lambda: privileges.prepare(plan["privileges"])),
        ("landlock", lambda: landlock.apply(plan["landlock"])),
        ("privileges", lambda: privileges.drop(plan["privileges"])),
        ("privileges", lambda: die_with(parent)),
    ]
    if plan.get("record_only"):  # `harness profile --container`: harness itself, filtered
        steps = [("privileges", lambda: privileges.prepare({}))]
    for key, step in steps:
        try:
            report[key] = {**report.get(key, {}), **_timed(step)}
        except OSError as exc:
            raise StageError(f"{key}: {exc}", report) from exc
    try:
        report["seccomp"], compiled = seccomp.prepare(plan["seccomp"])
    except (OSError, ValueError) as exc:
        raise StageError(f"seccomp: {exc}", report) from exc
    return report, compiled


class StageError(Exception):
    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.sandbox.exec")
    parser.add_argument("--plan-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args()
    with os.fdopen(args.plan_fd, "rb") as plan_file:
        plan = json.loads(plan_file.read())
    channel = socket.socket(fileno=args.report_fd)
    channel.set_inheritable(False)  # the engine never holds a way back to harness
    try:
        report, compiled = apply(plan)
        message = json.dumps(report).encode()
        listener = seccomp.load(compiled) if compiled is not None else None
    except (StageError, OSError) as exc:
        partial = exc.report if isinstance(exc, StageError) else report
        channel.sendall(json.dumps({"error": str(exc), **partial}).encode())
        return 5
    # From here on every syscall is filtered: hand the listener over first (HANDOFF_ALLOW).
    if listener is not None:
        socket.send_fds(channel, [message], [listener])
        os.close(listener)
    else:
        channel.sendall(message)
    channel.shutdown(socket.SHUT_WR)
    os.chdir(plan["cwd"])
    try:
        os.execve(plan["argv"][0], plan["argv"], plan["env"])  # noqa: S606 - argv, no shell
    except OSError as exc:
        print(f"harness stage-2: execve {plan['argv'][0]}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(main())
