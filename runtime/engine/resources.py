"""Step 4: the engine's memory caps, from the config and (for GPUs) the device's total memory;
and where the engine's compute threads and the front run (`engine.cpus`).

The conversion is pure and unit-tested; NVML (nvidia-ml-py) is imported only when a GPU cap
is configured (and by `harness check` for a cuda engine), so CPU machines never load it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

from runtime.config import EngineSection, format_cpu_list, parse_cpu_list
from runtime.errors import ConfigError

# vLLM reads --gpu-memory-utilization as a fraction; rounding down keeps it under the cap.
_UTILIZATION_STEP = 10_000


@dataclass(frozen=True)
class MemoryCaps:
    """What the watchdog enforces, and what vLLM is told."""

    cpu_bytes: int | None = None  # the engine tree's summed PSS
    gpu_bytes: int | None = None  # per device, summed over the engine's processes
    gpu_utilization: float | None = None  # vLLM's --gpu-memory-utilization
    # The engine's task cap (RLIMIT_NPROC, set in stage 2): the watchdog reports reaching it.
    max_tasks: int | None = None

    @property
    def watched(self) -> bool:
        return self.cpu_bytes is not None or self.gpu_bytes is not None

    @property
    def polled(self) -> bool:
        return self.watched or self.max_tasks is not None

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
    # A fraction is passed on as given (to the step): 0.9 of an H200 is 0.9, not the 0.8999
    # that the byte cap, rounded down to whole bytes, would give back.
    if isinstance(limit, float):  # round(): 0.29 * 10_000 is 2899.99...
        steps = math.floor(round(limit * _UTILIZATION_STEP, 6))
    else:  # bytes: rounded down, never over the cap
        steps = math.floor(cap / device_total_bytes * _UTILIZATION_STEP)
    utilization = steps / _UTILIZATION_STEP
    if utilization <= 0:
        raise ConfigError(
            f"engine.gpu_memory_limit: {cap} bytes is under 0.01 % of the GPU's "
            f"{device_total_bytes} bytes",
            fix="give the limit in bytes (an integer) or as a fraction such as 0.9",
        )
    return cap, utilization


AUTO_RSS_FRACTION = 0.9


def memory_limit(cgroup_root: str = "/sys/fs/cgroup", proc: str = "/proc") -> tuple[int, str]:
    """What harness's processes may use in all: its cgroup v2 memory.max (a pod's limit, from
    the container's own cgroup namespace), else the machine's memory; and where it came from."""
    with open(f"{proc}/self/cgroup") as handle:
        for line in handle:
            if line.startswith("0::"):
                path = f"{cgroup_root}{line[3:].strip().rstrip('/')}/memory.max"
                try:
                    with open(path) as limit:
                        value = limit.read().strip()
                except OSError:
                    break
                if value != "max":
                    return int(value), path
    with open(f"{proc}/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, f"{proc}/meminfo MemTotal"
    raise OSError("no MemTotal in /proc/meminfo")


def rss_cap(setting: int | str) -> int | None:
    """engine.max_rss_bytes in bytes: as set, None for "off", or AUTO_RSS_FRACTION of
    memory_limit() for "auto"."""
    if setting == "off":
        return None
    if setting == "auto":
        return int(memory_limit()[0] * AUTO_RSS_FRACTION)
    return int(setting)


def compute(engine: EngineSection) -> MemoryCaps:
    """The caps for this config; reads the GPU's total memory through NVML when needed."""
    cpu = rss_cap(engine.max_rss_bytes)
    if engine.gpu_memory_limit is None:
        return MemoryCaps(cpu_bytes=cpu, max_tasks=engine.max_tasks)
    # The smallest visible device bounds what every tensor-parallel rank may use.
    cap, utilization = gpu_caps(engine.gpu_memory_limit, min(device_totals()))
    return MemoryCaps(
        cpu_bytes=cpu,
        gpu_bytes=cap,
        gpu_utilization=utilization,
        max_tasks=engine.max_tasks,
    )


@dataclass(frozen=True)
class CpuPlacement:
    """vLLM's CPU build spins its OpenMP threads while it generates: anything else on their
    CPUs (the front, its TLS and JSON) preempts them and stalls every step. Measured in
    `benchmarks/front_bench.py --pin`; benchmarks/README.md has the numbers."""

    engine: frozenset[int]  # the engine's compute threads (VLLM_CPU_OMP_THREADS_BIND)
    front: frozenset[int]  # every thread of harness, once the engine has started

    def describe(self) -> dict[str, str]:
        return {
            "engine_cpus": format_cpu_list(self.engine),
            "front_cpus": format_cpu_list(self.front),
        }


