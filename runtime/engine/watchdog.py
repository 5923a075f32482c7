"""The engine's memory watchdog: a thread of the front that polls the engine's processes about
once a second and stops the engine when they use more memory than the caps allow.

CPU memory is measured as PSS (proportional set size, from /proc/PID/smaps_rollup) summed over
the engine's processes: vLLM's API server, EngineCore and workers share torch's libraries and
shared-memory buffers, which a sum of RSS would count once per process (several times the real
use), while a sum of USS would miss them entirely. PSS splits each shared page among the
processes that map it, so the sum counts it once. Where smaps cannot be read (harness not root
and the engine under another uid), RSS is used for that process, an overestimate, and the event says
so. Files the engine writes to tmpfs (/dev/shm) are not mapped memory and not counted here; the
pod's cgroup limit counts them.

The engine's processes are its process tree and its process group (vLLM's children stay in
both); a process that leaves both by double-forking into a new session escapes this count, not
the pod's cgroup limit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psutil

from runtime import telemetry
from runtime.engine import resources
from runtime.engine.resources import MemoryCaps

if TYPE_CHECKING:
    from runtime.engine.process import Engine

POLL_S = 1.0
_MAX_FAILURES = 3  # consecutive measurement failures before the engine is stopped
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    pids: tuple[int, ...]
    cpu_bytes: int
    # "pss"; "pss+rss" where some process's smaps could not be read; "rss" when the RSS
    # alone was under the cap (and so was the PSS), or with no CPU memory cap (0 then)
    measure: str
    gpu_bytes: dict[int, int]  # per device
    gpu_pids_matched: bool = True
    tasks: int = 0  # processes and threads


def _parents_and_groups() -> tuple[dict[int, int], dict[int, int]]:
    """Every visible process's parent and process group, from one read of its /proc stat
    (psutil and a getpgid call per process took 2 ms a scan for 70 processes here)."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                data = stat.read()
            # `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            fields = data[data.rindex(b")") + 2 :].split()
            parent, group = int(fields[1]), int(fields[2])
        except (OSError, ValueError, IndexError):  # gone since the listing (empty, or ESRCH)
            continue
        parents[int(name)], groups[int(name)] = parent, group
    return parents, groups


def engine_pids(leader: int) -> set[int]:
    """The leader, its descendants, and the members of its process group."""
    parents, groups = _parents_and_groups()
    if leader not in parents:
        return set()
    group = {pid for pid, pgid in groups.items() if pgid == leader}
    tree = {leader}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree | group


def measure(pids: set[int], gpu: bool, cpu_cap: int | None = None) -> Usage:
    """The engine's memory against `cpu_cap` (bytes; None: no CPU memory cap, none summed).
    Memory is PSS, so that pages the engine's processes share count once; but PSS is costly
    to read (the kernel walks every mapping: 27 ms a second for an idle vLLM here, taken
    from the CPU the front and vLLM's API server share), and no process's PSS exceeds its
    RSS, which is cheap. So the RSS is summed first, and only a sum over the cap is measured
    again as PSS, which decides."""
    alive, tasks, rss = [], 0, 0
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            tasks += proc.num_threads()
            if cpu_cap is not None:
                rss += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        alive.append(pid)
    total, measured = rss, "rss"
    if cpu_cap is not None and rss > cpu_cap:
        total, fallback = 0, False
        for pid in alive:
            try:
                proc = psutil.Process(pid)
                try:
                    total += proc.memory_full_info().pss
                except psutil.AccessDenied:
                    total += proc.memory_info().rss
                    fallback = True
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        measured = "pss+rss" if fallback else "pss"
    gpu_bytes, matched = resources.gpu_usage(set(alive)) if gpu else ({}, True)
    return Usage(tuple(alive), total, measured, gpu_bytes, matched, tasks)


