"""`[engine.vllm]`: the vLLM engine options a model team may set, one row each. Pure.

Each row names the option, what it must be, and the vLLM flag it becomes; adding an option is
one line. Nothing outside the table reaches vLLM's command line: options that load code or
reach outside the sandbox are refused by name with the reason, any other unknown one as not
allowlisted. Values are checked here, at config load (exit 2), not by vLLM a minute later.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

Check = Callable[[Any], str | None]  # a problem with the value, or None


@dataclass(frozen=True)
class Option:
    flag: str
    check: Check
    # True: a boolean becomes --flag / --no-flag. False: --flag VALUE (dicts as JSON).
    switch: bool = False


def _one_of(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        if value in allowed and type(value) is type(allowed[0]):
            return None
        return "must be one of " + ", ".join(json.dumps(a) for a in allowed)

    return check


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if type(value) is int and low <= value <= high:
            return None
        return f"must be an integer from {low} to {high}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _parser(names: tuple[str, ...]) -> Check:
    # A name looks up one of vLLM's built-in parsers, listed below (a test compares the lists
    # with the installed vLLM's); a path or a module would load code (tool_parser_plugin's
    # job, which is refused).
    def check(value: Any) -> str | None:
        if value in names:
            return None
        return "must be one of vLLM's built-in parsers: " + ", ".join(names)

    return check


def _media_limits(value: Any) -> str | None:
    kinds = {"image", "audio", "video"}
    if (
        isinstance(value, dict)
        and value.keys() <= kinds
        and all(type(v) is int and 0 <= v <= 64 for v in value.values())
    ):
        return None
    return 'must map "image", "audio" or "video" to a count from 0 to 64'


def _model_file(value: Any) -> str | None:
    """A file inside the verified model dir, named relative to it: vLLM also reads a chat
    template given inline or as any path, which would bypass verification."""
    path = PurePosixPath(value) if isinstance(value, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or not path.parts:
        return "must be a path relative to model.dir (a file of the verified model)"
    if not value.endswith(".jinja"):
        return "must name a .jinja file"
    return None


# vLLM's built-in tool-call and reasoning parsers ("hf" reads the verified tokenizer's
# response_template metadata: data, not code).
TOOL_PARSERS = (
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31",
    "deepseek_v32", "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma",
    "gemma4", "gigachat3", "glm45", "glm47", "granite", "granite-20b-fc", "granite4", "hermes",
    "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba", "k2_horizon",
    "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json", "llama4_pythonic",
    "longcat", "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse_glimmer",
    "olmo3", "openai", "phi4_mini_json", "plamo3", "poolside_v1", "pythonic", "qwen3_coder",
    "qwen3_json", "qwen3_xml", "seed_oss", "step3", "step3p5", "xlam",
)  # fmt: skip
REASONING_PARSERS = (
    "cohere_command3", "cohere_command4", "deepseek_r1", "deepseek_v3", "deepseek_v4",
    "deepseek_v41", "ernie45", "gemma4", "glm45", "glm47", "granite", "granite_thinking_parser",
    "hf", "holo2", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "k2_horizon", "kimi_k2",
    "kimi_k3", "ling3", "mimo", "minicpmv", "minimax_m2", "minimax_m2_append_think",
    "minimax_m3", "mistral", "muse_glimmer", "nemotron_v3", "olmo3", "openai_gptoss", "plamo3",
    "poolside_v1", "qwen3", "seed_oss", "step3", "step3p5",
)  # fmt: skip
# Built into vLLM, for checkpoints quantized ahead of time and stored as safetensors.
QUANTIZATIONS = (
    "awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "fbgemm_fp8", "compressed-tensors",
    "modelopt", "modelopt_fp4", "experts_int8", "moe_wna16", "mxfp4",
)  # fmt: skip
OPTIONS: dict[str, Option] = {
    "dtype": Option("--dtype", _one_of("auto", "bfloat16", "float16", "float32", "half", "float")),
    "quantization": Option("--quantization", _one_of(*QUANTIZATIONS)),
    "kv_cache_dtype": Option(
        "--kv-cache-dtype", _one_of("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
    ),
    "tensor_parallel_size": Option("--tensor-parallel-size", _integer(1, 64)),
    "pipeline_parallel_size": Option("--pipeline-parallel-size", _integer(1, 64)),
    "enable_prefix_caching": Option("--enable-prefix-caching", _boolean, switch=True),
    "enable_chunked_prefill": Option("--enable-chunked-prefill", _boolean, switch=True),
    "max_num_batched_tokens": Option("--max-num-batched-tokens", _integer(16, 1 << 24)),
    "block_size": Option("--block-size", _one_of(8, 16, 32, 64, 128)),
    "seed": Option("--seed", _integer(0, (1 << 32) - 1)),
    "max_logprobs": Option("--max-logprobs", _integer(0, 1024)),
    "tokenizer_mode": Option("--tokenizer-mode", _one_of("auto", "hf", "mistral")),
    "reasoning_parser": Option("--reasoning-parser", _parser(REASONING_PARSERS)),
    # Parsing the model's text into `tool_calls` (vLLM needs it for every tool_choice but
    # "none"): both together, with limits.tools.allow (the front forwards `tools` only then)
    # and structured_outputs.allow = "json_schema" (the parsers compile the tools' schemas).
    "enable_auto_tool_choice": Option("--enable-auto-tool-choice", _boolean, switch=True),
    "tool_call_parser": Option("--tool-call-parser", _parser(TOOL_PARSERS)),
    "limit_mm_per_prompt": Option("--limit-mm-per-prompt", _media_limits),
    "chat_template": Option("--chat-template", _model_file),
    # LoRA: the largest adapter rank (each adapter's is checked against it at start), adapters
    # in one batch, adapters kept in CPU memory. Only with [[engine.lora]].
    "max_lora_rank": Option("--max-lora-rank", _one_of(1, 8, 16, 32, 64, 128, 256, 320, 512)),
    "max_loras": Option("--max-loras", _integer(1, 64)),
    "max_cpu_loras": Option("--max-cpu-loras", _integer(1, 64)),
}
LORA_OPTIONS = frozenset({"max_lora_rank", "max_loras", "max_cpu_loras"})
# vLLM's default max_lora_rank.
DEFAULT_MAX_LORA_RANK = 16

# Options a user might reach for that harness never passes, and why.
_LOADS_CODE = "loads Python code into the engine"
_REACHES_OUT = "makes the engine read or fetch from outside the verified model"
REFUSED: dict[str, str] = {
    "trust_remote_code": _LOADS_CODE + " from the model dir",
    "worker_cls": _LOADS_CODE,
    "worker_extension_cls": _LOADS_CODE,
    "logits_processors": _LOADS_CODE,
    "logits_processor_pattern": _LOADS_CODE,
    "tool_parser_plugin": _LOADS_CODE,
    "middleware": _LOADS_CODE + " into its API server",
    "plugins": _LOADS_CODE,
    "model_impl": "chooses another model implementation (transformers may load remote code)",
    "hf_overrides": "rewrites the verified config.json (architecture, sizes) at load",
    "model_loader_extra_config": "configures the weight loader outside the safetensors path",
    "load_format": "harness loads safetensors only, the format it verifies",
    "download_dir": _REACHES_OUT,
    "tokenizer": _REACHES_OUT + " (the tokenizer must be the model dir's own)",
    "revision": _REACHES_OUT,
    "code_revision": _REACHES_OUT,
    "tokenizer_revision": _REACHES_OUT,
    "hf_token": _REACHES_OUT + " (and puts a credential in the engine)",
    "allowed_local_media_path": _REACHES_OUT + " (local files named by requests)",
    "allowed_media_domains": _REACHES_OUT + " (URLs named by requests)",
    "lora_extra_vocab_size": "adapters that add tokens change the verified vocabulary",
}
# Set by harness itself from other config keys.
OWN = {
    "model": "model.dir",
    "served_model_name": "model.served_name",
    "max_model_len": "engine.max_model_len",
    "max_num_seqs": "engine.max_num_seqs",
    "kv_cache_memory_bytes": "engine.kv_cache_memory_bytes",
    "gpu_memory_utilization": "engine.gpu_memory_limit",
    "uds": "the engine's runtime dir",
    "host": "the engine's runtime dir (it listens on a Unix socket only)",
    "port": "the engine's runtime dir (it listens on a Unix socket only)",
    "generation_config": "limits.max_tokens",
    "override_generation_config": "limits.max_tokens",
    "enforce_eager": "engine.device",
    "enable_lora": "[[engine.lora]] (adapters verified like the weights)",
    "lora_modules": "[[engine.lora]] (adapters verified like the weights)",
    "speculative_config": "[engine.draft] (a draft model verified like the weights)",
}


def ranks(options: dict[str, Any]) -> int:
    """The engine's worker processes: tensor x pipeline parallel size."""
    return int(options.get("tensor_parallel_size", 1)) * int(
        options.get("pipeline_parallel_size", 1)
    )


