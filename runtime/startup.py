"""The startup plan: what `harness serve` verifies, loads and computes before the engine
starts, in one object, `Prepared`, that `harness check` builds the same way and describes.

`prepare(cfg, site)` runs steps 2 to 4 of docs/design.md (weights, secrets, caps and
placement, the front's resources). Each part describes its controls; `Prepared.describe()`
puts them in the order of `CONTROLS`, the one list of controls, from which docs/design.md's
controls table is generated (docs/generate.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import otel, telemetry, vllm_options
from runtime.config import Config
from runtime.engine import command, resources
from runtime.errors import SecretsError
from runtime.front.service import Front
from runtime.sandbox import landlock, namespaces, privileges
from runtime.sandbox.front import ContainerProfile
from runtime.sandbox.seccomp import configured
from runtime.secrets import tmpfs
from runtime.weights import Weights, verify_weights


@dataclass(frozen=True)
class Control:
    """One control as docs/design.md's table lists it; its state comes from `Prepared`."""

    step: str  # the startup step that puts it in force (docs/design.md)
    enforces: str
    settings: str  # the keys that govern it


CONTROLS: dict[str, Control] = {
    "front_tls": Control(
        "7",
        "TLS 1.3 only, a client certificate from the client CA, an identity allowlist",
        "`front.listen`, `front.tls.*`, `front.allowed_identities`",
    ),
    "route_allowlist": Control(
        "7",
        "exact raw targets only: three routes forwarded, two answered by the front",
        "none (fixed)",
    ),
    "request_body_limit": Control("7", "a cap on each request's body", "`front.max_body_bytes`"),
    "request_model": Control(
        "7",
        "a positive model of every request: types, vLLM's ranges, token ids below the "
        "vocabulary, structured outputs, media and tools by policy",
        "`limits.*`",
    ),
    "connections": Control(
        "4, 7",
        "caps on connections and handshakes in progress; the open-files limit for them",
        "`front.max_connections`, `front.max_handshakes`, `front.handshake_timeout_s`",
    ),
    "token_cap": Control("5", "`max_tokens` clamped by the engine itself", "`limits.max_tokens`"),
    "engine_network": Control(
        "5",
        "the engine listens on a Unix socket only, offline, in namespaces of its own",
        "`sandbox.namespaces`",
    ),
    "engine_environment": Control(
        "5",
        "the engine's environment built from an allowlist, never inherited",
        "`engine.env_passthrough`",
    ),
    "weight_integrity": Control(
        "2, 6",
        "OMS signature, SHA-256 of every file, model-dir policy, safetensors headers; "
        "the same for adapters and the draft; fingerprints re-checked once loaded",
        "`model.*`, `engine.lora`, `engine.draft`",
    ),
    "secrets": Control(
        "3",
        "none in the environment; files on tmpfs, private, out of the engine's reach",
        "`secrets.*`",
    ),
    "privilege_drop": Control(
        "5",
        "a non-root uid, no capabilities, no_new_privs, no core dumps, a task cap",
        "`engine.uid`, `engine.gid`, `engine.max_tasks`",
    ),
    "landlock": Control(
        "5",
        "the engine reads only the system, its venv and the weights; writes only its "
        "runtime dir and /dev/shm; TCP only to its rendezvous ports",
        "`sandbox.landlock`, `sandbox.extra_*_paths`, `sandbox.allowed_tcp_ports`",
    ),
    "front_landlock": Control(
        "1 (before 2)",
        "harness itself, before its first thread: its own files only",
        "`sandbox.landlock`",
    ),
    "seccomp": Control(
        "5",
        "the engine's recorded profile, refusals reported by harness's supervisor",
        "`sandbox.seccomp`, `sandbox.seccomp_profile`",
    ),
    "front_seccomp": Control(
        "7",
        "harness's own filter once the engine is ready (within the container's profile "
        "where harness knows it)",
        "`sandbox.seccomp`, `sandbox.container_profile`",
    ),
    "memory_caps": Control(
        "4",
        "CPU and GPU memory caps on the engine's processes, the KV cache's size",
        "`engine.max_rss_bytes`, `engine.gpu_memory_limit`, `engine.kv_cache_memory_bytes`",
    ),
    "otel_export": Control("1", "events, startup spans and metrics over OTLP", "`telemetry.*`"),
}


@dataclass(frozen=True)
class Site:
    """Where the engine will stand, as far as the secrets check needs it: its runtime dir,
    whether Landlock holds it, whether it has a /dev/shm of its own, what its mount namespace
    covers."""

    runtime_root: Path
    landlocked: bool
    own_shm: bool
    hidden: list[str] | None = None

    @classmethod
    def planned(cls, cfg: Config) -> Site:
        """`harness check`: nothing made yet. Landlock where it is configured and the kernel
        has it; the engine's own /dev/shm only where namespaces are required (auto may fall
        back)."""
        return cls(
            runtime_root=cfg.engine.runtime_dir / "harness-XXXXXX",
            landlocked=cfg.sandbox.landlock != "off" and landlock.abi_version() > 0,
            own_shm=cfg.sandbox.namespaces == "required",
        )


