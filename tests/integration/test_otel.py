"""OTLP/HTTP export: `harness serve` (the real launcher, stage 2, front and TLS; a stand-in for
vLLM, see tests/support/fake_engine.py) exports its startup spans, its events as logs and its
request metrics to a receiver that decodes the protobufs (tests/support/otlp_receiver.py)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime import config as config_mod
from runtime import otel, telemetry
from runtime.demo import assets
from runtime.errors import ConfigError, SecretsError
from runtime.secrets.tmpfs import Secret
from tests.support import REPO, clean_environ, client_context, fake_engine, otlp_receiver
from tests.support.harness import Harness

TOKEN = "otlp-token-that-must-stay-in-the-headers"
PROMPT = "a prompt that must never be exported"
# Written out, not taken from runtime.telemetry: a step dropped there must fail here.
MANDATORY = ("timestamp_utc", "event_type", "outcome", "pod_name", "namespace")


@pytest.fixture()
def receiver() -> Iterator[otlp_receiver.Receiver]:
    server, rec = otlp_receiver.serve()
    yield rec
    server.shutdown()


@pytest.fixture()
def secrets_with_headers(demo_dir: Path) -> Iterator[Path]:
    """A tmpfs secrets dir holding the front's key and the collector's headers."""
    path = Path(tempfile.mkdtemp(prefix="harness-otel-", dir="/dev/shm"))
    shutil.copy2(assets.secrets_dir(demo_dir) / assets.SERVER_KEY, path / assets.SERVER_KEY)
    headers = path / "otlp-headers"
    headers.write_text(f"Authorization=Bearer%20{TOKEN}\nX-Tenant=harness-tests\n")
    headers.chmod(0o600)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _overrides(receiver: otlp_receiver.Receiver, secrets: Path, engine: Path) -> list[str]:
    return [
        f'telemetry.otlp_endpoint="{receiver.url}"',
        'telemetry.otlp_headers_file="otlp-headers"',
        'telemetry.service_name="harness-under-test"',
        "telemetry.export_interval_s=0.5",
        f'secrets.dir="{secrets}"',
        f'front.tls.key="{secrets / assets.SERVER_KEY}"',
        f'engine.python="{engine}"',
    ]


def test_serve_exports_spans_logs_and_metrics(
    demo_dir: Path,
    open_tmp: Path,
    receiver: otlp_receiver.Receiver,
    secrets_with_headers: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAME", "harness-7d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "inference")
    engine = fake_engine.install(open_tmp)
    harness = Harness(
        demo_dir / assets.CONFIG_NAME,
        open_tmp,
        _overrides(receiver, secrets_with_headers, engine),
    )
    try:
        harness.wait_ready()
        pki = demo_dir / "pki"
        ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
        with httpx.Client(verify=ctx, base_url=harness.url, timeout=30) as client:
            assert client.get("/v1/models").status_code == 200
            completion = {"model": "demo", "prompt": PROMPT, "max_tokens": 4}
            assert client.post("/v1/completions", json=completion).status_code == 200
            assert client.get("/pause").status_code == 404
        harness.wait_for("request_rejected", status=404)
        # Three handshakes without a client certificate: fewer events, all three counted.
        no_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        for _ in range(3):
            with pytest.raises(httpx.HTTPError), httpx.Client(verify=no_cert) as client:
                client.get(f"{harness.url}/v1/models")
        deadline = time.monotonic() + 10
        while sum(e.get("count", 0) for e in harness.events("tls_handshake_rejected")) < 3:
            assert time.monotonic() < deadline, harness.events("tls_handshake_rejected")
            time.sleep(0.05)
        assert harness.terminate() == 0
    finally:
        harness.kill()
    events = harness.events()

    # Every startup step's event has the mandatory fields, and one span of its own.
    steps = [e for e in events if e["event_type"] in telemetry.STARTUP_STEPS]
    assert {e["event_type"] for e in steps} >= otlp_receiver.STARTUP_STEPS
    for event in events:
        assert all(event.get(name) for name in MANDATORY), event
        assert event["pod_name"] == "harness-7d9f-abcde" and event["namespace"] == "inference"
    spans = receiver.spans()
    [root] = [s for s in spans if s["name"] == "harness.startup"]
    children = [s for s in spans if s.get("parentSpanId") == root["spanId"]]
    assert sorted(s["name"] for s in children) == sorted(e["event_type"] for e in steps)
    for span in children:
        assert int(span["startTimeUnixNano"]) <= int(span["endTimeUnixNano"])
        assert int(root["startTimeUnixNano"]) <= int(span["startTimeUnixNano"])
    [weights] = [
        s
        for s in children
        if s["name"] == "weight_integrity_check"
        and "stage" not in otlp_receiver.attributes(s.get("attributes"))
    ]
    verify_s = next(e for e in events if e["event_type"] == "weight_integrity_check")["seconds"]
    took = (int(weights["endTimeUnixNano"]) - int(weights["startTimeUnixNano"])) / 1e9
    assert took == pytest.approx(verify_s, abs=0.002)

    # Every event arrived as a log record with the same fields.
    logs = receiver.logs()
    by_time = {
        (
            otlp_receiver.attributes(r["attributes"])["event_type"],
            otlp_receiver.attributes(r["attributes"])["timestamp_utc"],
        ): r
        for r in logs
    }
    for event in events:
        record = by_time[(event["event_type"], event["timestamp_utc"])]
        exported = otlp_receiver.attributes(record["attributes"])
        for name in MANDATORY:
            assert exported[name] == event[name]
        assert record["eventName"] == event["event_type"]
    shutdown = next(r for r in logs if r["eventName"] == "shutdown")
    assert otlp_receiver.attributes(shutdown["attributes"])["exit_code"] == 0

    # Request metrics, the same derivation as the Prometheus ones.
    metrics = receiver.metrics()
    requests = {
        (a["route"], a["status"]): int(p["asInt"])
        for p in metrics["harness.requests"]
        for a in [otlp_receiver.attributes(p["attributes"])]
    }
    assert requests[("/v1/models", "200")] >= 1
    assert requests[("/v1/completions", "200")] >= 1
    assert requests[("other", "404")] >= 1
    assert any(int(p["count"]) >= 1 for p in metrics["harness.request.duration"])
    refused = [
        int(p["asInt"])
        for p in metrics["harness.connections.refused"]
        if otlp_receiver.attributes(p["attributes"])["reason"] == "no_client_certificate"
    ]
    assert max(refused) == 3  # cumulative: the last export holds the total
    assert "harness.requests.in_flight" in metrics
    assert "harness.connections.open" in metrics
    assert "harness.handshakes.in_progress" in metrics

    # Resource attributes on every export; credentials only in the headers; no prompt.
    for resource in receiver.resources():
        assert resource["k8s.pod.name"] == "harness-7d9f-abcde"
        assert resource["k8s.namespace.name"] == "inference"
        assert resource["service.name"] == "harness-under-test"
    for export in receiver.exports:
        assert export.headers["authorization"] == f"Bearer {TOKEN}"
        assert export.headers["x-tenant"] == "harness-tests"
        assert TOKEN.encode() not in export.raw
        assert PROMPT.encode() not in export.raw
    assert {"/v1/traces", "/v1/logs", "/v1/metrics"} <= set(receiver.paths())


def test_refused_weights_are_still_exported(
    open_tmp: Path, demo_dir: Path, receiver: otlp_receiver.Receiver
) -> None:
    """Step 2 fails before the exporter has its credentials: it starts late, for the
    security team to see the refusal."""
    copy = open_tmp / "demo"
    shutil.copytree(demo_dir, copy)
    (copy / "model" / "extra.bin").write_bytes(b"pickle")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            "serve",
            "--config",
            str(copy / assets.CONFIG_NAME),
            "--set",
            f'telemetry.otlp_endpoint="{receiver.url}"',
        ],
        cwd=REPO,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    logs = {r["eventName"]: otlp_receiver.attributes(r["attributes"]) for r in receiver.logs()}
    assert logs["weight_integrity_check"]["outcome"] == "blocked"
    assert logs["shutdown"]["exit_code"] == 3
    [root] = [s for s in receiver.spans() if s["name"] == "harness.startup"]
    assert root["status"]["code"] == "STATUS_CODE_ERROR"


def test_no_endpoint_means_no_sdk_and_no_thread(tmp_path: Path, demo_dir: Path) -> None:
    """Checked in a fresh interpreter: nothing else has imported the SDK there."""
    code = f"""
