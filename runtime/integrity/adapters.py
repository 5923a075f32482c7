"""What the engine would refuse a minute into loading, refused before it starts: a LoRA
adapter whose rank is over engine.vllm.max_lora_rank, a draft model whose vocabulary is not
the model's. Reads only files already verified (step 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime import vllm_options
from runtime.errors import ConfigError
from runtime.integrity import model_dir, policy

if TYPE_CHECKING:
    from runtime.config import Config


def rank(adapter_config: Any) -> int | None:
    """The largest LoRA rank a PEFT adapter_config.json declares: `r`, or a per-module one
    in `rank_pattern`. None: it declares none that is a positive integer."""
    if not isinstance(adapter_config, dict):
        return None
    ranks = [adapter_config.get("r")]
    pattern = adapter_config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    if not ranks or any(type(r) is not int or r < 1 for r in ranks):
        return None
    return max(ranks)


def check(cfg: Config, model: model_dir.Verified, others: dict[str, model_dir.Verified]) -> None:
    limit = cfg.engine.vllm.get("max_lora_rank", vllm_options.DEFAULT_MAX_LORA_RANK)
    for adapter in cfg.engine.lora:
        label = f"engine.lora[{adapter.name}]"
        declared = rank(model_dir.read_json(others[label], "adapter_config.json"))
        if declared is None:
            raise ConfigError(
                f"{label}: adapter_config.json names no LoRA rank (r) as a positive integer",
                fix="use the adapter_config.json its trainer (PEFT) wrote",
            )
        if declared > limit:
            allowed = vllm_options.OPTIONS["max_lora_rank"].check
            fits = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512, declared) if r >= declared)
            raise ConfigError(
                f"{label}: the adapter's rank is {declared}, over engine.vllm.max_lora_rank "
                f"({limit}); vLLM would refuse it after loading the model",
                fix=f"set engine.vllm.max_lora_rank = {fits}"
                if allowed(fits) is None
                else "retrain the adapter with a rank of at most 512",
            )
    draft = others.get("engine.draft")
    if draft is not None:
        mine = policy.vocab_size(model_dir.read_json(draft, "config.json"))
        if mine != model.vocab_size:
            raise ConfigError(
                f"engine.draft: its vocabulary ({mine} tokens) is not the model's "
                f"({model.vocab_size}): its proposals would be other tokens",
                fix="use a draft model trained with the model's tokenizer",
            )