def exceeded(usage: Usage, caps: MemoryCaps) -> dict[str, Any] | None:
    """The event fields when `usage` is over a cap, else None. Pure."""
    if caps.cpu_bytes is not None and usage.cpu_bytes > caps.cpu_bytes:
        return {
            "resource": "cpu_memory",
            "setting": "engine.max_rss_bytes",
            "observed_bytes": usage.cpu_bytes,
            "cap_bytes": caps.cpu_bytes,
            "measure": usage.measure,
            "pids": list(usage.pids),
        }
    if caps.gpu_bytes is not None:
        for device, used in sorted(usage.gpu_bytes.items()):
            if used > caps.gpu_bytes:
                return {
                    "resource": "gpu_memory",
                    "setting": "engine.gpu_memory_limit",
                    "device": device,
                    "observed_bytes": used,
                    "cap_bytes": caps.gpu_bytes,
                    "measure": "nvml" if usage.gpu_pids_matched else "nvml_device",
                    "pids": list(usage.pids),
                }
    return None


class MemoryWatchdog:
    """Polls while the engine runs; over a cap: one `memory_cap_exceeded` event, SIGKILL to the
    engine's process group, and `on_exceeded(reason)` so that the exit says why. Memory that
    keeps growing leaves no time for a graceful stop; the front then sees the engine die and
    exits 6 as for any engine death."""

    def __init__(
        self,
        caps: MemoryCaps,
        leader: Callable[[], int | None],
        on_exceeded: Callable[[str], None] = lambda reason: None,
        interval_s: float = POLL_S,
    ) -> None:
        self.caps = caps
        self._leader = leader
        self._on_exceeded = on_exceeded
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tripped: dict[str, Any] | None = None
        self.tasks_reported = False

    def __enter__(self) -> MemoryWatchdog:
        if self.caps.polled:  # no caps: no thread
            self._thread = threading.Thread(target=self._run, name="memory-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._interval):
            leader = self._leader()
            if leader is None:
                continue  # not started yet, or already gone
            try:
                usage = measure(
                    engine_pids(leader),
                    gpu=self.caps.gpu_bytes is not None,
                    cpu_cap=self.caps.cpu_bytes,
                )
                failures = 0
            except Exception as exc:
                # Fail closed: a watchdog that cannot see would leave the engine uncapped.
                failures += 1
                _log.warning("memory watchdog: cannot measure the engine: %s", exc)
                if failures < _MAX_FAILURES:
                    continue
                self._trip(leader, {"resource": "unknown", "error": f"cannot measure: {exc}"})
                return
            over = exceeded(usage, self.caps)
            if over is not None:
                self._trip(leader, over)
                return
            cap = self.caps.max_tasks
            if cap is not None and usage.tasks >= cap and not self.tasks_reported:
                # Not stopped: its forks fail (EAGAIN) and it may recover; said once.
                self.tasks_reported = True
                telemetry.emit(
                    "task_cap_reached",
                    "blocked",
                    setting="engine.max_tasks",
                    observed_tasks=usage.tasks,
                    cap_tasks=cap,
                    pids=len(usage.pids),
                )

    def _trip(self, leader: int, over: dict[str, Any]) -> None:
        self.tripped = over
        telemetry.emit("memory_cap_exceeded", "blocked", action="engine stopped", **over)
        if "observed_bytes" in over:
            _log.error(
                "engine stopped: its %s is %d MB, over %s = %d MB; raise the cap, or lower "
                "engine.kv_cache_memory_bytes / max_num_seqs / max_model_len",
                over["resource"].replace("_", " "),
                over["observed_bytes"] // 1_000_000,
                over["setting"],
                over["cap_bytes"] // 1_000_000,
            )
        self._on_exceeded("memory_cap_exceeded")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader, signal.SIGKILL)


def for_engine(engine: Engine, caps: MemoryCaps) -> MemoryWatchdog:
    """A watchdog over `engine` that records why it stopped the engine in
    `engine.stop_reason`."""

    def leader() -> int | None:
        proc = engine.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def on_exceeded(reason: str) -> None:
        engine.stop_reason = reason

    return MemoryWatchdog(caps, leader, on_exceeded)
