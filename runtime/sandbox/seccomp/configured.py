"""The engine's profile as configured: sandbox.seccomp_profile or the shipped one for the
device (plus the multi-GPU rules), checked at startup and described for `harness check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime import vllm_options
from runtime.errors import ConfigError
from runtime.sandbox.seccomp.bpf import compile_profile, summarise
from runtime.sandbox.seccomp.oci import Profile, parse_profile, read_json
from runtime.sandbox.seccomp.policy import (
    CLONE_NAMESPACES,
    ENOSYS_ALWAYS,
    FIXED_DENY,
    MULTI_GPU_RULES,
)


def shipped_profiles() -> list[Path]:
    """Where the recorded profiles live: the source tree, then the image's copy."""
    here = Path(__file__).resolve().parents[3] / "seccomp"
    return [here, Path("/usr/share/harness/seccomp")]


def profile_path(cfg: Any) -> Path:
    """The engine's profile: sandbox.seccomp_profile, or the shipped one for the device."""
    if cfg.sandbox.seccomp_profile is not None:
        return Path(cfg.sandbox.seccomp_profile)
    name = f"engine-{cfg.engine.device}.json"
    for folder in shipped_profiles():
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(
        f"sandbox.seccomp_profile: no profile given and no shipped {name} "
        f"(looked in {', '.join(str(f) for f in shipped_profiles())})",
        fix=f"record one on this kind of machine with `harness profile --config FILE --out "
        f"seccomp/{name}` and set sandbox.seccomp_profile; while you do, sandbox.seccomp = "
        f'"complain" with sandbox.seccomp_profile set to the nearest profile you have (such '
        f"as engine-cpu.json) reports what that profile would refuse",
    )


def engine_profile(cfg: Any) -> tuple[dict[str, Any], Path, bool]:
    """The engine's profile as OCI JSON, where it came from, and whether the multi-GPU
    rules (MULTI_GPU_RULES) were added to it."""
    path = profile_path(cfg)
    data = read_json(path)
    multi = (
        cfg.sandbox.seccomp_profile is None
        and cfg.engine.device == "cuda"
        and vllm_options.ranks(cfg.engine.vllm) > 1
        and isinstance(data, dict)
    )
    if multi:
        data = {**data, "syscalls": [*data.get("syscalls", []), *MULTI_GPU_RULES]}
    return data, path, multi


def check_config(cfg: Any) -> Profile | None:
    """Fail at startup (exit 2), not in stage 2, when the configured profile is missing,
    malformed or does not compile here."""
    if cfg.sandbox.seccomp == "off":
        return None
    data, path, _ = engine_profile(cfg)
    profile = parse_profile(data, str(path))
    compile_profile(profile, cfg.sandbox.seccomp)
    return profile


def describe(cfg: Any) -> dict[str, Any]:
    """The engine's filter as `harness check` reports it."""
    mode = cfg.sandbox.seccomp
    if mode == "off":
        return {"status": "off (unsafe)", "mode": mode}
    data, path, multi_gpu = engine_profile(cfg)
    summary = summarise(parse_profile(data, str(path)))
    return {
        "status": "enforced" if mode in ("enforce", "kill") else "complain (reports only)",
        "mode": mode,
        "profile": summary["profile"],
        # Several GPUs: the shipped profile plus MULTI_GPU_RULES, not yet run on a GPU.
        "multi_gpu_rules": "added, not yet run on a GPU" if multi_gpu else "none",
        "allowed": summary["allowed"],
        "allowed_with_argument_checks": summary["allowed_with_argument_checks"],
        "fixed_deny_list": list(FIXED_DENY),
        "clone_namespace_flags_refused": hex(CLONE_NAMESPACES),
        "enosys": list(ENOSYS_ALWAYS),
    }
