"""The engine's sandbox on a CUDA node, without vLLM: the real `harness serve` starts the
stand-in engine (tests/fake_engine.py) with engine.device = "cuda" through the real stage 2
(network namespace, no_new_privs, Landlock with the /dev/nvidia* rule, privilege drop, seccomp)
and the stand-in, before it serves, creates a CUDA context and allocates, fills and reads back
GPU memory through the driver API (ctypes, libcuda.so.1). It prints what it saw on stderr,
which harness writes to its log.

Without a recorded seccomp/engine-cuda.json the engine runs in `complain` mode against the
CPU profile: every syscall the CUDA driver makes beyond that profile is allowed and reported
(`seccomp_violation` events), and the test prints them. Skipped with the reason where there
is no NVIDIA driver."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.demo import assets
from runtime.sandbox import landlock
from tests import fake_engine
from tests.support import Harness, client_context, process_group

pytestmark = [pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[2]
CPU_PROFILE = REPO / "seccomp" / "engine-cpu.json"
CUDA_PROFILE = REPO / "seccomp" / "engine-cuda.json"
MB = 1 << 20
PROBE_MB = 64
MARKER = "cuda-probe "


def _missing() -> str | None:
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA driver on this machine (/dev/nvidiactl is missing)"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no CUDA driver library: {exc}"
    return None


REASON = _missing()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))


def _libcuda_path() -> str:
    """Where this process found libcuda.so.1: the stand-in falls back to it when the
    engine's environment (no LD_LIBRARY_PATH) cannot find the library by name."""
    ctypes.CDLL("libcuda.so.1")
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if "/libcuda.so" in path:
            return path
    return "libcuda.so.1"


# Runs in the engine before the stand-in serves; keeps its context and memory while serving.
PROBE = r"""
import ctypes, errno, json, os, sys


def cuda_probe(mb, fallback, devices):
    result = {"uid": os.getuid(), "gid": os.getgid(), "open": {}, "ok": False}
    for path in devices:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            result["open"][path] = "ok"
        except OSError as exc:
            result["open"][path] = errno.errorcode.get(exc.errno, str(exc.errno))
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        result["libcuda"] = "libcuda.so.1"
    except OSError as exc:
        result["libcuda_by_name"] = str(exc)
        try:
            cuda = ctypes.CDLL(fallback)
            result["libcuda"] = fallback
        except OSError as exc:
            result["error"] = f"dlopen: {exc}"
            return result, None

    def call(name, *args):
        code = getattr(cuda, name)(*args)
        if code != 0:
            text = ctypes.c_char_p()
            cuda.cuGetErrorName(code, ctypes.byref(text))
            raise RuntimeError(f"{name}: {code} {(text.value or b'?').decode()}")

    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    size = mb << 20
    try:
        call("cuInit", 0)
        call("cuDeviceGet", ctypes.byref(dev), 0)
        name = ctypes.create_string_buffer(256)
        call("cuDeviceGetName", name, 256, dev)
        result["device"] = name.value.decode()
        call("cuCtxCreate_v2", ctypes.byref(ctx), 0, dev)
        call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(size))
        call("cuMemsetD8_v2", ptr, ctypes.c_ubyte(0xA5), ctypes.c_size_t(size))
        host = (ctypes.c_ubyte * 4096)()
        tail = ctypes.c_uint64(ptr.value + size - 4096)
        call("cuMemcpyDtoH_v2", host, tail, ctypes.c_size_t(4096))
        call("cuCtxSynchronize")
    except RuntimeError as exc:
        result["error"] = str(exc)
        return result, None
    result["readback"] = all(byte == 0xA5 for byte in host)
    result.update(ok=result["readback"], allocated_mb=mb)
    return result, (cuda, ctx, ptr)


PROBE_RESULT, PROBE_HELD = cuda_probe(PROBE_MB, PROBE_LIBCUDA, PROBE_DEVICES)
print("cuda-probe " + json.dumps(PROBE_RESULT), file=sys.stderr, flush=True)
"""


def install(folder: Path, mb: int) -> Path:
    """The stand-in engine with the CUDA probe in front of it (see fake_engine.install)."""
    # The device files as harness sees them: Landlock keeps the engine from listing /dev.
    constants = (
        f"PROBE_MB = {mb}\nPROBE_LIBCUDA = {_libcuda_path()!r}\n"
        f"PROBE_DEVICES = {_device_files()!r}\n"
    )
    return fake_engine.install(folder, f"cuda-engine-{mb}", constants + PROBE)


