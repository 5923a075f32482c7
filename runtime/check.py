"""`harness check`: validate the config and report every control that `serve` would put in
force, without starting anything. The JSON form is audit evidence."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runtime import __version__, launcher, otel, vllm_options
from runtime import config as config_mod
from runtime.engine import resources
from runtime.engine.command import RuntimePaths, build_plan
from runtime.front import server as front_server
from runtime.front import tls
from runtime.front.proxy import FORWARDED, LOCAL
from runtime.sandbox import front as front_sandbox
from runtime.sandbox import landlock, privileges, seccomp


def report(config_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = config_mod.load(config_path, overrides)
    seccomp.check_config(cfg)  # as serve does: a broken profile is exit 2
    container = front_sandbox.container_profile(cfg)  # likewise
    front_server.check_versions()  # the front's libraries are the tested releases, or exit 2
    tls.server_context(cfg.front.tls)  # the TLS files load, or exit 2
    files = front_server.open_files(cfg.front, apply=False)  # room for the connections, or 2
    verified = launcher.verify_weights(cfg)  # step 2, or exit 3
    weights, evidence = verified.model, verified.evidence
    # Step 3, or exit 4. The engine's reach as serve would have it where Landlock is there;
    # its own /dev/shm counted only where namespaces are required (auto may fall back).
    landlocked = cfg.sandbox.landlock != "off" and landlock.abi_version() > 0
    runtime = cfg.engine.runtime_dir / "harness-XXXXXX"
    own_shm = cfg.sandbox.namespaces == "required"
    loaded = launcher.load_secrets(cfg, launcher.engine_reach(cfg, runtime, landlocked, own_shm))
    caps = resources.compute(cfg.engine)  # step 4
    placement = resources.cpu_placement(cfg.engine, os.sched_getaffinity(0))
    plan = build_plan(cfg, RuntimePaths(cfg.engine.runtime_dir / "harness-XXXXXX"), caps=caps)
    return {
        "harness_version": __version__,
        "config": str(cfg.source),
        "model": {"dir": str(cfg.model.dir), "served_name": cfg.model.served_name},
        "served_names": list(cfg.served_names),
        "controls": {
            "front_tls": {
                "status": "enforced",
                "listen": cfg.front.listen,
                "minimum_version": "TLSv1.3",
                "client_certificate": "required",
                "client_ca": str(cfg.front.tls.client_ca),
                "allowed_identities": list(cfg.front.allowed_identities),
            },
            "route_allowlist": {
                "status": "enforced",
                "forwarded": {k.decode(): sorted(v) for k, v in FORWARDED.items()},
                "answered_by_front": sorted(p.decode() for p in LOCAL),
                "match": "exact raw request target; query string dropped",
            },
            "request_body_limit": {"status": "enforced", "max_bytes": cfg.front.max_body_bytes},
            "request_model": {
                "status": "enforced",
                "vocab_size": weights.vocab_size,
                "structured_outputs": cfg.limits.structured_outputs.allow,
                "media_parts": list(cfg.limits.media.parts),
                "tools": cfg.limits.tools.allow,
                "tool_call_parser": cfg.engine.vllm.get("tool_call_parser"),
            },
            "connections": {
                "status": "enforced",
                "max_connections": cfg.front.max_connections,
                "max_handshakes": cfg.front.max_handshakes,
                "handshake_timeout_s": cfg.front.handshake_timeout_s,
                **files,
            },
            "token_cap": {
                "status": "enforced",
                "max_tokens": cfg.limits.max_tokens,
                "where": "engine (vLLM max_new_tokens override, clamps)",
            },
            "engine_network": {
                "status": "enforced",
                "listener": "unix socket only (--uds)",
                "offline": True,
                "namespaces": cfg.sandbox.namespaces,
            },
            "engine_environment": {
                "status": "enforced",
                "mode": "allowlist",
                "names": sorted(plan.env),
            },
            "weight_integrity": {
                "status": "enforced" if cfg.model.signature else "unsigned (unsafe)",
                "signature": str(cfg.model.signature.path) if cfg.model.signature else None,
                "method": cfg.model.signature.method if cfg.model.signature else None,
                "model_dir_policy": "enforced",
                "safetensors_headers": "enforced",
                "sha256_manifest": "enforced" if cfg.model.signature else "not_checked",
                "fingerprint_recheck": "enforced",
                "writable_model_dir": "allowed (unsafe)"
                if cfg.model.unsafe_allow_writable
                else "refused",
                "files": len(weights.files),
                "bytes": weights.total_bytes,
                "tensors": weights.tensors,
                "seconds": round(weights.seconds, 3),
                **{k: v for k, v in evidence.items() if k in ("root_digest", "signer")},
                # LoRA adapters and the draft model: each verified the same way.
                "others": {
                    label: {
                        "dir": str(section.dir),
                        "signature": str(section.signature.path) if section.signature else None,
                        "files": len(verified.others[label].files),
                        "bytes": verified.others[label].total_bytes,
                    }
                    for label, section in cfg.artifacts()[1:]
                },
            },
            "secrets": {
                "status": "enforced",
                "environment": "no secret-like variables"
                + (
                    f" (allowed: {', '.join(cfg.secrets.allow_env)})"
                    if cfg.secrets.allow_env
                    else ""
                ),
                "dir": str(cfg.secrets.dir) if cfg.secrets.dir else None,
                "filesystem": "tmpfs/ramfs required",
                "names": sorted(loaded),
                "engine": "gets none (allowlisted environment)",
            },
            "privilege_drop": _privileges(cfg),
            "landlock": _landlock(cfg, plan.tcp_ports),
            "front_landlock": _front_landlock(cfg),
            "seccomp": _seccomp(cfg),
            "front_seccomp": _front_seccomp(cfg, container),
            "memory_caps": {
                **caps.describe(),
                "kv_cache_memory_bytes": cfg.engine.kv_cache_memory_bytes,
            },
            "otel_export": otel.describe(cfg.telemetry),
        },
        "engine": {
            "argv": list(plan.argv),
            "device": cfg.engine.device,
            "cpus": _cpus(cfg, placement),
            **({"gpus": resources.describe_gpus()} if cfg.engine.device == "cuda" else {}),
        },
    }


def _cpus(cfg: config_mod.Config, placement: resources.CpuPlacement | None) -> Any:
    if placement is not None:
        return placement.describe()
    if cfg.engine.cpus == "auto":
        return "auto: one CPU, nothing to split"
    return "chosen by vLLM; the front anywhere"


def _privileges(cfg: config_mod.Config) -> dict[str, Any]:
    drop = privileges.build(cfg.engine, os.geteuid())
    return {
        "status": "enforced" if drop.uid is not None or os.geteuid() != 0 else "uid 0 (unsafe)",
        "uid": drop.uid if drop.uid is not None else os.geteuid(),
        "gid": drop.gid if drop.gid is not None else os.getegid(),
        "capabilities": "none (bounding, ambient, inheritable, permitted, effective)",
        "no_new_privs": True,
        "rlimits": {"core": 0},
    }


def _landlock(cfg: config_mod.Config, ports: tuple[int, ...]) -> dict[str, Any]:
    rules = landlock.build(cfg, cfg.engine.runtime_dir / "harness-XXXXXX", list(ports))
    abi = landlock.abi_version()
    tcp = "connect only to the rendezvous ports" if abi >= 4 else "not restricted"
    if vllm_options.ranks(cfg.engine.vllm) > 1:
        tcp = "not restricted: the ranks meet over gloo; served only in the engine's own netns"
    return {**_landlock_rules(rules, abi), "tcp": tcp}


def _front_landlock(cfg: config_mod.Config) -> dict[str, Any]:
    rules = landlock.build_front(cfg, cfg.engine.runtime_dir / "harness-XXXXXX")
    return {
        **_landlock_rules(rules, landlock.abi_version()),
        "scope": "harness itself, from start-up (the engine's domain is nested in it)",
        "remove_empty_dirs": rules.remove_dirs,
        "tcp": "not restricted (the front binds and exports)",
    }


def _landlock_rules(rules: landlock.LandlockPlan, abi: int) -> dict[str, Any]:
    mode = rules.mode
    return {
        "status": "off (unsafe)" if mode == "off" else "enforced" if abi else "unavailable",
        "mode": mode,
        "abi": abi,
        "read_execute": rules.read,
        "write": rules.write,
        "devices": rules.devices,
        "write_existing_files": rules.write_files,
        "scoped": ["abstract_unix_socket", "signal"] if abi >= 6 and rules.scoped else [],
    }


def _seccomp(cfg: config_mod.Config) -> dict[str, Any]:
    mode = cfg.sandbox.seccomp
    if mode == "off":
        return {"status": "off (unsafe)", "mode": mode}
    data, path, multi_gpu = seccomp.engine_profile(cfg)
    summary = seccomp.summarise(seccomp.parse_profile(data, str(path)))
    return {
        "status": "enforced" if mode in ("enforce", "kill") else "complain (reports only)",
        "mode": mode,
        "profile": summary["profile"],
        # Several GPUs: the shipped profile plus MULTI_GPU_RULES, not yet run on a GPU.
        "multi_gpu_rules": "added, not yet run on a GPU" if multi_gpu else "none",
        "allowed": summary["allowed"],
        "allowed_with_argument_checks": summary["allowed_with_argument_checks"],
        "fixed_deny_list": list(seccomp.FIXED_DENY),
        "clone_namespace_flags_refused": hex(seccomp.CLONE_NAMESPACES),
        "enosys": list(seccomp.ENOSYS_ALWAYS),
    }


def _front_seccomp(
    cfg: config_mod.Config, container: front_sandbox.ContainerProfile
) -> dict[str, Any]:
    """harness's own filter, loaded once the engine is ready (runtime/sandbox/front.py)."""
    if cfg.sandbox.seccomp == "off":
        return {"status": "off (unsafe)"}
    within = container.profile is not None
    return {
        "status": "enforced",
        "mode": "container_profile" if within else "deny_list",
        **container.report(),
        "denied": list(front_sandbox.DENIED),
        "violations": "seccomp_violation events, scope front",
    }


def render(rep: dict[str, Any]) -> str:
    lines = [f"harness {rep['harness_version']}: {rep['config']}", ""]
    width = max(len(name) for name in rep["controls"])
    for name, control in rep["controls"].items():
        detail = {k: v for k, v in control.items() if k != "status"}
        brief = ", ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, list | dict))
        lines.append(f"  {name:<{width}}  {control['status']:<10} {brief}")
    return "\n".join(lines)
