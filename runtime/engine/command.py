"""Build the engine's argv and environment from the config, unit-tested.

`build_argv` and `build_env` are pure: functions of the config, the runtime paths, the
parent's environment and CPU affinity. `build_plan` is the one edge that reads those two from
this process when the caller gives none.

The environment is built from an allowlist, never inherited: the engine must not see the
front's secrets, cloud credentials or proxy settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import vllm_options
from runtime.config import ENGINE_ENV_REFUSED, SECRET_LIKE, Config, format_cpu_list
from runtime.engine.resources import MemoryCaps, cpu_placement, split_cpus

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM asks for a few ports from VLLM_PORT up (torch.distributed's store, data parallel).
RENDEZVOUS_PORTS = 4
# How long the engine keeps an idle connection from the front (its only client) open; the
# front reuses a connection only well inside this (runtime/front/upstream.py).
KEEP_ALIVE_S = 30


@dataclass(frozen=True)
class RuntimePaths:
    """The engine's private, writable runtime dir and what lives in it."""

    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "engine.sock"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def rpc(self) -> Path:
        return self.root / "rpc"

    def dirs(self) -> tuple[Path, ...]:
        return (self.tmp, self.cache, self.home, self.rpc)


@dataclass(frozen=True)
class EnginePlan:
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path
    socket: Path
    # TCP ports the engine may bind and connect (Landlock): torch.distributed's rendezvous.
    tcp_ports: tuple[int, ...] = ()


def build_argv(cfg: Config, paths: RuntimePaths, caps: MemoryCaps | None = None) -> list[str]:
    eng = cfg.engine
    argv = [
        str(eng.python),
        "-I",  # isolated: no user site, no PYTHON* variables, no cwd on sys.path
        "-m",
        ENGINE_MODULE,
        "--model",
        str(cfg.model.dir),
        "--served-model-name",
        cfg.model.served_name,
        # A Unix socket only: the engine never binds a TCP port.
        "--uds",
        str(paths.socket),
        "--load-format",
        "safetensors",
        # Ignore the model's generation_config.json and cap generation server-side; vLLM clamps
        # silently, so the front is the one that rejects over-cap requests.
        "--generation-config",
        "vllm",
        "--override-generation-config",
        json.dumps({"max_new_tokens": cfg.limits.max_tokens}),
        "--max-num-seqs",
        str(eng.max_num_seqs),
        "--disable-fastapi-docs",
    ]
    if eng.max_model_len is not None:
        argv += ["--max-model-len", str(eng.max_model_len)]
    if eng.device == "cpu":
        # No C++ compiler or compile cache at run time on CPU: run eagerly.
        argv += ["--enforce-eager"]
    if eng.kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(eng.kv_cache_memory_bytes)]
    if caps is not None:
        argv += caps.argv()  # engine.gpu_memory_limit as --gpu-memory-utilization
    if eng.lora:
        # Loaded at start from verified folders; nothing loads at run time (the environment
        # never sets VLLM_ALLOW_RUNTIME_LORA_UPDATING, and the front refuses those routes).
        # One flag for all (a repeated --lora-modules replaces the one before), each adapter
        # as JSON (a path may hold "=").
        argv += ["--enable-lora", "--lora-modules"]
        for adapter in eng.lora:
            module = {"name": adapter.name, "path": str(adapter.dir)}
            argv.append(json.dumps(module, separators=(",", ":")))
    if eng.draft is not None:
        draft = {
            "method": "draft_model",
            "model": str(eng.draft.dir),
            "num_speculative_tokens": eng.draft.num_speculative_tokens,
        }
        argv += ["--speculative-config", json.dumps(draft, separators=(",", ":"))]
    return argv + vllm_options.argv(eng.vllm, cfg.model.dir)  # [engine.vllm]


def build_env(
    cfg: Config, paths: RuntimePaths, parent_env: dict[str, str], affinity: set[int]
) -> dict[str, str]:
    eng = cfg.engine
    cache = paths.cache
    user = "harness-engine"
    env = {
        "PATH": f"{Path(eng.python).parent}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        # torch calls getpwuid; an unknown uid crashes without these.
        "HOME": str(paths.home),
        "USER": user,
        "LOGNAME": user,
        "TMPDIR": str(paths.tmp),
        # Offline, no telemetry: vLLM posts usage stats to an outside host by default.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        # Otherwise vLLM "connects" a UDP socket to 8.8.8.8 to learn its own address.
        "VLLM_HOST_IP": "127.0.0.1",
        # n x max_tokens is the real output bound; vLLM's default allows 16384 sequences.
        "VLLM_MAX_N_SEQUENCES": str(eng.max_num_seqs),
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
        # Caches may hold code-executing formats: keep them private and ephemeral.
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "HF_HOME": str(cache / "huggingface"),
        "XDG_CACHE_HOME": str(cache),
        "XDG_CONFIG_HOME": str(paths.home / ".config"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "NUMBA_CACHE_DIR": str(cache / "numba"),
        "OUTLINES_CACHE_DIR": str(cache / "outlines"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "VLLM_RPC_BASE_PATH": str(paths.rpc),
        "PYTHONDONTWRITEBYTECODE": "1",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(KEEP_ALIVE_S),
    }
    placement = cpu_placement(eng, affinity)
    ranks = vllm_options.ranks(eng.vllm)
    if eng.device == "cpu" and (placement is not None or ranks > 1):
        # One CPU list per rank ("0-3|4-7"): vLLM's CPU workers bind their OpenMP threads to
        # their own list, and without one each it asks NUMA, which a one-node machine fails.
        cpus = placement.engine if placement is not None else affinity
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            format_cpu_list(group) for group in split_cpus(cpus, ranks)
        )
    for name in eng.env_passthrough:
        # Config validation already refuses secret-like names; check again at the boundary.
        if (
            name in parent_env
            and not SECRET_LIKE.search(name)
            and name not in ENGINE_ENV_REFUSED
            and name not in env
        ):
            env[name] = parent_env[name]
    return env


def describe(cfg: Config, plan: EnginePlan) -> dict[str, dict[str, Any]]:
    """What the engine's command line and environment enforce (`harness check`)."""
    return {
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
    }


def build_plan(
    cfg: Config,
    paths: RuntimePaths,
    parent_env: dict[str, str] | None = None,
    caps: MemoryCaps | None = None,
    rendezvous_port: int = 0,
    affinity: set[int] | None = None,
) -> EnginePlan:
    parent = dict(os.environ) if parent_env is None else parent_env
    cpus = os.sched_getaffinity(0) if affinity is None else affinity
    env = build_env(cfg, paths, parent, cpus)
    ports: tuple[int, ...] = ()
    if rendezvous_port:
        # vLLM starts its port search here; Landlock allows just these ports for TCP.
        env["VLLM_PORT"] = str(rendezvous_port)
        ports = tuple(range(rendezvous_port, rendezvous_port + RENDEZVOUS_PORTS))
    return EnginePlan(
        argv=tuple(build_argv(cfg, paths, caps)),
        env=env,
        cwd=paths.root,
        socket=paths.socket,
        tcp_ports=ports,
    )
