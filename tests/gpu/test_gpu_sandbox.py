"""The engine's sandbox on a CUDA node, without vLLM: the real `harness serve` starts the CUDA
stand-in engine (tests/gpu/cuda_engine.py: torch, the demo model's forward pass on the GPU, an
engine-core process of its own) with engine.device = "cuda" through the real stage 2 (network
namespace, no_new_privs, Landlock with the /dev/nvidia* rules, privilege drop, seccomp).

With seccomp/engine-cuda.json (recorded on a GPU by `harness profile` from this stand-in,
merged with the CPU vLLM profile; tests/gpu/device_run.sh) the engine runs in `enforce` mode
and no syscall may be refused. Without it, in `complain` mode against the CPU profile: every
syscall beyond it is allowed and reported, and the test prints them. Skipped with the reason
where there is no NVIDIA driver or no CUDA torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.demo import assets
from runtime.engine import watchdog
from runtime.sandbox import landlock
from tests.gpu import cuda_engine
from tests.support import client_context, process_group
from tests.support.harness import Harness, engine_lines, openai_client

pytestmark = [pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[2]
CPU_PROFILE = REPO / "seccomp" / "engine-cpu.json"
CUDA_PROFILE = REPO / "seccomp" / "engine-cuda.json"
MB = 1 << 20
# NVML reports pids as the initial PID namespace sees them (runtime.engine.resources).
INITIAL_PID_NAMESPACE = os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC


def _missing() -> str | None:
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA driver on this machine (/dev/nvidiactl is missing)"
    try:
        import torch
    except ImportError:
        return "no torch in this environment (the CUDA stand-in engine runs on it)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


REASON = _missing()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))


def _interpreter_paths() -> list[str]:
    """The stand-in's interpreter and its environment (torch, the CUDA libraries) where
    Landlock's system folders do not already cover them: engine.python is the script."""
    homes = {Path(sys.prefix), Path(os.path.realpath(sys.executable)).parent.parent}
    homes.add(Path(sys.base_prefix))
    system = [Path(p) for p in landlock.SYSTEM_READ]
    return sorted(
        str(home) for home in homes if not any(home == s or s in home.parents for s in system)
    )


def overrides(script: Path, device: str, *extra: str) -> list[str]:
    """The settings that make `harness serve` run the stand-in; shared with device_run.sh."""
    out = [f'engine.python="{script}"', f'engine.device="{device}"', *extra]
    if not CUDA_PROFILE.is_file() or device != "cuda":
        # No CUDA profile recorded yet: allow and report what the CPU profile would refuse.
        out += ['sandbox.seccomp="complain"', f'sandbox.seccomp_profile="{CPU_PROFILE}"']
    paths = _interpreter_paths()
    if paths:
        out.append(f"sandbox.extra_read_paths={json.dumps(paths)}")
    return out


