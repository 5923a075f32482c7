"""`[engine.vllm]`: every allowlisted option reaches vLLM's command line as a flag that vLLM's
own argument parser accepts with that value; every refused or unknown one is a config error
(exit 2) naming it and saying why. vLLM's parser is the installed vLLM's (CPU build); no
engine is started."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runtime import config as config_mod
from runtime import vllm_options as options
from runtime.engine.command import RuntimePaths, build_argv
from runtime.errors import ConfigError

VALID: dict[str, Any] = {
    "dtype": "bfloat16",
    "quantization": "awq",
    "kv_cache_dtype": "fp8",
    "tensor_parallel_size": 2,
    "pipeline_parallel_size": 1,
    "enable_prefix_caching": False,
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 4096,
    "block_size": 32,
    "seed": 7,
    "max_logprobs": 5,
    "tokenizer_mode": "mistral",
    "reasoning_parser": "deepseek_r1",
    "limit_mm_per_prompt": {"image": 2, "video": 0},
    "chat_template": "templates/chat.jinja",
    "max_lora_rank": 32,
    "max_loras": 2,
    "max_cpu_loras": 4,
    "enable_auto_tool_choice": True,
    "tool_call_parser": "hermes",
}
INVALID: dict[str, Any] = {
    "dtype": "bf16",
    "quantization": "gguf",
    "kv_cache_dtype": "int3",
    "tensor_parallel_size": 0,
    "pipeline_parallel_size": "2",
    "enable_prefix_caching": "yes",
    "enable_chunked_prefill": 1,
    "max_num_batched_tokens": 1,
    "block_size": 24,
    "seed": -1,
    "max_logprobs": True,
    "tokenizer_mode": "custom",
    "reasoning_parser": "my.module:Parser",
    "limit_mm_per_prompt": {"image": 1000},
    "chat_template": "../elsewhere/chat.jinja",
    "max_lora_rank": 24,
    "max_loras": 0,
    "max_cpu_loras": 100,
    "enable_auto_tool_choice": "yes",
    "tool_call_parser": "my.module:Parser",
}
# Set together, with the front forwarding tools (cross-checked at load).
TOOL_OPTIONS = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


def _config(tmp_path: Path, vllm: dict[str, Any], **engine: Any) -> config_mod.Config:
    if options.LORA_OPTIONS & vllm.keys():  # they go with an adapter
        engine.setdefault("lora", [{"name": "a", "dir": str(tmp_path), "unsafe_unsigned": True}])
    limits = {}
    if TOOL_OPTIONS.keys() & vllm.keys():
        vllm = {**TOOL_OPTIONS, **vllm}
        limits = {"tools": {"allow": True}, "structured_outputs": {"allow": "json_schema"}}
    return config_mod.Config.model_validate(
        {
            "model": {"dir": str(tmp_path), "served_name": "demo", "unsafe_unsigned": True},
            "front": {
                "allowed_identities": ["spiffe://x/y"],
                "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"},
            },
            "engine": {"vllm": vllm, **engine},
            "limits": limits,
        }
    )


def test_the_tables_cover_each_other() -> None:
    assert VALID.keys() == INVALID.keys() == options.OPTIONS.keys()
    assert not options.OPTIONS.keys() & options.REFUSED.keys()
    assert not options.OPTIONS.keys() & options.OWN.keys()


@pytest.mark.parametrize("name", sorted(options.OPTIONS))
def test_each_allowlisted_option_becomes_its_flag(name: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, {name: VALID[name]})
    argv = build_argv(cfg, RuntimePaths(tmp_path / "run"))
    flag = options.OPTIONS[name].flag
    if options.OPTIONS[name].switch:
        assert (flag if VALID[name] else "--no-" + flag[2:]) in argv
    else:
        value = argv[argv.index(flag) + 1]
        if name == "chat_template":
            assert value == str(tmp_path / VALID[name])  # inside the verified model dir
        else:
            assert value.strip('{}"').replace('"', "")  # something was passed


@pytest.mark.parametrize("name", sorted(options.OPTIONS))
def test_each_allowlisted_option_refuses_a_bad_value_by_name(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, name, INVALID[name])
    assert f"{name}:" in info.value.message and "engine.vllm" in info.value.message


@pytest.mark.parametrize("name", sorted(options.REFUSED) + sorted(options.OWN) + ["foo"])
def test_options_that_load_code_or_are_not_allowlisted_are_refused(
    name: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, name, True)
    message = info.value.message
    assert f"{name}:" in message
    if name in options.REFUSED:
        assert "refused" in message and options.REFUSED[name] in message
    elif name in options.OWN:
        assert options.OWN[name] in message
    else:
        assert "not an option harness passes" in message


def _load(tmp_path: Path, name: str, value: Any) -> config_mod.Config:
    """Through the config file loader and its --set overrides, as `harness check` reads it."""
    base = tmp_path / "harness.toml"
    base.write_text(
        f'[model]\ndir = "{tmp_path}"\nserved_name = "demo"\nunsafe_unsigned = true\n'
        '[front]\nallowed_identities = ["spiffe://x/y"]\n'
        '[front.tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
    )
    adapter = f'engine.lora=[{{name="a", dir="{tmp_path}", unsafe_unsigned=true}}]'
    return config_mod.load(
        base,
        [f"engine.vllm.{name}={_toml(value)}"]
        + ([adapter] if name in options.LORA_OPTIONS else []),
    )


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def test_vllm_s_own_parser_accepts_every_flag_harness_passes(tmp_path: Path) -> None:
    """All options at once, through vLLM's serve argument parser and engine arguments."""
    from vllm.engine import arg_utils
    from vllm.entrypoints.launchers import cli_args
    from vllm.utils import argparse_utils as utils

    adapters = [
        {"name": "support", "dir": str(tmp_path / "a"), "unsafe_unsigned": True},
        {"name": "legal.v2", "dir": str(tmp_path / "b=c"), "unsafe_unsigned": True},
    ]
    draft = {"dir": str(tmp_path / "draft"), "unsafe_unsigned": True, "num_speculative_tokens": 4}
    cfg = _config(tmp_path, VALID, lora=adapters, draft=draft)
    argv = build_argv(cfg, RuntimePaths(tmp_path / "run"))
    parser = cli_args.make_arg_parser(utils.FlexibleArgumentParser())
    args = parser.parse_args(argv[argv.index("--model") :])
    engine = arg_utils.AsyncEngineArgs.from_cli_args(args)
    assert engine.dtype == "bfloat16" and engine.tensor_parallel_size == 2
    assert engine.enable_lora and engine.max_lora_rank == 32 and engine.max_loras == 2
    # Paths with "=" in them stay whole (the modules are passed as JSON).
    assert [(m.name, m.path) for m in args.lora_modules] == [
        ("support", str(tmp_path / "a")),
        ("legal.v2", str(tmp_path / "b=c")),
    ]
    assert engine.speculative_config == {
        "method": "draft_model",
        "model": str(tmp_path / "draft"),
        "num_speculative_tokens": 4,
    }
    assert engine.enable_prefix_caching is False and engine.block_size == 32
    assert engine.limit_mm_per_prompt == {"image": 2, "video": 0}
    assert args.chat_template == str(tmp_path / "templates/chat.jinja")
    assert args.reasoning_parser == "deepseek_r1"
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates/chat.jinja").write_text("{{ messages }}")
    cli_args.validate_parsed_serve_args(args)  # vLLM's own cross-checks, before loading