def validate(options: dict[str, Any]) -> dict[str, Any]:
    """Each option allowlisted and its value valid; raises ValueError naming the first
    problem (the config loader prefixes `engine.vllm`)."""
    for name, value in options.items():
        if name in REFUSED:
            raise ValueError(f"{name}: refused: it {REFUSED[name]}")
        if name in OWN:
            raise ValueError(f"{name}: harness sets this itself, from {OWN[name]}")
        option = OPTIONS.get(name)
        if option is None:
            raise ValueError(
                f"{name}: not an option harness passes to vLLM (allowed: {', '.join(OPTIONS)})"
            )
        problem = option.check(value)
        if problem:
            raise ValueError(f"{name}: {problem}; got {json.dumps(value)}")
    return options


def argv(options: dict[str, Any], model_dir: PurePosixPath | Any) -> list[str]:
    """The vLLM flags for validated options, in the table's order."""
    out: list[str] = []
    for name, option in OPTIONS.items():
        if name not in options:
            continue
        value = options[name]
        if option.switch:
            out.append(option.flag if value else "--no-" + option.flag.removeprefix("--"))
        elif name == "chat_template":
            out += [option.flag, str(model_dir / value)]
        elif isinstance(value, dict):
            out += [option.flag, json.dumps(value, separators=(",", ":"))]
        else:
            out += [option.flag, str(value)]
    return out
