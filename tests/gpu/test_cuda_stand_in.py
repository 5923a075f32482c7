"""The CUDA stand-in engine (cuda_engine.py) checked where CI runs, without a GPU, so that it is
known to work before a GPU run spends its minutes on it: its forward pass is the demo model's
(greedy tokens equal those of transformers' Llama), and the real `harness serve` runs it in
the full engine sandbox, the seccomp filter in `enforce` with the CPU profile, where it says
why CUDA did not start and serves from the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.demo import assets
from tests.gpu import cuda_engine
from tests.support import client_context
from tests.support.harness import Harness, engine_lines, openai_client

torch = pytest.importorskip("torch")


def test_the_forward_pass_is_the_demo_model(demo_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = demo_dir / "model"
    reference = transformers.LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    prompt = [1, 5, 9, 33, 100]
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    mine = cuda_engine.TinyLlama(model_dir, "cpu").generate(prompt, 12)
    assert mine == expected[0, len(prompt) :].tolist()[: len(mine)]
    assert len(mine) == 12 or mine[-1] == reference.config.eos_token_id


@pytest.mark.skipif(
    Path("/dev/nvidiactl").exists(), reason="a GPU machine: test_gpu_sandbox runs the stand-in"
)
def test_harness_serves_it_in_the_sandbox_without_a_gpu(demo_dir: Path, open_tmp: Path) -> None:
    from tests.gpu.test_gpu_sandbox import CPU_PROFILE, overrides

    script = cuda_engine.install(open_tmp, "cuda-engine")
    settings = [s for s in overrides(script, "cpu") if not s.startswith("sandbox.seccomp=")]
    assert f'sandbox.seccomp_profile="{CPU_PROFILE}"' in settings
    harness = Harness(demo_dir / assets.CONFIG_NAME, open_tmp, settings)
    try:
        harness.wait_ready()
        [line] = [ln for ln in engine_lines(harness.log()) if ln.startswith(cuda_engine.MARKER)]
        report = json.loads(line.removeprefix(cuda_engine.MARKER))
        assert not report["ok"] and report["model_device"] == "cpu" and report["error"]
        assert report["pid"] != harness.engine_pid  # the engine core, a process of its own
        pki = demo_dir / "pki"
        ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
        client = openai_client(harness.url, ctx)
        with client:  # closed before harness stops
            done = client.completions.create(model=assets.SERVED_NAME, prompt="hi", max_tokens=5)
        assert done.usage is not None and 0 < done.usage.completion_tokens <= 5
        assert harness.events("seccomp_install")[0]["mode"] == "enforce"
        assert not harness.events("seccomp_violation")
    finally:
        harness.kill()
    assert harness.proc.returncode == 0
