"""Security events: one JSON line each on stdout, with the mandatory fields of DESIGN.md.

Events never carry prompts, completions or secret values; callers pass only metadata.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, Literal, TextIO

Outcome = Literal["allowed", "blocked", "failed", "ok"]

# The startup sequence's steps (DESIGN.md): each one event, and one OTel span.
STARTUP_STEPS = frozenset(
    {
        "weight_integrity_check",
        "secret_injection",
        "network_namespace",
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
        "egress_attempt",
        "memory_cap_exceeded",
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
