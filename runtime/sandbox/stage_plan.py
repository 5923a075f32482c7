"""The stage-2 contract: everything harness hands the process that becomes the engine, and
everything it reports back, typed.

harness builds one StagePlan (each mechanism's `build` in its own module), serialises it as
JSON onto an inherited pipe, and stage 2 (runtime.sandbox.exec) parses it back strictly: a
missing or unknown key, or a value of the wrong type, is refused before any step runs. Each
mechanism's `apply` in stage 2 returns its part of one StageReport, which goes back as JSON
and which harness parses as strictly. Only the standard library here: stage 2 imports nothing
else (no pydantic, no libseccomp; the seccomp filter arrives compiled, as BPF).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NamespacesPlan:
    """The namespaces a helper made before harness confined itself (runtime.sandbox.
    namespaces); stage 2 enters them with setns, user first."""

    mode: str  # auto | required | off
    fds: dict[str, int] = field(default_factory=dict)  # kind (user, mnt, net, ipc, pid) -> fd


@dataclass(frozen=True)
class PrivilegesPlan:
    uid: int | None  # None: keep the current uid (not root, or root allowed for development)
    gid: int | None
    max_tasks: int | None = None  # RLIMIT_NPROC: the engine's processes and threads


@dataclass(frozen=True)
class LandlockPlan:
    mode: str  # best_effort | required | off
    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    tcp_ports: list[int] = field(default_factory=list)
    write_files: list[str] = field(default_factory=list)
    # Folders beneath which only empty folders may be removed (the runtime dir's parent).
    remove_dirs: list[str] = field(default_factory=list)
    restrict_tcp: bool = True  # bind/connect only tcp_ports (ABI >= 4)
    scoped: bool = True  # no signals or abstract Unix sockets out of the domain (ABI >= 6)


@dataclass(frozen=True)
class SeccompPlan:
    mode: str  # enforce | kill | complain | record | off
    bpf: bytes = b""  # the compiled filter (struct sock_filter[], native arch); empty: none
    notify: bool = False  # load with a notification listener, handed back to harness
    # The same profile killing on anything else, for stage 2's own waiting processes (pidns).
    guard: bytes = b""
    report: dict[str, Any] = field(default_factory=dict)  # what was compiled, for the event


@dataclass(frozen=True)
class StagePlan:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    seccomp: SeccompPlan
    namespaces: NamespacesPlan | None = None  # None (with the next two): harness itself is
    privileges: PrivilegesPlan | None = None  # recorded (`harness profile --container`), with
    landlock: LandlockPlan | None = None  # only no_new_privs and the recording filter


# What stage 2 sends back: each mechanism's `apply` returns its part, and harness parses the
# whole strictly too (runtime/engine/process.py emits the events from it). A field is None
# where stage 2 did not get that far (a failed step) or the mechanism has no such thing.


@dataclass(frozen=True)
class NamespacesReport:
    mode: str
    entered: list[str]  # setns, in order (user, mnt, net, ipc, pid)
    pid_in_namespace: int | None = None  # the engine's pid in its PID namespace (pidns.py)
    seconds: float | None = None


@dataclass(frozen=True)
class PrivilegesReport:
    rlimits: dict[str, int]
    no_new_privs: bool
    bounding_set: str | None = None  # None (and below): stage 2 stopped before the drop
    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None
    capabilities: str | None = None
    parent_death_signal: str | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class LandlockReport:
    mode: str
    enforced: bool
    reason: str | None = None  # why not enforced
    abi: int | None = None
    filesystem: dict[str, list[str]] | None = None
    tcp: dict[str, Any] | None = None
    scoped: list[str] | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class StageReport:
    namespaces: NamespacesReport | None = None
    privileges: PrivilegesReport | None = None
    landlock: LandlockReport | None = None
    seccomp: dict[str, Any] | None = None  # SeccompPlan.report, and whether it loaded
    error: str | None = None  # a step failed: nothing was exec'd


def fields(report: Any) -> dict[str, Any]:
    """A report as event fields: what it has (None fields left out)."""
    return {k: v for k, v in dataclasses.asdict(report).items() if v is not None}


def to_json(plan: StagePlan) -> bytes:
    return json.dumps(_encode(plan)).encode()


def report_to_json(report: StageReport) -> bytes:
    return json.dumps(_encode(report, drop_none=True)).encode()


def report_from_json(data: bytes) -> StageReport:
    """As from_json, for what stage 2 sends back."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"stage report: not JSON: {exc}") from None
    report = _decode(StageReport, raw, "report", "stage report")
    assert isinstance(report, StageReport)
    return report


def from_json(data: bytes) -> StagePlan:
    """Parse strictly: raises ValueError naming the first key that is missing, unknown or of
    the wrong type."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"stage plan: not JSON: {exc}") from None
    plan = _decode(StagePlan, raw, "plan")
    assert isinstance(plan, StagePlan)
    return plan


def _encode(value: Any, drop_none: bool = False) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _encode(getattr(value, f.name), drop_none)
            for f in dataclasses.fields(value)
            if not (drop_none and getattr(value, f.name) is None)
        }
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list | tuple):
        return [_encode(v, drop_none) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v, drop_none) for k, v in value.items()}
    return value


def _decode(kind: Any, value: Any, where: str, label: str = "stage plan") -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where, label)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"{label}: {where} must be an object")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        if unknown := sorted(set(value) - names):
            raise ValueError(f"{label}: {where}: unknown key {unknown[0]!r}")
        required = {
            f.name
            for f in dataclasses.fields(kind)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if missing := sorted(required - set(value)):
            raise ValueError(f"{label}: {where}: missing key {missing[0]!r}")
        return kind(**{k: _decode(hints[k], v, f"{where}.{k}", label) for k, v in value.items()})
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{label}: {where} must be a list")
        return [_decode(args[0], v, f"{where}[{i}]", label) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{label}: {where} must be an object")
        return {k: _decode(args[1], v, f"{where}.{k}", label) for k, v in value.items()}
    if kind is Any:
        return value
    if kind is bytes:
        if not isinstance(value, str):
            raise ValueError(f"{label}: {where} must be base64 text")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError(f"{label}: {where} is not base64") from None
    # bool is an int to Python, never to the plan.
    if type(value) is not kind:
        raise ValueError(f"{label}: {where} must be {kind.__name__}, not {type(value).__name__}")
    return value
