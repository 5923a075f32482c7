"""Memory caps: the conversion of the GPU limit (pure), and the watchdog stopping real
processes over a real cap: a forked memory-hungry process tree, `harness serve` with a
stand-in engine (tests/support/fake_engine.py); the real vLLM engine over its cap is in
tests/e2e/test_lifecycle.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import telemetry
from runtime.config import Config, EngineSection
from runtime.engine import resources, watchdog
from runtime.engine.command import RuntimePaths, build_argv
from runtime.engine.resources import MemoryCaps, gpu_caps
from runtime.errors import ConfigError
from tests.support import process_group
from tests.support.harness import list_models, stand_in_harness

MB = 1 << 20
GIB = 1 << 30

# A process group of two processes each holding HOLD_MB of touched memory: each alone is
# under a cap of 1.5 x HOLD_MB, together they are over it.
HUNGRY = """
import os, sys, time
mb = int(sys.argv[1])
os.fork()  # both processes allocate their own pages (no copy-on-write sharing)
held = bytearray(b"\\x01") * (mb << 20)
os.write(1, b"held\\n")  # one write: the two processes' lines never interleave
time.sleep(120)
"""
HOLD_MB = 100


@pytest.fixture()
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    telemetry.subscribe(seen.append)
    yield seen
    telemetry.unsubscribe(seen.append)


def _holding(code: str, amount: int, lines: int) -> subprocess.Popen[str]:
    """`code` started in a process group of its own, as the engine's, once it has printed
    `held` `lines` times."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(amount)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for _ in range(lines):
        assert proc.stdout.readline() == "held\n"
    return proc


def _hungry(mb: int) -> subprocess.Popen[str]:
    return _holding(HUNGRY, mb, lines=2)  # both processes hold their memory


def _running(proc: subprocess.Popen[str]) -> int | None:
    return proc.pid if proc.poll() is None else None


def test_watchdog_stops_a_process_tree_over_the_cap(events: list[dict[str, Any]]) -> None:
    proc = _hungry(HOLD_MB)
    reasons: list[str] = []
    caps = MemoryCaps(cpu_bytes=int(HOLD_MB * 1.5) * MB)
    try:
        with watchdog.MemoryWatchdog(caps, lambda: _running(proc), reasons.append, 0.1):
            assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    [event] = [e for e in events if e["event_type"] == "memory_cap_exceeded"]
    assert event["outcome"] == "blocked"
    assert event["resource"] == "cpu_memory" and event["setting"] == "engine.max_rss_bytes"
    assert event["cap_bytes"] == caps.cpu_bytes < event["observed_bytes"]
    assert event["measure"] == "pss"
    assert proc.pid in event["pids"] and len(event["pids"]) == 2  # the sum, not one process
    assert reasons == ["memory_cap_exceeded"]
    # The forked child is gone too (SIGKILLed with the group; under load it may take a
    # moment to release its memory and become a zombie).
    deadline = time.monotonic() + 10
    while process_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_group(proc.pid)


def test_watchdog_leaves_a_process_under_the_cap_alone(events: list[dict[str, Any]]) -> None:
    proc = _hungry(10)
    try:
        _watched_and_left_alone(proc, MemoryCaps(cpu_bytes=200 * MB), events)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _watched_and_left_alone(
    proc: subprocess.Popen[str], caps: MemoryCaps, events: list[dict[str, Any]]
) -> None:
    with watchdog.MemoryWatchdog(caps, lambda: _running(proc), interval_s=0.05) as dog:
        time.sleep(1)
    assert dog.tripped is None and proc.poll() is None
    assert not [e for e in events if e["event_type"] == "memory_cap_exceeded"]


# A parent that touches SHARED_MB and then forks: the child shares those pages copy-on-write,
# so each process's RSS counts them and their PSS counts them once between the two.
SHARED = """
import os, sys, time
held = bytearray(b"\\x01") * (int(sys.argv[1]) << 20)
os.fork()
os.write(1, b"held\\n")
time.sleep(120)
"""
SHARED_MB = 100


def test_a_tree_over_the_cap_by_rss_but_under_it_by_pss_runs_on(
    events: list[dict[str, Any]],
) -> None:
    """The RSS is only the quick look: pages two processes share count once (PSS), and the
    PSS decides. Under the cap by RSS too, the costly PSS is not read at all."""
    proc = _holding(SHARED, SHARED_MB, lines=2)
    try:
        pids = watchdog.engine_pids(proc.pid)
        assert len(pids) == 2
        cap = int(SHARED_MB * 1.5) * MB  # under the RSS sum (~2 x 100 MB), over the PSS (~100)
        shared = watchdog.measure(pids, gpu=False, cpu_cap=cap)
        assert shared.measure == "pss" and shared.cpu_bytes <= cap
        roomy = watchdog.measure(pids, gpu=False, cpu_cap=4 * SHARED_MB * MB)
        assert roomy.measure == "rss" and roomy.cpu_bytes > cap  # the RSS sum, double-counted
        _watched_and_left_alone(proc, MemoryCaps(cpu_bytes=cap), events)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


