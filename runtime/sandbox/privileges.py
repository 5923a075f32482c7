"""Privileges of the engine: plan (pure) and apply (in stage 2, single-threaded, before exec).

Order (each step needs what the next one removes): rlimits -> no_new_privs -> (Landlock) ->
drop the bounding set (needs CAP_SETPCAP, so before the uid change) -> setgroups/setresgid/
setresuid -> clear ambient and inheritable capabilities -> (seccomp).
no_new_privs makes setuid binaries and file capabilities inert for the engine and everything
it execs. The engine stays dumpable: execve resets the flag (its uid no longer changes at exec),
and the CUDA driver must write its own /proc/<pid>/task/<tid>/comm, which a non-dumpable
process does not own. RLIMIT_CORE 0 stops core files; the seccomp deny list stops ptrace and
process_vm_*, and Landlock keeps its processes from tracing anything outside the sandbox.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.errors import SandboxError
from runtime.sandbox import _linux
from runtime.sandbox.stage_plan import PrivilegesPlan, PrivilegesReport

if TYPE_CHECKING:  # stage 2 imports this module: no pydantic there
    from runtime.config import EngineSection


def build(engine: EngineSection, euid: int) -> PrivilegesPlan:
    if euid != 0 or engine.unsafe_run_as_root:  # cannot (or may not) change uid
        return PrivilegesPlan(uid=None, gid=None, max_tasks=engine.max_tasks)
    return PrivilegesPlan(uid=engine.uid, gid=engine.gid, max_tasks=engine.max_tasks)


def describe(engine: EngineSection, euid: int) -> dict[str, Any]:
    """What stage 2 will leave the engine with (`harness check`)."""
    drop = build(engine, euid)
    return {
        "status": "enforced" if drop.uid is not None or euid != 0 else "uid 0 (unsafe)",
        "uid": drop.uid if drop.uid is not None else euid,
        "gid": drop.gid if drop.gid is not None else os.getegid(),
        "capabilities": "none (bounding, ambient, inheritable, permitted, effective)",
        "no_new_privs": True,
        "rlimits": {"core": 0},
    }


def prepare(plan: PrivilegesPlan | None) -> PrivilegesReport:
    """Stage 2, first: what must hold before Landlock (which needs no_new_privs). The task
    cap counts per real uid (in the engine's user namespace, only its own tasks); as root it
    starts to count at the uid change."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dumps of weights or keys
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limits: dict[str, Any] = {"core": 0, "nofile": hard}
    tasks = plan.max_tasks if plan is not None else None
    if tasks is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))
        limits["nproc"] = tasks
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    return PrivilegesReport(rlimits=limits, no_new_privs=_no_new_privs())


def drop(plan: PrivilegesPlan, report: PrivilegesReport | None = None) -> PrivilegesReport:
    """Stage 2, after Landlock: `report` (prepare's) with what was enforced; raises OSError
    on a failure that must stop the start (fail closed)."""
    bounding_set = _drop_bounding_set()
    if plan.uid is not None:
        gid = plan.gid if plan.gid is not None else plan.uid
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    _linux.prctl(_linux.PR_CAP_AMBIENT, _linux.PR_CAP_AMBIENT_CLEAR_ALL)
    _linux.clear_capabilities()
    return dataclasses.replace(
        report or PrivilegesReport(rlimits={}, no_new_privs=_no_new_privs()),
        bounding_set=bounding_set,
        uid=os.getuid(),
        gid=os.getgid(),
        groups=os.getgroups(),
        capabilities="none",
    )


def _no_new_privs() -> bool:
    return _linux.prctl(_linux.PR_GET_NO_NEW_PRIVS) == 1


def _drop_bounding_set() -> str:
    held = [
        c
        for c in range(_linux.last_capability() + 1)
        if _linux.prctl(_linux.PR_CAPBSET_READ, c) == 1
    ]
    if not held:
        return "empty"
    try:
        for cap in held:
            _linux.prctl(_linux.PR_CAPBSET_DROP, cap)
    except PermissionError:
        # Without CAP_SETPCAP (not root) the bounding set cannot shrink; no_new_privs and an
        # empty permitted set still keep the engine from gaining any of them.
        return f"unchanged ({len(held)} capabilities): no CAP_SETPCAP"
    return "empty"


def first_unreachable(paths: list[Path], uid: int, gid: int) -> str | None:
    """The first folder on the way to `paths` that uid/gid cannot traverse, or a target it
    cannot read: the engine would fail later with a less helpful error. Reads modes only."""
    for target in paths:
        current = Path("/")
        for part in Path(os.path.realpath(target)).parts[1:]:
            if not _allowed(os.stat(current), uid, gid, 0o1):
                return (
                    f"{current} (mode {stat.S_IMODE(os.stat(current).st_mode):04o}) is not "
                    f"traversable by uid {uid}"
                )
            current = current / part
        if not _allowed(os.stat(current), uid, gid, 0o4):
            return f"{current} is not readable by uid {uid}"
    return None


def _allowed(st: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def check_reachable(engine: EngineSection, plan: PrivilegesPlan, *weights: Path) -> None:
    """The engine's uid can run its interpreter and read every folder of weights."""
    if plan.uid is None:
        return
    assert plan.gid is not None
    problem = first_unreachable([Path(engine.python), *weights], plan.uid, plan.gid)
    if problem:
        raise SandboxError(
            f"the engine runs as uid {plan.uid}, and {problem}",
            fix="make the interpreter, its virtual environment and the model readable by "
            "that uid (every parent folder needs o+x), or set engine.uid",
        )
