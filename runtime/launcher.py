"""`harness serve`: the startup sequence of docs/design.md, top to bottom.

Each step is one call that either returns or raises a HarnessError carrying its exit code.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from runtime import config as config_mod
from runtime import otel, secrets, telemetry
from runtime.config import ArtifactSection, Config, SignatureSection
from runtime.engine import liveness, resources, watchdog
from runtime.engine import process as engine_process
from runtime.engine.process import Engine
from runtime.errors import ConfigError, EngineError, IntegrityError, SecretsError
from runtime.front.service import Front
from runtime.integrity import adapters, model_dir, signature
from runtime.integrity.policy import ArtifactKind
from runtime.sandbox import _linux, landlock, namespaces, privileges, seccomp
from runtime.sandbox import front as front_sandbox

ENGINE_FAILED = EngineError.exit_code


class StopRequested(BaseException):
    """SIGTERM/SIGINT before the front serves: unwind, stop the engine, exit 0."""


def serve(
    config_path: str | Path,
    overrides: list[str] | None = None,
    *,
    on_ready: Callable[[Config], None] | None = None,
) -> int:
    _stop_on_signals()
    # Not dumpable: no core file of keys and secrets, and its /proc/<pid>/{environ,mem,fd,
    # root} belong to root, so no process of its uid (the engine's, in a pod) reads them.
    # Every program harness starts is dumpable again after its execve.
    _linux.prctl(_linux.PR_SET_DUMPABLE, 0)

    # 1. Configuration: validated, typed, unknown keys refused (exit 2).
    cfg = config_mod.load(config_path, overrides)
    seccomp.check_config(cfg)  # the engine's profile exists and compiles, before any work
    container = front_sandbox.container_profile(cfg)  # the runtime's, for harness's own filter
    export = otel.install(cfg)  # OTLP, when configured: events are held until step 3
    telemetry.emit("config_loaded", "ok", config=str(cfg.source), model=str(cfg.model.dir))

    # Harness itself, before its first thread (every thread, and the engine, inherit it):
    # Landlock lets it read only the system, its code, the model and signature, its secrets
    # and TLS files, and write only the engine's private runtime dir and /dev/shm (exit 5 if
    # sandbox.landlock = required cannot be met). The dir is removed on the way out.
    # The engine's namespaces and root come first: once confined, harness may not mount.
    with engine_process.runtime_dir(cfg) as paths:
        spaces = engine_process.prepare_namespaces(cfg, paths)
        confined = front_sandbox.confine(cfg, paths.root, spaces.shm_path, spaces.proc_path)
        telemetry.emit("landlock", "ok" if confined["enforced"] else "failed", **confined)

        # 2. Weights: OMS signature, SHA-256 of every file against the signed manifest, model-dir
        #    policy, strict safetensors headers; each file fingerprinted (exit 3).
        #    Each LoRA adapter and the draft model likewise.
        weights = verify_weights(cfg)

        # 3. Secrets: none in the environment; the secrets dir in memory, its files private and
        #    out of the engine's reach; held by the front only (exit 4). The collector's
        #    credentials are among them.
        reach = engine_reach(cfg, paths.root, bool(confined["enforced"]), spaces.isolated)
        export.start(load_secrets(cfg, reach, spaces.report.get("root", {}).get("hidden", [])))

        # 4. Resource caps: the token cap reaches vLLM as max_new_tokens (engine/command.py), the
        #    GPU memory limit as --gpu-memory-utilization (from the device's total, via NVML); the
        #    memory watchdog stops the engine over engine.max_rss_bytes or the GPU cap (exit 6).
        caps = resources.compute(cfg.engine)
        #    engine.cpus: the engine's compute threads get those CPUs, the front the others.
        placement = resources.cpu_placement(cfg.engine, os.sched_getaffinity(0))

        # The front's TLS material, port, open-files limit and libraries are checked before the
        # engine spends a minute loading: a wrong path, a busy port or too few files fail now
        # (exit 2).
        front = Front.prepare(cfg)
        export.watch_gauges(front.gauges)
        front.serve_metrics()

        # 5. Engine: stage 2 enters its namespaces (above), sets no_new_privs, applies
        #    Landlock (read-only code and model, writes to its runtime dir and /dev/shm only, no
        #    TCP out), drops privileges (non-root uid, no capabilities), loads the profiled seccomp
        #    filter (violations answered and reported by a supervisor here) and execs vLLM,
        #    listening on a Unix socket only, with an allowlisted environment (exit 5 if the
        #    sandbox cannot be applied).
        with (
            front.listener,
            Engine.create(cfg, caps, paths=paths, spaces=spaces) as engine,
            watchdog.for_engine(engine, caps),
        ):
            engine.start()
            if placement is not None:  # after the start: the engine keeps every CPU to bind its own
                resources.place_front(placement)
            engine.wait_ready()

            # 6. The weights the engine loaded are the ones verified in step 2.
            recheck_weights(weights)

            # 7. Front: harness itself may no longer start programs, mount, trace, load BPF or
            #    open raw sockets (a filter on every thread, within the container's profile
            #    where harness knows it); then mTLS, identity allowlist, route allowlist;
            #    supervise until stopped.
            if cfg.sandbox.seccomp != "off":
                telemetry.emit("seccomp_install", "ok", **front_sandbox.apply(container))
            # From now on the engine must keep answering (engine.liveness_timeout_s, exit 6).
            with liveness.watch(engine, cfg.engine.liveness_timeout_s):
                code = front.run(
                    engine,
                    vocab_size=weights.model.vocab_size,
                    placement=placement,
                    on_ready=on_ready,
                )
            engine_code = engine.stop()
    telemetry.emit(
        "shutdown",
        "ok" if code == 0 else "failed",
        exit_code=code,
        engine_exit_code=engine_code,
        reason=engine.stop_reason or ("engine_exit" if code == ENGINE_FAILED else None),
    )
    return code


@dataclass(frozen=True)
class Weights:
    """Step 2's result: every folder of weights the engine loads, verified."""

    model: model_dir.Verified
    evidence: dict[str, object]  # how the model's signature was checked
    # The LoRA adapters and the draft model, by config key (engine.lora[NAME], engine.draft).
    others: dict[str, model_dir.Verified] = field(default_factory=dict)

    def all(self) -> dict[str, model_dir.Verified]:
        return {"model": self.model, **self.others}