def cpu_placement(engine: EngineSection, available: set[int]) -> CpuPlacement | None:
    """The placement for `engine.cpus` among the CPUs harness may use (its affinity, the
    container's cpuset); None when unset, or `auto` with one CPU. Pure."""
    if engine.cpus is None:
        return None
    if engine.cpus == "auto":
        if len(available) < 2:
            return None  # one CPU: nothing to split
        wanted = frozenset(available) - {max(available)}
        return CpuPlacement(engine=wanted, front=frozenset(available) - wanted)
    wanted = parse_cpu_list(engine.cpus)
    missing = wanted - available
    if missing:
        raise ConfigError(
            f"engine.cpus {engine.cpus}: CPU {format_cpu_list(missing)} is not available to "
            f"harness, which may use CPU {format_cpu_list(available)}",
            fix="choose engine.cpus among those (the container's cpuset or taskset)",
        )
    front = frozenset(available) - wanted
    if not front:
        raise ConfigError(
            f"engine.cpus {engine.cpus} takes every CPU harness may use; the front needs one",
            fix="leave at least one CPU out of engine.cpus, or unset it",
        )
    return CpuPlacement(engine=wanted, front=front)


def split_cpus(cpus: frozenset[int] | set[int], ranks: int) -> list[frozenset[int]]:
    """`cpus` in `ranks` contiguous groups of as equal a size as can be, one per engine rank
    (tensor x pipeline parallel). Pure."""
    ordered = sorted(cpus)
    if len(ordered) < ranks:
        raise ConfigError(
            f"{ranks} engine ranks (engine.vllm tensor_parallel_size x pipeline_parallel_size) "
            f"need a CPU each; the engine may use CPU {format_cpu_list(frozenset(ordered))}",
            fix="lower the parallel sizes, or give the engine more CPUs (engine.cpus)",
        )
    size, extra = divmod(len(ordered), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + size + (1 if rank < extra else 0)
        groups.append(frozenset(ordered[start:end]))
        start = end
    return groups


def place_front(placement: CpuPlacement) -> None:
    """Move every thread of harness onto the front's CPUs; threads started later inherit it.
    Called once the engine has been started, so that the engine keeps the full set and can
    bind its compute threads to theirs."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), placement.front)


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


def describe_gpus() -> dict[str, Any]:
    """For `harness check`: the GPUs NVML sees (name, total memory) and the driver; or why
    none are visible. Never raises: a report, not a gate (serve fails on a cap it cannot
    compute, in `compute`)."""
    try:
        nvml = _nvml()
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            devices.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                }
            )
        driver = nvml.nvmlSystemGetDriverVersion()
    except ConfigError as exc:  # no nvidia-ml-py, or no driver: say which
        return {"status": "unavailable", "reason": f"NVML: {exc.__cause__ or exc.message}"}
    except Exception as exc:  # NVMLError: a driver that answers nvmlInit but not a query
        return {"status": "unavailable", "reason": f"NVML: {exc}"}
    return {
        "status": "visible" if devices else "none",
        "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
        "devices": devices,
    }


# /proc/self/ns/pid's inode in the initial PID namespace (PROC_PID_INIT_INO, a kernel constant).
_INITIAL_PID_NAMESPACE = 0xEFFFFFFC


def gpu_usage(pids: set[int]) -> tuple[dict[int, int], bool]:
    """Per device, the GPU memory of the compute processes in `pids`, and whether it was
    counted per process (True) or for the whole device (False): see `attribute`."""
    nvml = _nvml()
    reported = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            # usedGpuMemory is None where the driver hides it.
            reported.append((index, int(proc.pid), int(proc.usedGpuMemory or 0)))
    initial = os.stat("/proc/self/ns/pid").st_ino == _INITIAL_PID_NAMESPACE
    return attribute(reported, pids, initial_namespace=initial)


def attribute(
    reported: list[tuple[int, int, int]], pids: set[int], *, initial_namespace: bool
) -> tuple[dict[int, int], bool]:
    """Which of NVML's (device, pid, bytes) are the engine's. Pure.

    NVML reports pids as the initial PID namespace sees them. There (a host, a VM) they are
    harness's own pids: only the engine's processes count, never another program's on the
    same GPU (measured on a GPU: counting them stopped an engine that had not yet allocated
    for a neighbour's memory). In a container's own PID namespace none of them may match the
    engine's: then, and only while none match, every compute process on the device counts,
    since the pod owns its GPUs."""
    per_device: dict[int, int] = {}
    everyone: dict[int, int] = {}
    for device, pid, used in reported:
        everyone[device] = everyone.get(device, 0) + used
        if pid in pids:
            per_device[device] = per_device.get(device, 0) + used
    if per_device or not everyone or initial_namespace:
        return per_device, True
    return everyone, False
