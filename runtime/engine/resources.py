"""Step 4: the engine's memory caps, from the config and (for GPUs) the device's total memory.

The conversion is pure and unit-tested; NVML (nvidia-ml-py) is imported only when a GPU cap
is configured, so CPU machines never load it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from runtime.config import EngineSection
from runtime.errors import ConfigError

# vLLM reads --gpu-memory-utilization as a fraction; rounding down keeps it under the cap.
_UTILIZATION_STEP = 10_000


@dataclass(frozen=True)
class MemoryCaps:
    """What the watchdog enforces, and what vLLM is told."""

    cpu_bytes: int | None = None  # the engine tree's summed PSS
    gpu_bytes: int | None = None  # per device, summed over the engine's processes
    gpu_utilization: float | None = None  # vLLM's --gpu-memory-utilization

    @property
    def watched(self) -> bool:
        return self.cpu_bytes is not None or self.gpu_bytes is not None

    def argv(self) -> list[str]:
        if self.gpu_utilization is None:
            return []
        return ["--gpu-memory-utilization", f"{self.gpu_utilization:g}"]

    def describe(self) -> dict[str, Any]:
        if not self.watched:
            return {"status": "off"}
        return {
            "status": "enforced",
            "cpu_memory_bytes": self.cpu_bytes,
            "cpu_measure": "PSS summed over the engine's process tree and process group",
            "gpu_memory_bytes_per_device": self.gpu_bytes,
            "gpu_memory_utilization": self.gpu_utilization,
            "action": "engine stopped (SIGKILL to its process group), exit 6",
        }


def gpu_caps(limit: int | float, device_total_bytes: int) -> tuple[int, float]:
    """(cap in bytes, vLLM utilization fraction) for a limit in bytes (int) or a fraction
    (float) of a device holding `device_total_bytes`. Pure."""
    cap = int(limit * device_total_bytes) if isinstance(limit, float) else limit
    if cap > device_total_bytes:
        raise ConfigError(
            f"engine.gpu_memory_limit: {cap} bytes is more than the GPU's "
            f"{device_total_bytes} bytes",
            fix="give at most the device's memory, or a fraction such as 0.9",
        )
    utilization = math.floor(cap / device_total_bytes * _UTILIZATION_STEP) / _UTILIZATION_STEP
    if utilization <= 0:
        raise ConfigError(
            f"engine.gpu_memory_limit: {cap} bytes is under 0.01 % of the GPU's "
            f"{device_total_bytes} bytes",
            fix="give the limit in bytes (an integer) or as a fraction such as 0.9",
        )
    return cap, utilization


def compute(engine: EngineSection) -> MemoryCaps:
    """The caps for this config; reads the GPU's total memory through NVML when needed."""
    if engine.gpu_memory_limit is None:
        return MemoryCaps(cpu_bytes=engine.max_rss_bytes)
    # The smallest visible device bounds what every tensor-parallel rank may use.
    cap, utilization = gpu_caps(engine.gpu_memory_limit, min(device_totals()))
    return MemoryCaps(cpu_bytes=engine.max_rss_bytes, gpu_bytes=cap, gpu_utilization=utilization)


@functools.cache  # nvmlInit once per process: it counts references
def _nvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py, the `gpu` extra

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError when there is no driver or GPU
        raise ConfigError(
            f"engine.gpu_memory_limit needs NVML to read the GPU's memory: {exc}",
            fix="install the `gpu` extra (nvidia-ml-py) and run with the NVIDIA driver, "
            "or remove engine.gpu_memory_limit",
        ) from exc
    return pynvml


def device_totals() -> list[int]:
    """Total memory of each GPU this process can see, in bytes."""
    nvml = _nvml()
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise ConfigError(
            "engine.gpu_memory_limit: NVML sees no GPU",
            fix="run where a GPU is visible, or remove engine.gpu_memory_limit",
        )
    return [
        int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).total)
        for i in range(count)
    ]


def gpu_usage(pids: set[int]) -> tuple[dict[int, int], bool]:
    """Per device, the GPU memory of the compute processes in `pids`; and whether the pids
    matched. In a container NVML may report pids of another PID namespace: then nothing
    matches and every compute process on the device counts (the pod owns its GPUs)."""
    nvml = _nvml()
    per_device: dict[int, int] = {}
    everyone: dict[int, int] = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = int(proc.usedGpuMemory or 0)  # None where the driver hides it
            everyone[index] = everyone.get(index, 0) + used
            if proc.pid in pids:
                per_device[index] = per_device.get(index, 0) + used
    if per_device or not everyone:
        return per_device, True
    return everyone, False
