"""A tiny random Llama that the real vLLM (CPU build) can serve.

Deterministic: the same seed gives byte-identical files, so its digests can be pinned.
head_dim must be >= 32 for vLLM's CPU attention, hence hidden 256 with 4 heads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HIDDEN = 256
INTERMEDIATE = 512
HEADS = 4
LAYERS = 2
VOCAB = 512
MAX_POSITIONS = 256
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# A plain-text chat template: no tokens beyond the three specials are needed.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

_TEXT = """
the model serves requests behind a hardened front with mutual tls and a sandbox
weights are verified before loading secrets stay in memory the engine has no network
hello world user assistant system question answer please thank you yes no maybe
one two three four five six seven eight nine ten data token cache memory limit
"""
_WORDS = _TEXT.split()


def _corpus(lines: int = 2000) -> list[str]:
    rng = np.random.default_rng(7)
    words = np.array(_WORDS)
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 16)))) for _ in range(lines)]


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))  # noqa: S106 - a token, not a password
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_weights(seed: int = 0, layers: int = LAYERS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{proj}.weight"] = normal(HIDDEN, HIDDEN)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}.mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}.mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["lm_head.weight"] = normal(VOCAB, HIDDEN)
    return tensors


def _config(tokenizer: Tokenizer, layers: int = LAYERS) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "dtype": "float32",
        "torch_dtype": "float32",
        "bos_token_id": tokenizer.token_to_id("<s>"),
        "eos_token_id": tokenizer.token_to_id("</s>"),
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model(target: Path, seed: int = 0, layers: int = LAYERS) -> Path:
    """Write the model into `target` (replaced atomically) and return it. A draft model for
    speculative decoding is the same with one layer: same tokenizer, same vocabulary."""
    with _staging(target) as staging:
        tokenizer = build_tokenizer()
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(
            staging / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": MAX_POSITIONS,
                "chat_template": CHAT_TEMPLATE,
            },
        )
        _write_json(staging / "config.json", _config(tokenizer, layers))
        save_file(build_weights(seed, layers), str(staging / "model.safetensors"), {"format": "pt"})
    return target


# The LoRA adapter: every linear layer of every block, strong enough that greedy decoding
# with it differs from the base model (a test tells an applied adapter from an ignored one).
ADAPTER_RANK = 8
ADAPTER_TARGETS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def build_adapter(seed: int = 1) -> dict[str, np.ndarray]:
    """PEFT's tensor names and shapes: lora_A (rank, in), lora_B (out, rank)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(LAYERS):
        for module, (out_features, in_features) in ADAPTER_TARGETS.items():
            name = f"base_model.model.model.layers.{i}.{module}"
            shape_a, shape_b = (ADAPTER_RANK, in_features), (out_features, ADAPTER_RANK)
            tensors[f"{name}.lora_A.weight"] = (rng.standard_normal(shape_a) * 0.1).astype(
                np.float32
            )
            tensors[f"{name}.lora_B.weight"] = (rng.standard_normal(shape_b) * 0.1).astype(
                np.float32
            )
    return tensors


def write_adapter(target: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter for the demo model, as a trainer saves it (safetensors)."""
    with _staging(target) as staging:
        _write_json(
            staging / "adapter_config.json",
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": "demo",
                "r": ADAPTER_RANK,
                "lora_alpha": 2 * ADAPTER_RANK,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "target_modules": sorted(m.split(".")[1] for m in ADAPTER_TARGETS),
                "modules_to_save": None,
                "use_rslora": False,
                "use_dora": False,
            },
        )
        save_file(build_adapter(seed), str(staging / "adapter_model.safetensors"), {"format": "pt"})
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A folder next to `target`, filled by the caller, then put in its place atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    try:
        yield staging
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
