"""Throttled events: what an outsider can trigger at will is counted in full, in at most one
event a second for each set of fields."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from runtime import telemetry


@pytest.fixture()
def emitted() -> Any:
    stream = io.StringIO()
    telemetry.set_stream(stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    telemetry.set_stream(None)


def test_a_burst_is_one_event_at_once_and_one_with_the_rest(emitted: Any) -> None:
    async def burst() -> None:
        throttled = telemetry.Throttled("request_rejected", "blocked")
        throttled.WINDOW_S = 0.05
        for _ in range(5):
            throttled.record(reason="too_many_connections", limit=2)
        throttled.record(reason="header_timeout", limit=2)  # other fields: its own window
        assert [e["count"] for e in emitted()] == [1, 1]  # the rest are held back...
        await asyncio.sleep(0.15)  # the held ones went out at 0.05 s, which opened a new window
        throttled.record(reason="too_many_connections", limit=2)  # past it: at once

    asyncio.run(burst())
    events = emitted()
    assert [(e["reason"], e["count"]) for e in events] == [
        ("too_many_connections", 1),
        ("header_timeout", 1),
        ("too_many_connections", 4),  # ...and reported together when the window is over
        ("too_many_connections", 1),
    ]
    assert all(e["event_type"] == "request_rejected" and e["limit"] == 2 for e in events)
    assert all(e["outcome"] == "blocked" for e in events)


def test_without_an_event_loop_every_one_is_an_event(emitted: Any) -> None:
    """Nothing could flush what was held back, so nothing is held back."""
    throttled = telemetry.Throttled("tls_handshake_rejected", "blocked")
    for _ in range(3):
        throttled.record(reason="no_client_certificate", detail="x")
    assert [e["count"] for e in emitted()] == [1, 1, 1]


def test_held_events_name_their_first_distinct_clients(emitted: Any) -> None:
    """Addresses are not fields (an attacker has no end of them): each event names up to
    MAX_CLIENTS distinct ones among those it stands for."""

    async def burst() -> None:
        throttled = telemetry.Throttled("tls_handshake_rejected", "blocked")
        throttled.WINDOW_S = 0.05
        throttled.MAX_CLIENTS = 3
        for client in ["10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.4", None]:
            throttled.record(client, reason="handshake_timeout", detail="x")
        await asyncio.sleep(0.15)

    asyncio.run(burst())
    first, held = emitted()
    assert (first["count"], first["clients"]) == (1, ["10.0.0.1"])
    assert (held["count"], held["clients"]) == (5, ["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    assert "client" not in first and held["reason"] == "handshake_timeout"