def _report(harness: Harness) -> dict[str, Any]:
    found = [ln for ln in engine_lines(harness.log()) if ln.startswith(cuda_engine.MARKER)]
    assert found, f"the engine reported nothing; log tail:\n{harness.log()[-3000:]}"
    return json.loads(found[-1].removeprefix(cuda_engine.MARKER))


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _device_files() -> list[str]:
    return cuda_engine.device_files()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A folder the engine's uid can traverse, for the stand-in and harness's logs; kept
    (and named) when HARNESS_GPU_KEEP is set, so that device_run.sh can collect the logs."""
    import shutil
    import tempfile

    keep = os.environ.get("HARNESS_GPU_KEEP")
    if keep:
        path = Path(keep) / "sandbox"
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="harness-gpu-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def gpu_engine(demo_dir: Path, workdir: Path) -> Iterator[Harness]:
    script = cuda_engine.install(workdir, "cuda-engine")
    settings = overrides(script, "cuda", "engine.gpu_memory_limit=0.5")
    harness = Harness(demo_dir / assets.CONFIG_NAME, workdir, settings)
    try:
        harness.wait_ready()
        yield harness
    finally:
        harness.kill()


def test_cuda_works_inside_the_engine_sandbox(gpu_engine: Harness) -> None:
    report = _report(gpu_engine)
    print("engine:", json.dumps(report, indent=1))
    assert report["ok"], report
    assert report["model_device"].startswith("cuda") and report["readback"]
    assert report["pid"] != gpu_engine.engine_pid, "CUDA runs in the engine-core process"
    assert set(report["open"]) == set(_device_files())
    assert all(result == "ok" for result in report["open"].values()), report["open"]

    fence = gpu_engine.events("landlock")[-1]
    print("landlock:", json.dumps(fence))
    if landlock.abi_version() >= 1:
        assert fence["enforced"] is True
        assert set(_device_files()) <= set(fence["filesystem"]["devices"])
        # cuInit writes /proc/<pid>/task/<tid>/comm: without this rule it fails (304).
        assert fence["filesystem"]["write_files"] == ["/proc"]
    if os.geteuid() == 0:
        assert report["uid"] == 65534 and report["gid"] == 65534
        assert gpu_engine.events("privilege_drop")[0]["uid"] == 65534
        assert gpu_engine.events("namespaces")[0]["isolated"] is True
    installed = gpu_engine.events("seccomp_install")[0]
    assert installed["installed"] is True
    if CUDA_PROFILE.is_file():
        assert installed["mode"] == "enforce" and installed["profile"] == str(CUDA_PROFILE)

    # Every engine process: the API process, the engine core, multiprocessing's tracker.
    pids = watchdog.engine_pids(gpu_engine.engine_pid)
    assert report["pid"] in pids and len(pids) >= 2, pids
    for pid in pids:
        status = _status(pid)
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", (pid, status)
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (pid, cap, status[cap])


def test_completions_through_the_mtls_front(gpu_engine: Harness, demo_dir: Path) -> None:
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    # Clients closed after use, before the module's harness stops.
    with openai_client(gpu_engine.url, ctx) as client:
        done = client.completions.create(model=assets.SERVED_NAME, prompt="hello", max_tokens=8)
        chunks = client.chat.completions.create(
            model=assets.SERVED_NAME,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            stream=True,
        )
        reasons = [c.choices[0].finish_reason for c in chunks]
    assert done.usage is not None and 0 < done.usage.completion_tokens <= 8
    assert done.choices[0].finish_reason in ("length", "stop")
    assert reasons[-1] in ("length", "stop")
    assert gpu_engine.wait_for("request", route="/v1/completions")["status"] == 200
    assert gpu_engine.wait_for("request", route="/v1/chat/completions")["status"] == 200
    # The front still refuses what it refuses, in front of a CUDA engine too.
    with httpx.Client(verify=ctx, timeout=30) as raw:
        body = {"model": assets.SERVED_NAME, "prompt": "hi", "max_tokens": 100_000}
        assert raw.post(f"{gpu_engine.url}/v1/completions", json=body).status_code == 400


def test_the_watchdog_reads_the_sandboxed_engine_gpu_memory(gpu_engine: Harness) -> None:
    from runtime.engine import resources

    start = gpu_engine.events("engine_start")[0]
    total = min(resources.device_totals())
    utilization = float(start["argv"][start["argv"].index("--gpu-memory-utilization") + 1])
    assert utilization == 0.5
    used, matched = resources.gpu_usage(watchdog.engine_pids(gpu_engine.engine_pid))
    print(f"NVML: {used} of {total} (per process: {matched})")
    # The core's context, weights and its 64 MB read-back probe (freed, still cached).
    assert sum(used.values()) >= 64 * MB
    assert matched or not INITIAL_PID_NAMESPACE
    assert not gpu_engine.events("memory_cap_exceeded")


def test_seccomp_refused_nothing_or_reports_what_the_cuda_engine_calls(
    gpu_engine: Harness,
) -> None:
    """enforce with the recorded CUDA profile: nothing refused. complain (no profile yet):
    the syscalls beyond the CPU profile, printed as data for one."""
    installed = gpu_engine.events("seccomp_install")[0]
    events = gpu_engine.events("seccomp_violation")
    seen: dict[str, dict[str, Any]] = {}
    for event in events:
        entry = seen.setdefault(event["syscall"], {"count": 0, "actions": set(), "phases": set()})
        entry["count"] += 1 + event.get("suppressed_since_last", 0) + event.get("repeated", 0)
        entry["actions"].add(event.get("action"))
        entry["phases"].add(event.get("phase"))
    print(f"beyond {installed['profile']} ({installed['mode']}):")
    for name, entry in sorted(seen.items()):
        print(f"  {name}: {json.dumps(entry, default=sorted)}")
    if installed["mode"] == "enforce":
        assert not events, "the recorded CUDA profile refused a syscall of the engine"
    else:
        # Complain mode allows all of them, except the fixed deny list, which stays refused.
        for event in events:
            assert event.get("action") == "allowed" or event.get("fixed_deny_list"), event


def _serve_report(demo_dir: Path, workdir: Path, settings: list[str]) -> dict[str, Any]:
    harness = Harness(demo_dir / assets.CONFIG_NAME, workdir, settings)
    try:
        harness.wait_ready()
        seen = {
            "engine": _report(harness),
            "landlock": harness.events("landlock")[-1],
            "seccomp": sorted({e["syscall"] for e in harness.events("seccomp_violation")}),
        }
    finally:
        harness.kill()
    assert not process_group(harness.engine_pid)
    return seen


def test_the_device_stays_closed_without_its_landlock_rule(demo_dir: Path, workdir: Path) -> None:
    """engine.device = "cpu" builds the same sandbox without the /dev/nvidia* rule: the
    device cannot be opened and CUDA does not start (the stand-in then runs on the CPU). The
    control, the same with Landlock off, opens it: the refusal is Landlock's, not the files'
    modes."""
    if landlock.abi_version() < 1:
        pytest.skip("this kernel has no Landlock")
    script = cuda_engine.install(workdir, "cuda-engine-fenced")
    fenced = _serve_report(demo_dir, workdir, overrides(script, "cpu"))
    print("without the rule:", json.dumps(fenced["engine"]), "seccomp:", fenced["seccomp"])
    assert fenced["landlock"]["enforced"] is True
    assert not set(_device_files()) & set(fenced["landlock"]["filesystem"]["devices"])
    assert fenced["engine"]["open"]["/dev/nvidiactl"] == "EACCES", fenced["engine"]
    assert not fenced["engine"]["ok"] and fenced["engine"]["model_device"] == "cpu", fenced

    control = _serve_report(demo_dir, workdir, overrides(script, "cpu", 'sandbox.landlock="off"'))
    print("Landlock off:", json.dumps(control["engine"]), "seccomp:", control["seccomp"])
    assert control["landlock"]["enforced"] is False
    assert control["engine"]["open"]["/dev/nvidiactl"] == "ok", control["engine"]
    assert control["engine"]["ok"], control["engine"]


def test_the_watchdog_stops_a_sandboxed_engine_over_its_gpu_cap(
    demo_dir: Path, workdir: Path
) -> None:
    """The engine core holds 512 MB more under a 256 MiB cap: stopped, exit 6."""
    script = cuda_engine.install(workdir, "cuda-engine-512", hold_mb=512)
    settings = overrides(script, "cuda", f"engine.gpu_memory_limit={256 * MB}")
    harness = Harness(demo_dir / assets.CONFIG_NAME, workdir, settings)
    try:
        assert harness.proc.wait(timeout=120) == 6, harness.log()[-3000:]
    finally:
        harness.kill()
    [event] = harness.events("memory_cap_exceeded")
    print("memory_cap_exceeded:", json.dumps(event))
    assert event["resource"] == "gpu_memory" and event["observed_bytes"] >= 512 * MB
    # Its own memory, counted per process: not the other engines' on the same GPU.
    assert event["measure"] == "nvml" or not INITIAL_PID_NAMESPACE
    assert harness.events("shutdown")[-1]["exit_code"] == 6
    assert not process_group(harness.engine_pid)


def test_a_neighbours_gpu_memory_does_not_count(
    gpu_engine: Harness, demo_dir: Path, workdir: Path
) -> None:
    """Another program holds 2 GiB on the same GPU (and the module's engine its own) while an
    engine capped at 1.5 GiB starts and serves: it is not stopped. Measured on a GPU before
    the fix: until the engine's first allocation the watchdog counted the whole device and
    stopped the engine for its neighbours' memory."""
    from runtime.engine import resources
    from tests.gpu.test_gpu_memory import HOLD_GPU

    if not INITIAL_PID_NAMESPACE:
        pytest.skip("in a container's PID namespace the whole device counts while no pid matches")
    neighbour = subprocess.Popen(
        [sys.executable, "-c", HOLD_GPU, "2048"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert neighbour.stdout is not None and neighbour.stdout.readline() == "held\n"
        script = cuda_engine.install(workdir, "cuda-engine-neighbour")
        settings = overrides(script, "cuda", f"engine.gpu_memory_limit={1536 * MB}")
        harness = Harness(demo_dir / assets.CONFIG_NAME, workdir, settings)
        try:
            harness.wait_ready()
            time.sleep(3)  # three more of the watchdog's polls, the engine's memory all there
            assert harness.alive() and not harness.events("memory_cap_exceeded")
            # On the GPU, and seen per process: not a pass by an engine that holds nothing.
            assert _report(harness)["ok"], _report(harness)
            used, matched = resources.gpu_usage(watchdog.engine_pids(harness.engine_pid))
            assert matched and 0 < sum(used.values()) < 1536 * MB, used
        finally:
            harness.kill()
        assert harness.proc.returncode == 0, harness.log()[-3000:]
    finally:
        neighbour.kill()
        neighbour.wait()


def test_check_shows_the_gpu_plan(demo_dir: Path, workdir: Path) -> None:
    """`harness check --json` on the GPU node: the devices NVML sees, the GPU memory cap as
    vLLM's fraction of the device, the device rules, and the seccomp profile in force."""
    from runtime.engine import resources

    script = cuda_engine.install(workdir, "cuda-engine-check")
    config = demo_dir / assets.CONFIG_NAME
    args = [sys.executable, "-m", "runtime", "check", "--config", str(config)]
    for item in overrides(script, "cuda", "engine.gpu_memory_limit=0.25"):
        args += ["--set", item]
    result = subprocess.run(
        [*args, "--json"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    print("check:", json.dumps({k: report[k] for k in ("engine",)}, indent=1))
    total = min(resources.device_totals())
    gpus = report["engine"]["gpus"]
    assert gpus["status"] == "visible" and gpus["devices"][0]["memory_total_bytes"] == total
    caps = report["controls"]["memory_caps"]
    assert caps["gpu_memory_bytes_per_device"] == int(0.25 * total)
    argv = report["engine"]["argv"]
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.25"
    assert "--enforce-eager" not in argv
    assert set(_device_files()) <= set(report["controls"]["landlock"]["devices"])
    assert report["controls"]["landlock"]["write_existing_files"] == ["/proc"]
    expected = CUDA_PROFILE if CUDA_PROFILE.is_file() else CPU_PROFILE
    assert report["controls"]["seccomp"]["profile"] == str(expected)