def verify_weights(cfg: Config) -> Weights:
    """Step 2 for the model, each LoRA adapter and the draft model: signature, manifest,
    SHA-256, policy, strict headers (exit 3); then what the engine would refuse a minute
    later (an adapter's rank, a draft's vocabulary) is refused now (exit 2)."""
    model, evidence = verify_artifact("model", cfg.model)
    others = {
        label: verify_artifact(label, section, "adapter" if label != "engine.draft" else "model")[0]
        for label, section in cfg.artifacts()[1:]
    }
    template = cfg.engine.vllm.get("chat_template")
    if template is not None and template not in model.files:
        raise ConfigError(
            f"engine.vllm.chat_template {template!r}: not a file of the verified model dir",
            fix=f"put the template in {cfg.model.dir} (signed with the weights) and name it "
            "relative to that dir",
        )
    adapters.check(cfg, model, others)
    return Weights(model, evidence, others)


def verify_artifact(
    label: str, section: ArtifactSection, kind: ArtifactKind = "model"
) -> tuple[model_dir.Verified, dict[str, object]]:
    """One folder of weights, `label` naming its config key in events and errors."""
    sig = section.signature
    try:
        if sig is not None:
            result = signature.verify_model(section.dir, sig.path, _trust(sig), kind=kind)
            verified = result.verified
            evidence = {
                "root_digest": result.root_digest,
                "signer": result.signer,
                "method": result.method,
                "signature": str(result.signature),
                # How a key signature's key was matched: its hint, or its raw bytes (bundles
                # of model_signing 1.0.x carry no hint).
                "key_match": result.key_match,
                # Empty files a signature cannot speak for (shards of model_signing).
                "unsigned_empty_files": list(result.unsigned_empty_files),
            }
        else:
            verified = model_dir.verify(section.dir, kind=kind)
            evidence = {"signature": None}
            telemetry.emit(
                "unsafe_setting",
                "allowed",
                setting=f"{label}.unsafe_unsigned",
                risk="weights are served without a signature",
            )
        writable = model_dir.writable_reason(verified.root)
        if writable and not section.unsafe_allow_writable:
            raise IntegrityError(
                f"{label}.dir: {writable}: the weights could change after verification",
                fix="mount it read-only (Kubernetes: readOnly: true); for development only, "
                f"set {label}.unsafe_allow_writable = true",
            )
    except IntegrityError as exc:
        exc = _relabel(exc, label)
        telemetry.emit(
            "weight_integrity_check",
            "blocked",
            model=str(section.dir),
            artifact=label,
            error=exc.message,
        )
        raise exc from None
    if writable:
        telemetry.emit(
            "unsafe_setting", "allowed", setting=f"{label}.unsafe_allow_writable", risk=writable
        )
    seconds = verified.seconds
    telemetry.emit(
        "weight_integrity_check",
        "ok",
        model=str(verified.root),
        artifact=label,
        files=len(verified.files),
        bytes=verified.total_bytes,
        tensors=verified.tensors,
        seconds=round(seconds, 3),
        mb_per_s=round(verified.total_bytes / 1e6 / seconds, 1) if seconds else None,
        **evidence,
    )
    return verified, evidence


