"""The CUDA image (images/gpu/Containerfile), as far as it can be checked without a GPU.

`make image-gpu` builds it on any machine; serving needs an NVIDIA GPU and the node's driver,
so here the image is started the way deploy/overlays/gpu starts it (read-only root, uid 10001,
no capabilities, no-new-privileges) and inspected: the CUDA builds of torch and vLLM import,
harness runs under tini, the HEALTHCHECK is kept, and the compiler and Python headers Triton
needs at first use work as uid 10001 on the read-only root. Skipped where the image was not
built (`make image-gpu-test` builds it first; it is not part of `make test`).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.container import ENV, UID

GPU_IMAGE = os.environ.get("HARNESS_GPU_IMAGE", "localhost/harness:gpu")

pytestmark = pytest.mark.image_gpu


def _built() -> bool:
    try:
        found = subprocess.run(
            ["podman", "image", "exists", GPU_IMAGE], env=ENV, check=False, timeout=60
        )
    except FileNotFoundError:
        return False
    return found.returncode == 0


@pytest.fixture(scope="module", autouse=True)
def _needs_image() -> None:
    if not _built():
        if os.environ.get("HARNESS_GPU_IMAGE"):
            pytest.fail(f"{GPU_IMAGE} is not there after `make image-gpu`")
        pytest.skip(f"{GPU_IMAGE} is not built (make image-gpu)")


def _run(*command: str, entrypoint: str = "python3.11") -> subprocess.CompletedProcess[str]:
    """A command in the image, as the GPU Deployment runs it, without a GPU."""
    run = [
        "podman", "run", "--rm", "--read-only", "--read-only-tmpfs=false",
        # /tmp as the Deployment's emptyDir is (not noexec): Triton loads what it builds there.
        "--tmpfs", "/tmp:rw,exec,mode=1777", "--tmpfs", "/run/harness:rw,mode=1777",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--user", f"{UID}:{UID}", "--health-interval", "disable",
        "--entrypoint", entrypoint, GPU_IMAGE, *command,
    ]  # fmt: skip
    return subprocess.run(
        run,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_cuda_builds_of_torch_and_vllm_are_what_the_image_holds() -> None:
    """torch's CUDA build and vLLM's OpenAI server import as uid 10001 on the read-only root;
    pip is gone."""
    probe = (
        "import json, importlib.metadata as m, torch\n"
        "import vllm.entrypoints.openai.api_server  # what harness runs, without a GPU too\n"
        "print(json.dumps({'cuda': torch.version.cuda, 'vllm': m.version('vllm'),"
        " 'harness': m.version('harness'), 'pip': any(d.metadata['Name'] == 'pip'"
        " for d in m.distributions())}))"
    )
    done = _run("-c", probe)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["cuda"], found  # a CUDA build, not the CPU one
    assert found["vllm"] == "0.32.0" and found["pip"] is False


def test_triton_can_build_and_load_its_launchers_as_uid_10001_on_a_read_only_root() -> None:
    """gcc-12 and Python.h, for the C launchers Triton compiles at first use: a shared object
    built against Python.h into /tmp (HOME) and loaded, as Triton does."""
    include = "$(python3.11 -c 'import sysconfig; print(sysconfig.get_paths()[\"include\"])')"
    script = (
        "printf '#include <Python.h>\\nint answer(void){return Py_LT;}\\n' > /tmp/t.c"
        f' && "$CC" -shared -fPIC -I"{include}" -o /tmp/t.so /tmp/t.c'
        " && python3.11 -c 'import ctypes; print(ctypes.CDLL(\"/tmp/t.so\").answer())' && id -u"
    )
    done = _run("-c", script, entrypoint="/bin/sh")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", str(UID)]  # Py_LT is 0


def test_the_image_keeps_its_healthcheck_and_starts_harness_under_tini() -> None:
    inspect = subprocess.run(
        ["podman", "image", "inspect", GPU_IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    found = json.loads(inspect.stdout)[0]
    config = found["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "harness", "serve"]
    assert "8443" in " ".join(found["Healthcheck"]["Test"])  # docker format keeps it
    done = _run("--help", entrypoint="harness")
    assert done.returncode == 0 and "serve" in done.stdout, done.stderr
