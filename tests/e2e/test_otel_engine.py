"""OTLP export from the session's shared `harness serve` with the real vLLM engine: its
startup spans (engine_ready included), its events as logs and its request metrics reach the
session's receiver (tests/support/otlp_receiver.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime import telemetry
from tests.support import client_context, otlp_receiver
from tests.support.harness import Harness, openai_client

pytestmark = pytest.mark.engine

PROMPT = "an engine-tier prompt that must never be exported"


def test_shared_server_exports_spans_logs_and_metrics(
    harness: Harness, otlp: otlp_receiver.Receiver, demo_dir: Path
) -> None:
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    openai_client(harness.url, ctx).completions.create(model="demo", prompt=PROMPT, max_tokens=4)
    harness.wait_for("request", route="/v1/completions")

    # Several servers share the receiver: this one's trace is the one of its engine_start.
    def engine_start_log() -> dict[str, Any] | None:
        for record in otlp.logs():
            fields = otlp_receiver.attributes(record["attributes"])
            if record["eventName"] == "engine_start" and fields["pid"] == harness.engine_pid:
                return record
        return None

    otlp.wait(lambda: engine_start_log() is not None)
    record = engine_start_log()
    assert record is not None
    trace_id = record["traceId"]

    def step_names() -> set[str]:
        return {s["name"] for s in otlp.spans() if s["traceId"] == trace_id}

    otlp.wait(lambda: step_names() >= otlp_receiver.STARTUP_STEPS | {"harness.startup"})
    steps = telemetry.STARTUP_STEPS
    stepped = {e["event_type"] for e in harness.events() if e["event_type"] in steps}
    assert stepped <= step_names()

    def completions_counted() -> bool:
        return any(
            otlp_receiver.attributes(p["attributes"]).get("route") == "/v1/completions"
            for p in otlp.metrics().get("harness.requests", [])
        )

    otlp.wait(completions_counted)
    assert all(PROMPT.encode() not in export.raw for export in otlp.exports)