def _relabel(exc: IntegrityError, label: str) -> IntegrityError:
    """The integrity modules speak of the model (model dir, model.signature.*); for an
    adapter or the draft, the error names its own config key instead."""
    if label == "model":
        return exc
    message = exc.message.removeprefix("model dir: ").replace(
        "model.signature", label + ".signature"
    )
    fix = exc.fix.replace("model.signature", label + ".signature") if exc.fix else exc.fix
    return IntegrityError(f"{label}: {message}", fix=fix)


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
) -> dict[str, secrets.Secret]:
    """Step 3. `reach`, `hidden`: the paths the engine may open and those its mount namespace
    covers (engine_reach, namespaces): a private file within reach and readable is exit 4."""
    try:
        secrets.check_environment(dict(os.environ), cfg.secrets.allow_env)
        loaded = secrets.load(cfg.secrets) if cfg.secrets.dir is not None else {}
        private = [("front.tls.key", cfg.front.tls.key)]
        if cfg.secrets.dir is not None:
            private.insert(0, ("secrets.dir", cfg.secrets.dir))
        uid, groups = _engine_identity(cfg)
        secrets.check_engine_cannot_read(private, reach, uid, groups, hidden)
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


def _trust(sig: SignatureSection) -> signature.Trust:
    if sig.method == "key":
        assert sig.public_key is not None
        return signature.KeyTrust(sig.public_key)
    if sig.method == "certificate":
        return signature.CertificateTrust(tuple(sig.certificate_chain), tuple(sig.identities))
    assert sig.trust_config is not None and sig.issuer is not None
    return signature.SigstoreTrust(sig.trust_config, tuple(sig.identities), sig.issuer)


def recheck_weights(weights: Weights) -> None:
    """Step 6: every file the engine loaded is the one verified (same inode, size, times)."""
    for label, verified in weights.all().items():
        try:
            model_dir.recheck(verified)
        except IntegrityError as exc:
            telemetry.emit(
                "weight_integrity_check",
                "blocked",
                model=str(verified.root),
                artifact=label,
                stage="after_load",
                error=exc.message,
            )
            raise
        telemetry.emit(
            "weight_integrity_check",
            "ok",
            model=str(verified.root),
            artifact=label,
            stage="after_load",
            files=len(verified.files),
        )


def _stop_on_signals() -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
