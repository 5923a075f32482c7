"""Stage 2 in the engine's PID namespace, so that the engine sees and signals only its own
processes.

The helper (runtime/sandbox/namespaces.py) made the namespace, and its init has mounted a
procfs of its own there; stage 2 entered it with setns, which places stage 2's children in it,
not stage 2 itself. So stage 2 forks here:
- the **engine** (pid 2 in the namespace, init being 1) goes on with stage 2 and execs vLLM;
- the **waiter**, stage 2's own process, the one harness started and watches, stays in
  harness's PID namespace: it leaves root and its capabilities, loads the engine's profile as
  a kill-on-anything-else filter, waits for the engine, and ends the way the engine ended
  (exit code, or the same signal), so that harness sees the engine's exit.
harness signals the engine's whole process group, so the engine gets its SIGTERM directly:
the waiter ignores it. If harness dies the waiter gets SIGKILL (its parent-death signal), and
the engine dies with the waiter (its own); init ends with harness's lifeline, and the kernel
then kills whatever is left in the namespace.
"""

from __future__ import annotations

import os
import signal

from runtime.sandbox import _linux, privileges
from runtime.sandbox.stage_plan import PrivilegesPlan, StagePlan


def fork_engine(drop: PrivilegesPlan, plan: StagePlan) -> int:
    """Returns in the engine only, its pid in the namespace; the waiter never returns."""
    harness = os.getppid()
    engine = os.fork()
    if engine:
        _waiter(engine, harness, drop, plan.seccomp.guard)
    return os.getpid()


def _waiter(engine: int, harness: int, drop: PrivilegesPlan, guard: bytes) -> None:
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the group's signals reach the engine itself
        # Nothing of stage 2's stays open for the engine's lifetime (the report socket, the
        # namespaces' fds): only stdio.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        privileges.drop(drop)
        _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change clears it
        if os.getppid() != harness:  # the engine sees this too (its parent changes) and stops
            _say("harness exited before the engine started")
            os._exit(125)
        if guard:
            _linux.seccomp_filter(guard, listener=False)
        _pid, status = os.waitpid(engine, 0)
        _end_like(status)
    except BaseException as exc:  # said, then the exit below
        _say(f"{type(exc).__name__}: {exc}")
    finally:
        os._exit(126)  # never back into stage 2's code: only the engine returns


def _say(what: str) -> None:
    """One line on stderr (harness tags and relays it): the waiter's own failures must not
    pass for the engine's."""
    os.write(2, f"harness stage-2 waiter: {what}\n".encode())


def _end_like(status: int) -> None:
    """Exit as the engine did: by the same signal, or with the same code."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        _linux.prctl(_linux.PR_SET_DUMPABLE, 0)  # one crash report (the engine's), not two
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
