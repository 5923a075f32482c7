"""LoRA adapters ([[engine.lora]]) and the draft model ([engine.draft]) are verified like the
weights, through the real `harness` entry point on the demo's signed artifacts: a bad one
stops harness before the engine starts (exit 3, or 2 for what vLLM would refuse a minute
later), naming the config key. Serving them with the real vLLM is in test_serve_e2e.py; as a
pod's uid 10001 in test_pod_mode.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from runtime import config as config_mod
from runtime.demo import assets, pki
from runtime.demo.model import write_adapter, write_model
from runtime.engine.command import RuntimePaths, build_env
from runtime.errors import ConfigError, IntegrityError
from runtime.integrity import adapters, model_dir, signature
from tests.support import DRAFT, LORA, LORA_NAME, run_cli


def _harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout)


def _events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    assets.ensure(tmp_path)
    return tmp_path


def _check(demo: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return _harness("check", "--config", str(demo / assets.CONFIG_NAME), "--json", *sets)


def test_check_verifies_each_artifact_and_shows_the_engine_flags(demo: Path) -> None:
    result = _check(demo, LORA, DRAFT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["served_names"] == ["demo", LORA_NAME]
    others = report["controls"]["weight_integrity"]["others"]
    assert others[f"engine.lora[{LORA_NAME}]"]["files"] == 2
    assert others["engine.draft"]["files"] == 4
    argv = report["engine"]["argv"]
    module = json.loads(argv[argv.index("--lora-modules") + 1])
    assert module == {"name": LORA_NAME, "path": str(demo / "adapter")}
    draft = json.loads(argv[argv.index("--speculative-config") + 1])
    assert draft["method"] == "draft_model" and draft["model"] == str(demo / "draft")
    checks = [e for e in _events(result.stderr) if e["event_type"] == "weight_integrity_check"]
    assert [e["artifact"] for e in checks] == ["model", f"engine.lora[{LORA_NAME}]", "engine.draft"]
    assert all(e["outcome"] == "ok" and e["signer"].startswith("key:") for e in checks)


def _tamper(folder: Path) -> None:
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


def _sign_with_another_key(folder: Path) -> None:
    key = folder.parent / "other-key.pem"
    pki.write_private_key(ec.generate_private_key(ec.SECP256R1()), key)
    signature.sign_model(folder, key, folder.parent / f"{folder.name}.sig")


HOSTILE = {
    "tampered adapter": ("adapter", _tamper, "adapter_model.safetensors: SHA-256 mismatch"),
    "pickle in the adapter": (
        "adapter",
        lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04."),
        "adapter_model.bin: refused: PyTorch pickle",
    ),
    "adapter replaced by another": (
        "adapter",
        lambda d: write_adapter(d, seed=9),
        "adapter_model.safetensors: SHA-256 mismatch",
    ),
    "adapter signed by another key": (
        "adapter",
        lambda d: _sign_with_another_key(d),
        "signed with another key",
    ),
    "tampered draft": ("draft", _tamper, "model.safetensors: SHA-256 mismatch"),
    "code in the draft": (
        "draft",
        lambda d: (d / "modeling_draft.py").write_text("import os\n"),
        "modeling_draft.py: refused: Python code",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_bad_adapter_or_draft_stops_serve_with_exit_3_before_the_engine(
    demo: Path, case: str
) -> None:
    folder, spoil, said = HOSTILE[case]
    spoil(demo / folder)
    result = _harness(
        "serve", "--config", str(demo / assets.CONFIG_NAME), "--set", LORA, "--set", DRAFT
    )
    assert result.returncode == 3, result.stderr
    label = f"engine.lora[{LORA_NAME}]" if folder == "adapter" else "engine.draft"
    assert f"error: {label}: " in result.stderr and said in result.stderr
    assert "model dir" not in result.stderr and "model.signature" not in result.stderr
    assert "fix:" in result.stderr
    events = _events(result.stdout)
    kinds = [e["event_type"] for e in events]
    assert "engine_start" not in kinds
    [blocked] = [
        e
        for e in events
        if e["event_type"] == "weight_integrity_check" and e["outcome"] == "blocked"
    ]
    assert blocked["artifact"] == label


def test_an_adapter_over_max_lora_rank_is_exit_2_with_the_setting_that_fits(demo: Path) -> None:
    config = demo / "adapter" / "adapter_config.json"
    doc = json.loads(config.read_text())
    doc["rank_pattern"] = {"q_proj": 64}  # PEFT: a larger rank for some modules
    config.write_text(json.dumps(doc))
    key = demo / "signing-key.pem"
    signature.sign_model(demo / "adapter", key, demo / "adapter.sig")
    result = _check(demo, LORA)
    assert result.returncode == 2, result.stderr
    assert "the adapter's rank is 64, over engine.vllm.max_lora_rank (16)" in result.stderr
    assert "set engine.vllm.max_lora_rank = 64" in result.stderr
    assert _check(demo, LORA, "engine.vllm.max_lora_rank=64").returncode == 0


def test_a_draft_with_another_vocabulary_is_exit_2(demo: Path) -> None:
    config = demo / "draft" / "config.json"
    doc = json.loads(config.read_text())
    doc["vocab_size"] = 1024
    config.write_text(json.dumps(doc))
    signature.sign_model(demo / "draft", demo / "signing-key.pem", demo / "draft.sig")
    result = _check(demo, DRAFT)
    assert result.returncode == 2, result.stderr
    assert "engine.draft: its vocabulary (1024 tokens) is not the model's (512)" in result.stderr


def test_an_adapter_is_not_a_model_and_a_model_is_not_an_adapter(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    model = write_model(tmp_path / "model")
    with pytest.raises(IntegrityError) as info:
        model_dir.verify(adapter)  # as model.dir
    assert "config.json is missing" in info.value.message and "[[engine.lora]]" in info.value.fix
    with pytest.raises(IntegrityError, match=r"adapter_config\.json is missing"):
        model_dir.verify(model, kind="adapter")
    assert model_dir.verify(adapter, kind="adapter").files.keys() == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # `harness sign` takes either, as its files say.
    assert model_dir.verify(adapter, kind=None).files.keys() == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_adapter_ranks_are_read_as_peft_writes_them() -> None:
    assert adapters.rank({"r": 8}) == 8
    assert adapters.rank({"r": 8, "rank_pattern": {"q_proj": 32, "v_proj": 4}}) == 32
    for bad in ({}, {"r": 0}, {"r": "8"}, {"r": True}, {"r": 8, "rank_pattern": {"q": 2.5}}, []):
        assert adapters.rank(bad) is None, bad


def _config(demo: Path, *overrides: str) -> config_mod.Config:
    return config_mod.load(demo / assets.CONFIG_NAME, list(overrides))


ADAPTER = 'name="{name}", dir="adapter", unsafe_unsigned=true'
BAD_CONFIGS = {
    "unsigned without saying so": (
        'engine.lora=[{name="a", dir="adapter"}]',
        "[signature] is missing",
    ),
    "two adapters, one name": (
        f"engine.lora=[{{{ADAPTER.format(name='a')}}}, {{{ADAPTER.format(name='a')}}}]",
        "two adapters are named 'a'",
    ),
    "the model's name": (
        f"engine.lora=[{{{ADAPTER.format(name='demo')}}}]",
        "the model is served under that name",
    ),
    "a name with a space": (
        f"engine.lora=[{{{ADAPTER.format(name='my adapter')}}}]",
        "engine.lora.0.name",
    ),
    "lora options without an adapter": (
        "engine.vllm.max_loras=2",
        "engine.vllm.max_loras is set but no [[engine.lora]] adapter is",
    ),
    "a runtime LoRA switch passed through": (
        'engine.env_passthrough=["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]',
        "unverified adapters at run time",
    ),
    "too many speculative tokens": (
        'engine.draft={dir="draft", unsafe_unsigned=true, num_speculative_tokens=64}',
        "num_speculative_tokens",
    ),
    "a code-loading option for adapters": (
        "engine.vllm.enable_lora=true",
        "harness sets this itself, from [[engine.lora]]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_adapter_config_is_exit_2_naming_the_key(demo: Path, case: str) -> None:
    override, said = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        _config(demo, override)
    assert said in info.value.message


def test_the_runtime_lora_switch_never_reaches_the_engine(demo: Path) -> None:
    cfg = _config(demo, 'engine.env_passthrough=["HARNESS_X"]')
    parent = {"HARNESS_X": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": "x"}
    env = build_env(cfg, RuntimePaths(demo / "run"), parent, os.sched_getaffinity(0))
    assert env["HARNESS_X"] == "1"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env and "VLLM_PLUGINS" not in env


@pytest.mark.skipif(os.geteuid() != 0, reason="lists the folder as another uid")
def test_a_folder_harness_cannot_list_is_named_not_taken_for_empty(open_tmp: Path) -> None:
    """os.walk skips what it cannot list: a model with an unreadable subfolder would verify
    as a smaller one. Listed as uid 10001 in a forked child."""
    model = write_model(open_tmp / "model")
    hidden = model / "extra"
    hidden.mkdir(mode=0o700)
    shutil.copy(model / "config.json", hidden / "config.json")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setresuid(10001, 10001, 10001)
            model_dir.verify(model)
            message = "verified"
        except IntegrityError as exc:
            message = exc.message
        except BaseException as exc:  # reported to the parent
            message = repr(exc)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert message == f"model dir: {hidden}: cannot list: Permission denied"
