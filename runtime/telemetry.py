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
from typing import Any, Literal, TextIO

Outcome = Literal["allowed", "blocked", "failed", "ok"]

# The startup sequence's steps (docs/design.md): each one event, and one OTel span.
STARTUP_STEPS = frozenset(
    {
        "weight_integrity_check",
        "secret_injection",
        "namespaces",
        "privilege_drop",
        "landlock",
        "seccomp_install",
        "engine_start",
        "engine_ready",
    }
)
EVENT_TYPES = STARTUP_STEPS | frozenset(
    {
        "config_loaded",
        "front_listen",
        "request",
        "request_rejected",
        "tls_handshake_rejected",
        "tls_reload",
        "seccomp_violation",
        "seccomp_startup_probes",
        "egress_attempt",
        "memory_cap_exceeded",
        "task_cap_reached",
        "engine_unresponsive",
        "engine_exit",
        "unsafe_setting",
        "shutdown",
    }
)

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