def test_quantizations_and_parsers_named_are_vllm_s_built_in_ones() -> None:
    from vllm import reasoning, tool_parsers
    from vllm.model_executor.layers import quantization

    assert set(options.QUANTIZATIONS) <= set(quantization.QUANTIZATION_METHODS)
    # Equal, not a subset: a vLLM upgrade that adds or drops one shows here.
    assert tuple(reasoning.ReasoningParserManager.list_registered()) == options.REASONING_PARSERS
    assert tuple(tool_parsers.ToolParserManager.list_registered()) == options.TOOL_PARSERS


@pytest.mark.parametrize(
    ("vllm", "tools", "expected"),
    [
        ({"enable_auto_tool_choice": True}, True, "needs engine.vllm.tool_call_parser"),
        ({"tool_call_parser": "hermes"}, True, "only with engine.vllm.enable_auto_tool_choice"),
        (
            {"enable_auto_tool_choice": False, "tool_call_parser": "hermes"},
            True,
            "only with engine.vllm.enable_auto_tool_choice",
        ),
        (TOOL_OPTIONS, False, "only with limits.tools.allow = true"),
        (TOOL_OPTIONS, True, 'limits.structured_outputs.allow = "json_schema"'),
    ],
)
def test_tool_call_parsing_is_set_whole_or_not_at_all(
    vllm: dict[str, Any], tools: bool, expected: str, tmp_path: Path
) -> None:
    base = tmp_path / "harness.toml"
    base.write_text(
        f'[model]\ndir = "{tmp_path}"\nserved_name = "demo"\nunsafe_unsigned = true\n'
        '[front]\nallowed_identities = ["spiffe://x/y"]\n'
        '[front.tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
    )
    overrides = [f"engine.vllm.{k}={_toml(v)}" for k, v in vllm.items()]
    with pytest.raises(ConfigError) as info:
        config_mod.load(base, [*overrides, f"limits.tools.allow={_toml(tools)}"])
    assert expected in info.value.message


def test_the_example_of_a_real_model_layout_is_a_valid_config() -> None:
    """examples/llama-70b-tp2.toml: validated as `harness check` reads it (not served: the
    weights are not here), and its options reach vLLM's command line."""
    example = Path(__file__).resolve().parents[2] / "examples" / "llama-70b-tp2.toml"
    cfg = config_mod.load(example)
    argv = build_argv(cfg, RuntimePaths(Path("/run/harness/x")))
    joined = " ".join(argv)
    for flag in (
        "--dtype bfloat16",
        "--tensor-parallel-size 2",
        "--enable-prefix-caching",
        "--enable-auto-tool-choice",
        "--tool-call-parser llama3_json",
        "--enable-lora",
        "--max-lora-rank 64",
    ):
        assert flag in joined
    assert cfg.limits.structured_outputs.allow == "json_schema" and cfg.limits.tools.allow
    assert cfg.served_names == ("llama-70b-instruct", "support-v3")


def test_a_parallel_engine_without_its_own_network_namespace_is_refused(
    demo_dir: Path, open_tmp: Path
) -> None:
    """vLLM's ranks meet over TCP on ports they pick: allowed only inside the engine's own
    network namespace. Without one, harness refuses to start the engine (exit 5), saying why
    (the stand-in engine; nothing is served)."""
    from tests.support.harness import stand_in_harness

    harness = stand_in_harness(
        demo_dir, open_tmp, 'sandbox.namespaces="off"', "engine.vllm.tensor_parallel_size=2"
    )
    try:
        assert harness.proc.wait(timeout=60) == 5
    finally:
        harness.kill()
    [shutdown] = harness.events("shutdown")
    assert "network namespace" in shutdown["message"]
    assert not harness.events("engine_ready")
