"""GPU memory caps against the real NVML and a real CUDA allocation (the CUDA driver API
through ctypes: no torch needed). Skipped with the reason where there is no GPU."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from runtime import telemetry
from runtime.config import EngineSection
from runtime.engine import resources, watchdog
from runtime.engine.resources import MemoryCaps
from runtime.errors import ConfigError

pytestmark = pytest.mark.gpu
MB = 1 << 20


def _nvml_or_skip() -> Any:
    try:
        return resources._nvml()
    except ConfigError as exc:
        pytest.skip(f"no NVML here: {exc.message}")


# Holds `mb` MB of GPU memory through libcuda until killed.
HOLD_GPU = """
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
ctx, ptr = ctypes.c_void_p(), ctypes.c_uint64()
assert cuda.cuInit(0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, 0) == 0
assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]) << 20)) == 0
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def gpu_holder() -> Iterator[subprocess.Popen[str]]:
    _nvml_or_skip()
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        pytest.skip(f"no CUDA driver library: {exc}")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_GPU, "512"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_fraction_is_read_against_the_device_total() -> None:
    nvml = _nvml_or_skip()
    totals = resources.device_totals()
    assert totals == [
        nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).total
        for i in range(nvml.nvmlDeviceGetCount())
    ]
    caps = resources.compute(EngineSection(device="cuda", gpu_memory_limit=0.5))
    assert caps.gpu_utilization == 0.5
    assert caps.gpu_bytes == int(0.5 * min(totals))
    assert caps.argv() == ["--gpu-memory-utilization", "0.5"]


def test_nvml_sees_a_process_gpu_memory(gpu_holder: subprocess.Popen[str]) -> None:
    used, matched = resources.gpu_usage({gpu_holder.pid})
    assert sum(used.values()) >= 512 * MB
    # Where NVML reports pids of another PID namespace, the device totals count instead.
    assert matched or sum(used.values()) >= 512 * MB


def test_watchdog_stops_a_process_over_the_gpu_cap(gpu_holder: subprocess.Popen[str]) -> None:
    seen: list[dict[str, Any]] = []
    telemetry.subscribe(seen.append)
    try:
        caps = MemoryCaps(gpu_bytes=256 * MB)
        leader = lambda: gpu_holder.pid if gpu_holder.poll() is None else None  # noqa: E731
        with watchdog.MemoryWatchdog(caps, leader, interval_s=0.2):
            assert gpu_holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        telemetry.unsubscribe(seen.append)
    [event] = [e for e in seen if e["event_type"] == "memory_cap_exceeded"]
    assert event["resource"] == "gpu_memory" and event["observed_bytes"] >= 512 * MB
    assert event["setting"] == "engine.gpu_memory_limit"