THREADS = """
import sys, threading
hold = threading.Event()
for _ in range(int(sys.argv[1])):
    threading.Thread(target=hold.wait, daemon=True).start()
print("held", flush=True)
hold.wait()
"""


def test_reaching_the_task_cap_is_one_event_and_the_engine_runs_on(
    events: list[dict[str, Any]],
) -> None:
    """An engine at engine.max_tasks (its forks now fail with EAGAIN): reported once, with
    the count; not stopped (a memory cap stops it, a task cap only refuses more tasks)."""
    proc = _holding(THREADS, 80, lines=1)
    try:
        caps = MemoryCaps(max_tasks=64)
        with watchdog.MemoryWatchdog(caps, lambda: _running(proc), interval_s=0.05) as dog:
            time.sleep(0.6)
        assert dog.tripped is None and proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    [event] = [e for e in events if e["event_type"] == "task_cap_reached"]
    assert event["outcome"] == "blocked" and event["setting"] == "engine.max_tasks"
    assert event["cap_tasks"] == 64 and event["observed_tasks"] >= 81
    assert not [e for e in events if e["event_type"] == "memory_cap_exceeded"]


def test_no_caps_no_thread() -> None:
    dog = watchdog.MemoryWatchdog(MemoryCaps(), lambda: os.getpid())
    with dog:
        assert dog._thread is None


@pytest.mark.parametrize(
    ("usage", "caps", "expected"),
    [
        (watchdog.Usage((1, 2), 300 * MB, "pss", {}), MemoryCaps(cpu_bytes=200 * MB), "cpu_memory"),
        (watchdog.Usage((1,), 100 * MB, "pss", {}), MemoryCaps(cpu_bytes=200 * MB), None),
        (
            watchdog.Usage((1,), 100 * MB, "pss", {0: GIB, 1: 3 * GIB}),
            MemoryCaps(gpu_bytes=2 * GIB),
            "gpu_memory",
        ),
        (watchdog.Usage((1,), 100 * MB, "pss", {0: GIB}), MemoryCaps(gpu_bytes=2 * GIB), None),
        (watchdog.Usage((1,), 300 * MB, "pss", {}), MemoryCaps(gpu_bytes=2 * GIB), None),
    ],
)
def test_exceeded(usage: watchdog.Usage, caps: MemoryCaps, expected: str | None) -> None:
    over = watchdog.exceeded(usage, caps)
    assert (over["resource"] if over else None) == expected
    if over and expected == "gpu_memory":
        assert over["device"] == 1 and over["observed_bytes"] == 3 * GIB


@pytest.mark.parametrize(
    ("limit", "total", "cap", "utilization"),
    [
        (0.5, 80 * GIB, 40 * GIB, 0.5),
        (1.0, 80 * GIB, 80 * GIB, 1.0),
        (40 * GIB, 80 * GIB, 40 * GIB, 0.5),
        (10**10, 3 * 10**10, 10**10, 0.3333),  # rounded down, never over the cap
        (0.9, 150754820096, 135679338086, 0.9),  # an H200, as NVML reports it
        (0.29, 80 * GIB, int(0.29 * 80 * GIB), 0.29),  # 0.29 * 10000 is 2899.99...
    ],
)
def test_gpu_limit_becomes_utilization(
    limit: int | float, total: int, cap: int, utilization: float
) -> None:
    assert gpu_caps(limit, total) == (cap, utilization)


