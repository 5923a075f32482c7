"""OCI seccomp profiles (linux.seccomp of the runtime spec, the format Docker, podman and the
kubelet read): parse and validate into `Profile`, refusing what harness cannot enforce. Pure:
no libseccomp.
"""

from __future__ import annotations

import errno
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

ACTIONS = (
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
)
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_NATIVE_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


@dataclass(frozen=True)
class ArgRule:
    index: int
    value: int
    value_two: int
    op: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "value": self.value, "op": self.op}
        if self.value_two:
            out["valueTwo"] = self.value_two
        return out


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[ArgRule, ...] = ()
    includes: dict[str, Any] = field(default_factory=dict)
    excludes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    source: str
    default_action: str
    default_errno_ret: int
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]


def invalid(source: str, where: str, problem: str) -> ConfigError:
    return ConfigError(
        f"seccomp profile {source}: {where}: {problem}",
        fix="correct the profile (OCI runtime-spec linux.seccomp format), or record a new one "
        "with `harness profile`",
    )


def load_profile(path: Path) -> Profile:
    return parse_profile(read_json(path), str(path))


def read_json(path: Path) -> Any:
    """A profile file's JSON, or the ConfigError that names what is wrong with it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"seccomp profile {path}: no such file",
            fix="check the path (for the engine: sandbox.seccomp_profile), or record a profile "
            "with `harness profile`",
        ) from exc
    except (OSError, ValueError) as exc:
        raise invalid(str(path), "file", f"not readable JSON ({exc})") from exc


def parse_profile(data: Any, source: str) -> Profile:
    """Validate the fields harness and runc understand; refuse anything it cannot enforce."""
    if not isinstance(data, dict):
        raise invalid(source, "top level", "must be a JSON object")
    default = data.get("defaultAction")
    if default not in ACTIONS:
        raise invalid(source, "defaultAction", f"{default!r} is not one of {', '.join(ACTIONS)}")
    default_errno = data.get("defaultErrnoRet", errno.EPERM)
    if not isinstance(default_errno, int) or not 0 < default_errno < 4096:
        raise invalid(source, "defaultErrnoRet", f"{default_errno!r} is not an errno")
    arches = data.get("architectures", [])
    arch_map = data.get("archMap") or []
    if not arches and arch_map:
        arches = [a.get("architecture") for a in arch_map if isinstance(a, dict)]
    if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
        raise invalid(source, "architectures", "must be a list of SCMP_ARCH_* names")
    raw_rules = data.get("syscalls", [])
    if not isinstance(raw_rules, list):
        raise invalid(source, "syscalls", "must be a list")
    rules = tuple(_parse_rule(raw, f"syscalls[{i}]", source) for i, raw in enumerate(raw_rules))
    return Profile(source, default, default_errno, tuple(arches), rules)


def _parse_rule(raw: Any, where: str, source: str) -> Rule:
    if not isinstance(raw, dict):
        raise invalid(source, where, "must be an object")
    names = raw.get("names", [raw["name"]] if "name" in raw else None)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise invalid(source, f"{where}.names", "must be a non-empty list of syscall names")
    action = raw.get("action")
    if action not in ACTIONS:
        raise invalid(source, f"{where}.action", f"{action!r} is not a seccomp action")
    errno_ret = raw.get("errnoRet")
    if errno_ret is not None and (not isinstance(errno_ret, int) or not 0 < errno_ret < 4096):
        raise invalid(source, f"{where}.errnoRet", f"{errno_ret!r} is not an errno")
    args = []
    for j, arg in enumerate(raw.get("args") or []):
        here = f"{where}.args[{j}]"
        if not isinstance(arg, dict) or arg.get("op") not in OPS:
            raise invalid(source, here, f"op must be one of {', '.join(OPS)}")
        index, value, two = arg.get("index"), arg.get("value", 0), arg.get("valueTwo", 0)
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise invalid(source, f"{here}.index", "must be 0..5")
        if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in (value, two)):
            raise invalid(source, here, "value and valueTwo must be unsigned 64-bit integers")
        args.append(ArgRule(index, value, two, arg["op"]))
    return Rule(
        tuple(names),
        action,
        errno_ret,
        tuple(args),
        raw.get("includes") or {},
        raw.get("excludes") or {},
    )


def native_arch() -> str:
    return _NATIVE_ARCH.get(platform.machine(), f"unsupported:{platform.machine()}")


def applies(rule: Rule, arch: str, caps: frozenset[str]) -> bool:
    """Docker's includes/excludes, for a process that holds `caps` (the engine: none)."""
    inc, exc = rule.includes, rule.excludes
    if inc.get("arches") and arch not in {f"SCMP_ARCH_{a.upper()}" for a in inc["arches"]}:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("minKernel"):
        want = tuple(int(x) for x in str(inc["minKernel"]).split(".")[:2])
        have = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
        if have < want:
            return False
    if exc.get("arches") and arch in {f"SCMP_ARCH_{a.upper()}" for a in exc["arches"]}:
        return False
    return not (exc.get("caps") and set(exc["caps"]) & caps)