import sys, threading
from runtime import config, otel, telemetry
from runtime.front import metrics
cfg = config.load({str(demo_dir / assets.CONFIG_NAME)!r})
export = otel.install(cfg)
export.start({{}})
export.watch_gauges(metrics.Gauges(lambda: 0, lambda: 0, lambda: 0))
assert type(export) is otel.NoExport
assert not telemetry._subscribers
assert threading.active_count() == 1, threading.enumerate()
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "SDK imported"
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_collector_headers_from_secrets() -> None:
    raw = {"otlp": Secret("otlp", b"Authorization=Bearer%20abc, X-Scope=team-a\n")}
    assert otel.collector_headers("otlp", raw) == {
        "Authorization": "Bearer abc",
        "X-Scope": "team-a",
    }
    env = {"otlp.env:Authorization": Secret("otlp.env:Authorization", b"Bearer xyz")}
    assert otel.collector_headers("otlp.env", env) == {"Authorization": "Bearer xyz"}
    with pytest.raises(SecretsError, match=r"not in secrets\.dir"):
        otel.collector_headers("missing", raw)
    with pytest.raises(SecretsError, match="not NAME=VALUE") as refused:
        otel.collector_headers("bad", {"bad": Secret("bad", b"just-a-token-value")})
    assert "just-a-token-value" not in str(refused.value)
    with pytest.raises(SecretsError, match="not a valid HTTP header"):
        otel.collector_headers("bad", {"bad": Secret("bad", b"Bad Name=x")})


@pytest.mark.parametrize(
    ("telemetry", "error"),
    [
        ('otlp_endpoint = "ftp://collector"', "http:// or https://"),
        ('otlp_endpoint = "https://user:pw@collector"', "no credentials"),
        (
            'otlp_endpoint = "http://collector.example:4318"\notlp_headers_file = "h"',
            "over https",
        ),
        ('otlp_endpoint = "https://c:4318"\notlp_client_cert = "c.pem"', "go together"),
        ('otlp_endpoint = "https://c:4318"\nexport_interval_s = 0', "greater than 0"),
    ],
)
def test_telemetry_config_refuses(
    tmp_path: Path, demo_dir: Path, telemetry: str, error: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text((demo_dir / assets.CONFIG_NAME).read_text() + f"\n[telemetry]\n{telemetry}\n")
    with pytest.raises(ConfigError, match=error):
        config_mod.load(config)