def _interpreter_paths() -> list[str]:
    """The stand-in's interpreter (not engine.python, which is the script) where Landlock's
    system folders do not already cover it."""
    homes = {Path(os.path.realpath(sys.executable)).parent.parent, Path(sys.base_prefix).resolve()}
    system = [Path(p) for p in landlock.SYSTEM_READ]
    return sorted(
        str(home) for home in homes if not any(home == s or s in home.parents for s in system)
    )


def _overrides(script: Path, device: str, *extra: str) -> list[str]:
    overrides = [f'engine.python="{script}"', f'engine.device="{device}"', *extra]
    if not CUDA_PROFILE.is_file() or device != "cuda":
        # No CUDA profile recorded yet: allow and report what the CPU profile would refuse.
        overrides += ['sandbox.seccomp="complain"', f'sandbox.seccomp_profile="{CPU_PROFILE}"']
    paths = _interpreter_paths()
    if paths:
        overrides.append(f"sandbox.extra_read_paths={json.dumps(paths)}")
    return overrides


def _probe(harness: Harness) -> dict[str, Any]:
    found = [line for line in harness.log().splitlines() if line.startswith(MARKER)]
    assert found, f"the engine reported no probe; log tail:\n{harness.log()[-3000:]}"
    return json.loads(found[-1].removeprefix(MARKER))


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _device_files() -> list[str]:
    return sorted(p for p in glob.glob("/dev/nvidia*") if not os.path.isdir(p))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A folder the engine's uid can traverse, for the stand-in scripts and harness's logs."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="harness-gpu-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def gpu_engine(demo_dir: Path, workdir: Path) -> Iterator[Harness]:
    # Device files as harness sees them when it builds the engine's Landlock rules.
    for path in _device_files():
        st = os.stat(path)
        print(f"{path}: mode {stat.filemode(st.st_mode)} uid {st.st_uid} gid {st.st_gid}")
    overrides = _overrides(install(workdir, PROBE_MB), "cuda", "engine.gpu_memory_limit=0.5")
    harness = Harness(demo_dir / assets.CONFIG_NAME, workdir, overrides)
    try:
        harness.wait_ready()
        yield harness
    finally:
        harness.kill()


def test_cuda_works_inside_the_engine_sandbox(gpu_engine: Harness) -> None:
    probe = _probe(gpu_engine)
    print("probe:", json.dumps(probe, indent=1))
    assert probe["ok"], probe
    assert probe["readback"] and probe["allocated_mb"] == PROBE_MB
    assert set(probe["open"]) == set(_device_files())
    assert all(result == "ok" for result in probe["open"].values()), probe["open"]

    fence = gpu_engine.events("landlock")[0]
    print("landlock:", json.dumps(fence))
    if landlock.abi_version() >= 1:
        assert fence["enforced"] is True
        assert set(_device_files()) <= set(fence["filesystem"]["devices"])
        # cuInit writes /proc/<pid>/task/<tid>/comm: without this rule it fails (304).
        assert fence["filesystem"]["write_files"] == ["/proc"]
    if os.geteuid() == 0:
        assert probe["uid"] == 65534 and probe["gid"] == 65534
        assert gpu_engine.events("privilege_drop")[0]["uid"] == 65534
        assert gpu_engine.events("network_namespace")[0]["isolated"] is True
    assert gpu_engine.events("seccomp_install")[0]["installed"] is True

    status = _status(gpu_engine.engine_pid)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])