@dataclass
class Prepared:
    """Steps 2 to 4 done: everything the engine's start and the front need."""

    cfg: Config
    site: Site
    container: ContainerProfile  # the runtime's seccomp profile, for harness's own filter
    weights: Weights
    secrets: dict[str, tmpfs.Secret]
    caps: resources.MemoryCaps
    placement: resources.CpuPlacement | None
    front: Front

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every control in force, in `CONTROLS`' order (`harness check`)."""
        cfg = self.cfg
        plan = command.build_plan(cfg, command.RuntimePaths(self.site.runtime_root), caps=self.caps)
        parts = {
            **self.front.describe(self.weights.model.vocab_size),
            **command.describe(cfg, plan),
            "weight_integrity": self.weights.describe(cfg),
            "secrets": tmpfs.describe(cfg.secrets, list(self.secrets)),
            "privilege_drop": privileges.describe(cfg.engine, os.geteuid()),
            **landlock.describe(cfg, self.site.runtime_root, vllm_options.ranks(cfg.engine.vllm)),
            "seccomp": configured.describe(cfg),
            "front_seccomp": self.container.describe(cfg),
            "memory_caps": {
                **self.caps.describe(),
                "kv_cache_memory_bytes": cfg.engine.kv_cache_memory_bytes,
            },
            "otel_export": otel.describe(cfg.telemetry),
        }
        assert parts.keys() == CONTROLS.keys(), sorted(parts.keys() ^ CONTROLS.keys())
        return {name: parts[name] for name in CONTROLS}

    def describe_engine(self) -> dict[str, Any]:
        cfg = self.cfg
        plan = command.build_plan(cfg, command.RuntimePaths(self.site.runtime_root), caps=self.caps)
        if self.placement is not None:
            cpus: Any = self.placement.describe()
        elif cfg.engine.cpus == "auto":
            cpus = "auto: one CPU, nothing to split"
        else:
            cpus = "chosen by vLLM; the front anywhere"
        return {
            "argv": list(plan.argv),
            "device": cfg.engine.device,
            "cpus": cpus,
            **({"gpus": resources.describe_gpus()} if cfg.engine.device == "cuda" else {}),
        }


def prepare(
    cfg: Config,
    site: Site,
    container: ContainerProfile,
    *,
    bind: bool = True,
    on_secrets: Callable[[dict[str, tmpfs.Secret]], None] | None = None,
) -> Prepared:
    """Steps 2 to 4. `bind`: serve binds the front's port and raises its open-files limit;
    check only checks they can be had. `on_secrets`: handed the secrets once loaded (the
    OTLP exporter's credentials are among them; it holds events until then)."""
    # 2. Weights: OMS signature, SHA-256 of every file against the signed manifest, model-dir
    #    policy, strict safetensors headers; each file fingerprinted (exit 3).
    #    Each LoRA adapter and the draft model likewise.
    weights = verify_weights(cfg)

    # 3. Secrets: none in the environment; the secrets dir in memory, its files private and
    #    out of the engine's reach; held by the front only (exit 4).
    reach = engine_reach(cfg, site.runtime_root, site.landlocked, site.own_shm)
    loaded = load_secrets(cfg, reach, site.hidden)
    if on_secrets is not None:
        on_secrets(loaded)

    # 4. Resource caps: the token cap reaches vLLM as max_new_tokens (engine/command.py), the
    #    GPU memory limit as --gpu-memory-utilization (from the device's total, via NVML); the
    #    memory watchdog stops the engine over engine.max_rss_bytes or the GPU cap (exit 6).
    caps = resources.compute(cfg.engine)
    #    engine.cpus: the engine's compute threads get those CPUs, the front the others.
    placement = resources.cpu_placement(cfg.engine, os.sched_getaffinity(0))
    #    The front's TLS material, port, open-files limit and libraries, before the engine
    #    spends a minute loading: a wrong path, a busy port or too few files fail now (exit 2).
    front = Front.prepare(cfg, bind=bind)
    return Prepared(cfg, site, container, weights, loaded, caps, placement, front)


def engine_reach(
    cfg: Config, runtime_root: Path, landlocked: bool, own_shm: bool
) -> list[str] | None:
    """The paths the engine may open: its Landlock rules (also its mount namespace's root),
    less the host's /dev/shm where it has its own. None: any path (no Landlock, and then
    /proc/<harness>/root reaches even what its mount namespace hides)."""
    if not landlocked:
        return None
    fence = landlock.build(cfg, runtime_root, [])
    reach = [*fence.read, *fence.write, *fence.devices]
    return [p for p in reach if not (own_shm and p == namespaces.SHM)]


def _engine_identity(cfg: Config) -> tuple[int, set[int]]:
    drop = privileges.build(cfg.engine, os.geteuid())
    if drop.uid is not None and drop.gid is not None:
        return drop.uid, {drop.gid}
    return os.geteuid(), {os.getegid(), *os.getgroups()}  # the engine keeps harness's ids


def load_secrets(
    cfg: Config, reach: list[str] | None, hidden: list[str] | None = None
) -> dict[str, tmpfs.Secret]:
    """Step 3. `reach`, `hidden`: the paths the engine may open and those its mount namespace
    covers (engine_reach, namespaces): a private file within reach and readable is exit 4."""
    try:
        tmpfs.check_environment(dict(os.environ), cfg.secrets.allow_env)
        loaded = tmpfs.load(cfg.secrets) if cfg.secrets.dir is not None else {}
        private = [("front.tls.key", cfg.front.tls.key)]
        if cfg.secrets.dir is not None:
            private.insert(0, ("secrets.dir", cfg.secrets.dir))
        uid, groups = _engine_identity(cfg)
        tmpfs.check_engine_cannot_read(private, reach, uid, groups, hidden)
    except SecretsError as exc:
        telemetry.emit("secret_injection", "blocked", error=exc.message)
        raise
    telemetry.emit(
        "secret_injection",
        "ok",
        dir=str(cfg.secrets.dir) if cfg.secrets.dir else None,
        names=sorted(loaded),  # names only, never values
        environment="clean",
        engine="none",
    )
    return loaded
