"""Steps 2 and 6 of the startup sequence: every folder of weights the engine loads (the
model, each LoRA adapter, the draft model) verified before the engine starts, and re-checked
once it has loaded them. The checks themselves live in runtime/integrity/; this module names
each folder by its config key in events and errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime import telemetry
from runtime.config import ArtifactSection, Config, SignatureSection
from runtime.errors import ConfigError, IntegrityError
from runtime.integrity import adapters, model_dir, signature
from runtime.integrity.policy import ArtifactKind


@dataclass(frozen=True)
class Weights:
    """Step 2's result: every folder of weights the engine loads, verified."""

    model: model_dir.Verified
    evidence: dict[str, object]  # how the model's signature was checked
    # The LoRA adapters and the draft model, by config key (engine.lora[NAME], engine.draft).
    others: dict[str, model_dir.Verified] = field(default_factory=dict)

    def all(self) -> dict[str, model_dir.Verified]:
        return {"model": self.model, **self.others}

    def describe(self, cfg: Config) -> dict[str, Any]:
        """The weight_integrity control (`harness check`)."""
        model, signed = self.model, cfg.model.signature
        return {
            "status": "enforced" if signed else "unsigned (unsafe)",
            "signature": str(signed.path) if signed else None,
            "method": signed.method if signed else None,
            "model_dir_policy": "enforced",
            "safetensors_headers": "enforced",
            "sha256_manifest": "enforced" if signed else "not_checked",
            "fingerprint_recheck": "enforced",
            "writable_model_dir": "allowed (unsafe)"
            if cfg.model.unsafe_allow_writable
            else "refused",
            "files": len(model.files),
            "bytes": model.total_bytes,
            "tensors": model.tensors,
            "seconds": round(model.seconds, 3),
            **{k: v for k, v in self.evidence.items() if k in ("root_digest", "signer")},
            # LoRA adapters and the draft model: each verified the same way.
            "others": {
                label: {
                    "dir": str(section.dir),
                    "signature": str(section.signature.path) if section.signature else None,
                    "files": len(self.others[label].files),
                    "bytes": self.others[label].total_bytes,
                }
                for label, section in cfg.artifacts()[1:]
            },
        }


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
        fields = {"model": str(verified.root), "artifact": label, "stage": "after_load"}
        try:
            model_dir.recheck(verified)
        except IntegrityError as exc:
            telemetry.emit("weight_integrity_check", "blocked", **fields, error=exc.message)
            raise
        telemetry.emit("weight_integrity_check", "ok", **fields, files=len(verified.files))
