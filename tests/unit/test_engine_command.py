"""The engine's argv and environment: pure functions, checked without starting anything."""

from __future__ import annotations

from pathlib import Path

from runtime.engine.command import RuntimePaths, build_plan
from tests.support.configs import engine_config

PATHS = RuntimePaths(Path("/run/harness-x"))


def _flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_engine_listens_on_a_unix_socket_only() -> None:
    argv = build_plan(engine_config(), PATHS, {}).argv
    assert _flag(argv, "--uds") == "/run/harness-x/engine.sock"
    assert not {"--host", "--port"} & set(argv)
    assert "--trust-remote-code" not in argv


def test_token_cap_and_offline_flags() -> None:
    argv = build_plan(engine_config(), PATHS, {}).argv
    assert _flag(argv, "--override-generation-config") == '{"max_new_tokens": 48}'
    assert _flag(argv, "--generation-config") == "vllm"
    assert _flag(argv, "--load-format") == "safetensors"
    assert _flag(argv, "--served-model-name") == "demo"
    assert _flag(argv, "--kv-cache-memory-bytes") == str(1 << 26)
    assert "--enforce-eager" in argv and "--disable-fastapi-docs" in argv
    assert "--enforce-eager" not in build_plan(engine_config(device="cuda"), PATHS, {}).argv


def test_environment_is_built_from_an_allowlist() -> None:
    parent = {
        "AWS_SECRET_ACCESS_KEY": "s",
        "VAULT_TOKEN": "t",
        "HTTPS_PROXY": "http://p",
        "PYTHONPATH": "/evil",
        "LD_PRELOAD": "/evil.so",
        "OMP_NUM_THREADS": "2",
        "HOME": "/root",
    }
    env = build_plan(
        engine_config(env_passthrough=["OMP_NUM_THREADS", "NOT_SET"]), PATHS, parent
    ).env
    assert env["OMP_NUM_THREADS"] == "2"
    assert "NOT_SET" not in env
    for name in ("AWS_SECRET_ACCESS_KEY", "VAULT_TOKEN", "HTTPS_PROXY", "PYTHONPATH", "LD_PRELOAD"):
        assert name not in env
    assert env["HOME"] == "/run/harness-x/home"
    assert env["HF_HUB_OFFLINE"] == env["VLLM_NO_USAGE_STATS"] == env["DO_NOT_TRACK"] == "1"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_MAX_N_SEQUENCES"] == "16"
    for name in (
        "VLLM_CACHE_ROOT",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "TMPDIR",
        "NUMBA_CACHE_DIR",
        "OUTLINES_CACHE_DIR",
        "VLLM_RPC_BASE_PATH",
    ):
        assert env[name].startswith("/run/harness-x/"), name


def test_passthrough_cannot_override_the_hardened_values() -> None:
    parent = {"HF_HUB_OFFLINE": "0", "VLLM_HOST_IP": "8.8.8.8"}
    env = build_plan(
        engine_config(env_passthrough=["HF_HUB_OFFLINE", "VLLM_HOST_IP"]), PATHS, parent
    ).env
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_HOST_IP"] == "127.0.0.1"
