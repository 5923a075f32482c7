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
    measure: str  # "pss", or "pss+rss" where some process's smaps could not be read
    gpu_bytes: dict[int, int]  # per device
    gpu_pids_matched: bool = True
    tasks: int = 0  # processes and threads


def engine_pids(leader: int) -> set[int]:
    """The leader, its descendants, and the members of its process group."""
    parents: dict[int, int] = {}
    group: set[int] = set()
    for proc in psutil.process_iter(["ppid"]):
        parents[proc.pid] = proc.info["ppid"]
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == leader:
                group.add(proc.pid)
    if leader not in parents:
        return set()
    tree = {leader}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree | group


def measure(pids: set[int], gpu: bool, memory: bool = True) -> Usage:
    """`memory`: sum PSS (reads every mapping: only when a memory cap is set)."""
    total = 0
    tasks = 0
    fallback = False
    alive = []
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            tasks += proc.num_threads()
            if memory:
                try:
                    total += proc.memory_full_info().pss
                except psutil.AccessDenied:
                    total += proc.memory_info().rss
                    fallback = True
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        alive.append(pid)
    gpu_bytes, matched = resources.gpu_usage(set(alive)) if gpu else ({}, True)
    measured = "pss+rss" if fallback else "pss"
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
                    memory=self.caps.watched,
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