@pytest.mark.parametrize(("limit", "error"), [(81 * GIB, "more than"), (MB, "under 0.01")])
def test_gpu_limit_refused(limit: int, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        gpu_caps(limit, 80 * GIB)


@pytest.mark.parametrize(
    ("reported", "initial", "expected"),
    [
        # A host or VM: only the engine's processes count, never a neighbour's.
        ([(0, 10, GIB), (0, 99, 5 * GIB)], True, ({0: GIB}, True)),
        ([(0, 99, 5 * GIB)], True, ({}, True)),  # the engine has not allocated yet
        ([(0, 10, GIB), (1, 11, 2 * GIB), (1, 12, GIB)], True, ({0: GIB, 1: 3 * GIB}, True)),
        # A container's PID namespace: NVML's pids may be the host's; while none matches,
        # the pod's whole device counts.
        ([(0, 4242, GIB), (1, 4243, 2 * GIB)], False, ({0: GIB, 1: 2 * GIB}, False)),
        ([(0, 10, GIB), (0, 4242, 5 * GIB)], False, ({0: GIB}, True)),
        ([], False, ({}, True)),
    ],
)
def test_gpu_memory_is_attributed_to_the_engine(
    reported: list[tuple[int, int, int]], initial: bool, expected: tuple[dict[int, int], bool]
) -> None:
    engine = {10, 11, 12}
    assert resources.attribute(reported, engine, initial_namespace=initial) == expected


def test_gpu_utilization_reaches_vllm_argv() -> None:
    cfg = Config.model_validate(
        {
            "model": {"dir": "/m", "served_name": "m", "unsafe_unsigned": True},
            "front": {
                "tls": {"cert": "/c", "key": "/k", "client_ca": "/ca"},
                "allowed_identities": ["spiffe://x/y"],
            },
            "engine": {"device": "cuda", "gpu_memory_limit": 0.8},
        }
    )
    paths = RuntimePaths(Path("/run/h"))
    argv = build_argv(cfg, paths, MemoryCaps(gpu_bytes=GIB, gpu_utilization=0.8))
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--gpu-memory-utilization" not in build_argv(cfg, paths)


def test_gpu_limit_needs_cuda() -> None:
    with pytest.raises(ValueError, match="cuda"):
        EngineSection(gpu_memory_limit=0.5)


def test_serve_stops_an_engine_over_its_memory_cap_and_exits_6(
    demo_dir: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `harness serve`: the stand-in engine and a child it forks each take HOLD_MB
    on the first /v1/models request; their sum is over the cap."""
    monkeypatch.setenv("HARNESS_FAKE_ENGINE_MB", str(HOLD_MB))
    harness = stand_in_harness(
        demo_dir, open_tmp, f"engine.max_rss_bytes={int(HOLD_MB * 1.5) * MB}"
    )
    try:
        harness.wait_ready()
        list_models(harness, demo_dir)
        assert harness.proc.wait(timeout=120) == 6
    finally:
        harness.kill()
    [event] = harness.events("memory_cap_exceeded")
    assert event["outcome"] == "blocked" and event["observed_bytes"] > event["cap_bytes"]
    assert harness.engine_pid in event["pids"] and len(event["pids"]) >= 2
    exit_event = harness.events("engine_exit")[-1]
    assert exit_event["reason"] == "memory_cap_exceeded"
    assert exit_event["exit_code"] == -signal.SIGKILL
    shutdown = harness.events("shutdown")[-1]
    assert shutdown["exit_code"] == 6 and shutdown["reason"] == "memory_cap_exceeded"
    assert "over engine.max_rss_bytes" in harness.log()
    assert not process_group(harness.engine_pid)


def test_the_default_cpu_cap_is_nine_tenths_of_the_cgroup_limit_or_the_machine(
    tmp_path: Path,
) -> None:
    """engine.max_rss_bytes = "auto" (the default): 90% of the container's memory.max, or of
    MemTotal where the cgroup has no limit; "off" is none; bytes are bytes."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/kubepods/pod1/harness\n")
    (proc / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree: 1 kB\n")
    limit_file = cgroup / "kubepods" / "pod1" / "harness" / "memory.max"
    limit_file.parent.mkdir(parents=True)
    limit_file.write_text("8589934592\n")
    assert resources.memory_limit(str(cgroup), str(proc)) == (8 << 30, str(limit_file))
    limit_file.write_text("max\n")
    assert resources.memory_limit(str(cgroup), str(proc))[0] == 24000000 * 1024
    assert resources.rss_cap("off") is None and resources.rss_cap(64 << 20) == 64 << 20
    expected = int(resources.memory_limit()[0] * resources.AUTO_RSS_FRACTION)
    assert resources.rss_cap("auto") == expected
    cfg = Config.model_validate(
        {
            "model": {"dir": "/m", "served_name": "m", "unsafe_unsigned": True},
            "front": {
                "tls": {"cert": "/c", "key": "/k", "client_ca": "/ca"},
                "allowed_identities": ["spiffe://x/y"],
            },
        }
    )
    assert cfg.engine.max_rss_bytes == "auto"
    caps = resources.compute(cfg.engine)
    assert caps.cpu_bytes == expected and caps.watched and caps.max_tasks == 4096


def test_a_process_named_like_its_stat_fields_is_still_read_right() -> None:
    """The scan reads each /proc/PID/stat after the command name's last parenthesis: a name
    with spaces and parentheses in it (any process may choose its own) changes nothing."""
    code = (
        "import os, time; open('/proc/self/comm', 'w').write(') 1 1 (x'); "
        "os.write(1, b'held\\n'); time.sleep(60)"
    )
    proc = _holding(code, 0, lines=1)
    try:
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == ") 1 1 (x"
        assert watchdog.engine_pids(proc.pid) == {proc.pid}
        parents, groups = watchdog._parents_and_groups()
        assert parents[proc.pid] == os.getpid() and groups[proc.pid] == proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
