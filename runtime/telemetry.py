"""Security events: one JSON line each on stdout, with the mandatory fields
of docs/events.md.

Events never carry prompts, completions or secret values; callers pass only metadata.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TextIO

Outcome = Literal["allowed", "blocked", "failed", "ok"]


@dataclass(frozen=True)
class EventType:
    """One kind of event: what it reports and the fields it adds to the mandatory ones.
    docs/events.md is generated from these (docs/generate.py)."""

    says: str
    fields: str
    step: bool = False  # a step of the startup sequence: also an OTel span


EVENTS: dict[str, EventType] = {
    "config_loaded": EventType(
        "the configuration was read and validated", "`config` (its path), `model` (the model dir)"
    ),
    "landlock": EventType(
        "Landlock applied: to harness itself (`scope: front`) at start, then to the engine; "
        "`failed` when it could not be enforced",
        "`scope`, `abi`, `enforced`, the rules (read, write, TCP ports, scopes), `reason`",
        step=True,
    ),
    "weight_integrity_check": EventType(
        "a folder of weights verified (or refused: `blocked` with `error`), before the engine "
        "and again once it is ready (`stage: after_load`)",
        "`artifact` (`model`, `engine.lora[NAME]`, `engine.draft`), `model`, `files`, `bytes`, "
        "`tensors`, `seconds`, `root_digest`, `signer`, `method`, `stage`, `error`",
        step=True,
    ),
    "secret_injection": EventType(
        "secrets loaded from the secrets dir (`harness serve`) or fetched from Vault "
        "(`harness secrets fetch`); names only, never values",
        "`dir`, `names`, `environment`, `engine`; from Vault: `address`, `auth`, `role`, "
        "`paths`, `fields`, `count`, `token_revoked`; `error` when refused",
        step=True,
    ),
    "unsafe_setting": EventType(
        "a setting that weakens a control is in force", "`setting` (the key), `risk`"
    ),
    "namespaces": EventType(
        "the engine's namespaces: which were made and entered, its root; `failed` with the "
        "`reason` where the node does not allow them",
        "`isolated`, `mode`, the namespaces, `root`, `reason`, `seconds`",
        step=True,
    ),
    "privilege_drop": EventType(
        "the engine's privileges as stage 2 left them",
        "`uid`, `gid`, `no_new_privs`, the bounding set, capabilities, `rlimits`, `seconds`",
        step=True,
    ),
    "seccomp_install": EventType(
        "a seccomp filter loaded: the engine's profile, then harness's own (`scope: front`); "
        "`failed` if the front filter's supervisor exits",
        "`scope`, `mode`, `profile`, `installed`, rule counts, `reason`, `seconds`",
        step=True,
    ),
    "engine_start": EventType(
        "the engine was started",
        "`pid` (stage 2's process: with a PID namespace, the one that waits outside it), "
        "`engine_pid` (then: vLLM's first process, as harness sees it), `socket`, `device`, "
        "`argv`, the names (never the values) of its environment",
        step=True,
    ),
    "engine_ready": EventType(
        "the engine answered its health check", "`pid`, `seconds`", step=True
    ),
    "seccomp_startup_probes": EventType(
        "once the engine is ready: vLLM's known startup probes that were refused without an "
        "alert (io_uring, UDP sockets)",
        "`probes` (label to count), `mode`, `scope`, `meaning`",
    ),
    "seccomp_violation": EventType(
        "a syscall refused by a filter (or allowed and reported in `complain`), at most one "
        "a second per syscall with a `count`",
        "`syscall`, `nr`, `pid`, `tid`, `phase` (`startup`, `serving`), `scope`, `count`; "
        "`domain`, `type`, `protocol` for `socket`; `target` for calls limited to the engine",
    ),
    "front_listen": EventType(
        "the front listens: the engine is ready and its weights re-checked",
        "`listen`, `tls`, `client_cert`, `allowed_identities`, `max_connections`, "
        "`open_files_needed`, `open_files_limit`, `engine_cpus`, `front_cpus`",
    ),
    "tls_handshake_rejected": EventType(
        "a connection refused before any HTTP: its TLS handshake failed or timed out, its "
        "identity is not allowed, or a handshake cap was reached; at most one a second per "
        "reason and detail",
        "`reason`, `detail`, `count`, `clients` (the first five addresses), `presented` (the "
        "SANs, for `identity_not_allowed`)",
    ),
    "tls_reload": EventType(
        "the front's certificate, key or client CA changed on disk and was loaded (`failed`: "
        "kept the previous material)",
        "`cert`, `client_ca`, `error`",
    ),
    "request": EventType(
        "a request served (or left by its client: status 499)",
        "`request_id`, `identity`, `method`, `route`, `status`, `latency_ms`, `reason`",
    ),
    "request_rejected": EventType(
        "a request or connection refused by the front (framing, route, limits, admission, "
        "slow body); those refused before the app are throttled like refused handshakes",
        "`reason` (the error code), `status`, `request_id`, `identity`, `method`, `route`, "
        "`latency_ms`; refused before the app: `status`, `count`, `clients`, `limit`",
    ),
    "memory_cap_exceeded": EventType(
        "the engine went over a memory cap and was killed",
        "`resource` (`cpu_memory`, `gpu_memory`), `observed_bytes`, `cap_bytes`, `pids`, "
        "`measure`, `action`",
    ),
    "task_cap_reached": EventType(
        "the engine's processes and threads reached `engine.max_tasks` (once; not stopped)",
        "`setting`, `observed_tasks`, `cap_tasks`, `pids`",
    ),
    "engine_unresponsive": EventType(
        "the engine stopped answering its health check and was killed",
        "`seconds_without_answer`, `timeout_s`, `last_error`, `setting`, `action`",
    ),
    "engine_exit": EventType(
        "the engine exited while harness served", "`pid`, `exit_code`, `reason`"
    ),
    "shutdown": EventType(
        "harness exits",
        "`exit_code`, `engine_exit_code`, `reason`; `error`, `message` on a failure",
    ),
}
EVENT_TYPES = frozenset(EVENTS)
# The startup sequence's steps (docs/design.md): each one event, and one OTel span.
STARTUP_STEPS = frozenset(name for name, kind in EVENTS.items() if kind.step)


_lock = threading.Lock()
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))  # one per process, not per event
_stream: TextIO | None = None
_subscribers: list[Callable[[dict[str, Any]], None]] = []


def subscribe(callback: Callable[[dict[str, Any]], None]) -> None:
    """Also hand every event record to `callback` (metrics are derived from events)."""
    _subscribers.append(callback)


def unsubscribe(callback: Callable[[dict[str, Any]], None]) -> None:
    _subscribers.remove(callback)


def set_stream(stream: TextIO | None) -> None:
    """Redirect events (tests, or a CLI mode whose stdout is for something else)."""
    global _stream
    _stream = stream


@functools.cache
def identity() -> dict[str, str]:
    """Pod name and namespace, as the Kubernetes Downward API sets them (at the pod's start:
    read once, not for every request's event)."""
    return {
        "pod_name": os.environ.get("POD_NAME") or socket.gethostname(),
        "namespace": os.environ.get("POD_NAMESPACE") or "default",
    }


def emit(event_type: str, outcome: Outcome, **fields: Any) -> dict[str, Any]:
    """Write one event line and return the record."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    record: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
        "event_type": event_type,
        "outcome": outcome,
        **identity(),
        **fields,
    }
    line = _ENCODER.encode(record)
    stream = _stream or sys.stdout
    with _lock:
        stream.write(line + "\n")
        stream.flush()
    for callback in _subscribers:
        callback(record)
    return record


class Throttled:
    """Events that an outsider can cause at will (refused handshakes, refused connections):
    at most one a second for each distinct set of fields. Those held back within the second
    are reported together when it is over, as one event whose `count` is how many it stands
    for; the first carries `count` 1. Everything is counted, and the log is never flooded.
    The clients' addresses are not fields (there is no end to them): an event names the
    first MAX_CLIENTS distinct ones it stands for, in `clients`."""

    WINDOW_S = 1.0
    MAX_CLIENTS = 5

    def __init__(self, event_type: str, outcome: Outcome) -> None:
        self.event_type = event_type
        self.outcome: Outcome = outcome
        self._last: dict[tuple[tuple[str, Any], ...], float] = {}
        self._held: Counter[tuple[tuple[str, Any], ...]] = Counter()
        self._clients: dict[tuple[tuple[str, Any], ...], list[str]] = {}

    def record(self, client: str | None = None, **fields: Any) -> None:
        """One more, from `client` when known; `fields` must come from a small set: each
        distinct set is remembered."""
        key = tuple(fields.items())
        wait = self._last.get(key, -self.WINDOW_S) + self.WINDOW_S - time.monotonic()
        if wait <= 0:
            self._emit(key, 1, [client] if client else [])
            return
        if not self._held[key]:  # the first held back: report them when the second is over
            try:
                asyncio.get_running_loop().call_later(wait, self._flush, key)
            except RuntimeError:  # no event loop: nothing to wait with
                self._emit(key, 1, [client] if client else [])
                return
        self._held[key] += 1
        clients = self._clients.setdefault(key, [])
        if client and client not in clients and len(clients) < self.MAX_CLIENTS:
            clients.append(client)

    def _flush(self, key: tuple[tuple[str, Any], ...]) -> None:
        count = self._held.pop(key, 0)
        if count:
            self._emit(key, count, self._clients.pop(key, []))

    def _emit(self, key: tuple[tuple[str, Any], ...], count: int, clients: list[str]) -> None:
        self._last[key] = time.monotonic()
        extra = {"clients": clients} if clients else {}
        emit(self.event_type, self.outcome, **dict(key), count=count, **extra)
