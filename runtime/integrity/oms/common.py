"""What every phase of OMS verification shares: the error it raises, its remedies, the methods."""

from __future__ import annotations

from typing import Literal

from runtime.errors import IntegrityError

Method = Literal["key", "certificate", "sigstore"]
RESIGN = "sign the model again (harness sign, or model_signing sign) and deploy that signature"
# A signature that does not verify, or files that differ from it, may be an attack: re-signing
# what is on disk would bless it.
TAMPERED = (
    "treat it as tampering: do not serve this model; check the configured trust "
    "(model.signature.*) and where the model and its signature came from"
)


def fail(what: str, fix: str = TAMPERED) -> IntegrityError:
    return IntegrityError(f"signature: {what}", fix=fix)