def test_a_completion_through_the_mtls_front(gpu_engine: Harness, demo_dir: Path) -> None:
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    body = {"model": assets.SERVED_NAME, "prompt": "hello", "max_tokens": 4}
    with httpx.Client(verify=ctx, timeout=30) as client:
        response = client.post(f"{gpu_engine.url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == " fake"
    assert gpu_engine.wait_for("request", route="/v1/completions")["status"] == 200


def test_the_watchdog_reads_the_sandboxed_engine_gpu_memory(gpu_engine: Harness) -> None:
    from runtime.engine import resources

    start = gpu_engine.events("engine_start")[0]
    assert start["argv"][start["argv"].index("--gpu-memory-utilization") + 1] == "0.5"
    used, matched = resources.gpu_usage({gpu_engine.engine_pid})
    print(f"NVML: {used} (pids matched: {matched})")
    assert sum(used.values()) >= PROBE_MB * MB
    assert not gpu_engine.events("memory_cap_exceeded")


def test_seccomp_reports_what_the_cuda_driver_calls(gpu_engine: Harness) -> None:
    """Data for a CUDA profile: the syscalls beyond the CPU profile, in `complain` mode."""
    installed = gpu_engine.events("seccomp_install")[0]
    if installed["mode"] != "complain":
        pytest.skip(f"seccomp mode is {installed['mode']} ({installed['profile']})")
    events = gpu_engine.events("seccomp_violation")
    seen: dict[str, dict[str, Any]] = {}
    for event in events:
        entry = seen.setdefault(event["syscall"], {"count": 0, "actions": set(), "phases": set()})
        entry["count"] += 1 + event.get("suppressed_since_last", 0) + event.get("repeated", 0)
        entry["actions"].add(event.get("action"))
        if "phase" in event:
            entry["phases"].add(event["phase"])
        if "socket_domain" in event:
            entry.setdefault("sockets", set()).add((event["socket_domain"], event["socket_type"]))
    print(f"beyond {installed['profile']}:")
    for name, entry in sorted(seen.items()):
        print(f"  {name}: {json.dumps(entry, default=sorted)}")
    # Complain mode allows all of them, except the fixed deny list, which stays refused.
    for event in events:
        assert event.get("action") == "allowed" or event.get("fixed_deny_list"), event


def _serve_probe(demo_dir: Path, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    harness = Harness(demo_dir / assets.CONFIG_NAME, workdir, overrides)
    try:
        harness.wait_ready()
        seen = {
            "probe": _probe(harness),
            "landlock": harness.events("landlock")[0],
            "seccomp": sorted({e["syscall"] for e in harness.events("seccomp_violation")}),
        }
    finally:
        harness.kill()
    assert not process_group(harness.engine_pid)
    return seen


def test_the_device_stays_closed_without_its_landlock_rule(demo_dir: Path, workdir: Path) -> None:
    """engine.device = "cpu" builds the same sandbox without the /dev/nvidia* rule: the
    device cannot be opened. The control, the same with Landlock off, opens it: the refusal
    is Landlock's, not the files' modes."""
    abi = landlock.abi_version()
    if abi < 1:
        pytest.skip("this kernel has no Landlock")
    script = install(workdir, PROBE_MB)
    fenced = _serve_probe(demo_dir, workdir, _overrides(script, "cpu"))
    print("without the rule:", json.dumps(fenced["probe"]), "seccomp:", fenced["seccomp"])
    assert fenced["landlock"]["enforced"] is True
    assert not set(_device_files()) & set(fenced["landlock"]["filesystem"]["devices"])
    assert fenced["probe"]["open"]["/dev/nvidiactl"] == "EACCES", fenced["probe"]
    assert not fenced["probe"]["ok"] and "cuInit" in fenced["probe"].get("error", ""), fenced

    control = _serve_probe(demo_dir, workdir, _overrides(script, "cpu", 'sandbox.landlock="off"'))
    print("Landlock off:", json.dumps(control["probe"]), "seccomp:", control["seccomp"])
    assert control["landlock"]["enforced"] is False
    assert control["probe"]["open"]["/dev/nvidiactl"] == "ok", control["probe"]
    assert control["probe"]["ok"], control["probe"]


def test_the_watchdog_stops_a_sandboxed_engine_over_its_gpu_cap(
    demo_dir: Path, workdir: Path
) -> None:
    """The engine holds 512 MB of GPU memory under a 256 MiB cap: stopped, exit 6."""
    script = install(workdir, 512)
    harness = Harness(
        demo_dir / assets.CONFIG_NAME,
        workdir,
        _overrides(script, "cuda", f"engine.gpu_memory_limit={256 * MB}"),
    )
    try:
        assert harness.proc.wait(timeout=60) == 6, harness.log()[-3000:]
    finally:
        harness.kill()
    [event] = harness.events("memory_cap_exceeded")
    print("memory_cap_exceeded:", json.dumps(event))
    assert event["resource"] == "gpu_memory" and event["observed_bytes"] >= 512 * MB
    assert harness.events("shutdown")[-1]["exit_code"] == 6
    assert not process_group(harness.engine_pid)
