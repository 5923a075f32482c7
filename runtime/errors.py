"""One error type per exit code of the CLI contract.

Only `runtime.cli` turns these into exit codes. Every error carries a `fix`: the line a model
team reads at 3 a.m. to know what to change.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base class. `exit_code` follows docs/design.md; 1 is reserved for bugs."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def diagnostics(self) -> str:
        text = f"harness: {self.kind}: {self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class ConfigError(HarnessError):
    exit_code = 2
    kind = "config error"


class IntegrityError(HarnessError):
    exit_code = 3
    kind = "weight integrity error"


class SecretsError(HarnessError):
    exit_code = 4
    kind = "secrets error"


class SandboxError(HarnessError):
    exit_code = 5
    kind = "sandbox error"


class EngineError(HarnessError):
    exit_code = 6
    kind = "engine error"
