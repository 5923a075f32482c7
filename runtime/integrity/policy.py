"""The model-dir policy. Pure: a listing (and parsed JSON) in, an IntegrityError out.

Allowlist, not denylist: a model dir may hold safetensors weights, JSON configs, tokenizer
files, chat templates and plain text. Code and pickles are refused by name with the reason,
because vLLM's trust_remote_code=False has been bypassed through each of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from runtime.errors import IntegrityError

Kind = Literal["file", "dir", "symlink", "other"]
# What a folder holds: a model (config.json) or a LoRA adapter (PEFT's adapter_config.json).
ArtifactKind = Literal["model", "adapter"]
CONFIG_FILE: dict[ArtifactKind, str] = {"model": "config.json", "adapter": "adapter_config.json"}


def kind_of(names: Iterable[str]) -> ArtifactKind:
    """An adapter when it has adapter_config.json and no config.json (for `harness sign`,
    which signs either; serving names the kind it expects)."""
    present = set(names)
    if "adapter_config.json" in present and "config.json" not in present:
        return "adapter"
    return "model"


ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".jinja", ".model", ".md"})
ALLOWED_NAMES = frozenset({"LICENSE", "NOTICE"})
# Formats that execute code when loaded, with the reason a model team reads.
REFUSED_SUFFIXES = {
    ".bin": "PyTorch pickle weights (code runs on load)",
    ".pt": "PyTorch pickle (code runs on load)",
    ".pth": "PyTorch pickle (code runs on load)",
    ".pkl": "pickle (code runs on load)",
    ".pickle": "pickle (code runs on load)",
    ".ckpt": "checkpoint pickle (code runs on load)",
    ".npy": "NumPy array (may hold pickles)",
    ".npz": "NumPy archive (may hold pickles)",
    ".py": "Python code (remote code)",
    ".pyc": "compiled Python (remote code)",
    ".so": "native library",
    ".gguf": "GGUF weights (not verified by harness)",
    ".h5": "HDF5 weights (not verified by harness)",
    ".msgpack": "Flax weights (not verified by harness)",
}
# Keys that make transformers import code from the model dir or the hub.
REFUSED_JSON_KEYS = frozenset({"auto_map"})


@dataclass(frozen=True)
class Entry:
    name: str  # relative to the model dir, '/'-separated
    kind: Kind


def _fail(name: str, what: str, fix: str) -> IntegrityError:
    return IntegrityError(f"model dir: {name}: {what}", fix=fix)


def check_listing(entries: Iterable[Entry], kind: ArtifactKind = "model") -> list[str]:
    """Check every entry; return the files (sorted). Raises on the first violation."""
    files = []
    for entry in sorted(entries, key=lambda e: e.name):
        parts = entry.name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise _fail(entry.name, "path component '..', '.' or empty", "rename it")
        if entry.kind == "symlink":
            raise _fail(
                entry.name,
                "is a symlink (it could point anywhere, and change after verification)",
                "replace it with the file it points to",
            )
        if entry.kind == "other":
            raise _fail(entry.name, "is not a regular file or folder", "remove it")
        if any(part.startswith(".") for part in parts):
            raise _fail(entry.name, "hidden file or folder", "move it out of the model dir")
        if entry.kind == "dir":
            continue
        base = parts[-1]
        suffix = base[base.rfind(".") :].lower() if "." in base else ""
        if suffix in REFUSED_SUFFIXES:
            raise _fail(
                entry.name,
                f"refused: {REFUSED_SUFFIXES[suffix]}",
                "convert the weights to safetensors and remove this file",
            )
        if suffix not in ALLOWED_SUFFIXES and base not in ALLOWED_NAMES:
            raise _fail(
                entry.name,
                "not an allowed kind of file (safetensors, .json, .txt, .jinja, .model, .md)",
                "remove it from the model dir",
            )
        files.append(entry.name)
    if not any(name.endswith(".safetensors") for name in files):
        raise IntegrityError(
            "model dir: no .safetensors weights (an empty model is refused)",
            fix="point model.dir at the folder that holds the model's *.safetensors files",
        )
    wanted = CONFIG_FILE[kind]
    if wanted not in files:
        raise IntegrityError(
            f"model dir: {wanted} is missing",
            fix=f"add the {kind}'s {wanted}"
            + (" (a LoRA adapter goes in [[engine.lora]])" if kind == "model" else ""),
        )
    return files


def vocab_size(config: Any) -> int | None:
    """The vocabulary size a model's config.json names (a multimodal model's under
    text_config), or None."""
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        value = section.get("vocab_size") if isinstance(section, dict) else None
        if type(value) is int and 0 < value < 1 << 31:
            return value
    return None


def check_json(name: str, doc: Any) -> None:
    """Refuse configs that make transformers load code (auto_map)."""
    if isinstance(doc, dict):
        for key in REFUSED_JSON_KEYS & doc.keys():
            raise _fail(
                name,
                f"has '{key}', which makes transformers import code from the model",
                f"remove '{key}'; harness serves only architectures built into vLLM",
            )
