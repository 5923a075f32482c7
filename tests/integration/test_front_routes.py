"""The in-process front (tests/support/front.py): which requests reach the engine and how:
routes, methods, body and head caps, streams relayed, identities, events and metrics."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Iterator

import httpx
import pytest

from tests.support import client_context, free_port, raw_request
from tests.support.front import (
    ALLOWED,
    CHAT,
    Front,
    audit_events,
    read_status,
    wait_until,
)


@pytest.mark.parametrize(
    "target",
    [
        b"/pause",
        b"/collective_rpc",
        b"/v1/../pause",
        b"/v1/%2e%2e/pause",
        b"/%761/models",
        b"//v1/models",
        b"/invocations",
        b"/v1/models/",
        b"/v1//models",
        b"/v1/models%2f",
        b"/V1/models",
        b"/v1/models;x",
        b"/health",
        b"/metrics",
        b"/tokenize",
        b"/v1/models/../models",
    ],
)
def test_unlisted_targets_get_404_and_never_reach_upstream(front: Front, target: bytes) -> None:
    for method in ("GET", "POST"):
        status, body = raw_request(front.url, front.ctx(), method, target, b"{}")
        assert status == 404, (method, target)
        assert json.loads(body)["error"]["code"] == "route_not_allowed"
    assert front.upstream.seen == []


def test_allowed_route_reaches_upstream_with_a_clean_request(front: Front) -> None:
    with httpx.Client(verify=front.ctx()) as client:
        response = client.get(
            f"{front.url}/v1/models?debug=1",
            headers={
                "authorization": "Bearer x",
                "x-forwarded-for": "1.2.3.4",
                "cookie": "a=b",
                "accept": "application/json",
            },
        )
    assert response.status_code == 200
    [seen] = front.upstream.seen
    assert seen["path"] == b"/v1/models" and seen["query"] == b""
    assert b"authorization" not in seen["headers"] and b"cookie" not in seen["headers"]
    assert b"x-forwarded-for" not in seen["headers"]
    assert seen["headers"][b"accept"] == b"application/json"
    assert seen["headers"][b"x-request-id"] == response.headers["x-request-id"].encode()
    # The engine's response headers are allowlisted too.
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] != "chosen-by-the-engine"
    assert "set-cookie" not in response.headers
    assert "access-control-allow-origin" not in response.headers


def test_wrong_method_is_405(front: Front) -> None:
    with httpx.Client(verify=front.ctx()) as client:
        assert client.delete(f"{front.url}/v1/completions").status_code == 405
        assert client.get(f"{front.url}/v1/completions").status_code == 405
    assert front.upstream.seen == []


def test_body_over_the_cap_is_413_and_not_forwarded(front: Front) -> None:
    with httpx.Client(verify=front.ctx()) as client:
        declared = client.post(
            f"{front.url}/v1/completions",
            content=b"x" * 5000,
            headers={"content-type": "application/json"},
        )

        def chunks() -> Iterator[bytes]:  # no content-length: counted while it streams in
            for _ in range(10):
                yield b"y" * 1000

        streamed = client.post(
            f"{front.url}/v1/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
    assert declared.status_code == 413 and streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "body_too_large"
    assert front.upstream.seen == []


def test_stream_is_relayed_chunk_by_chunk(front: Front) -> None:
    """The upstream holds its second chunk until the client has seen the first: a front that
    buffered the stream would never deliver the first, and this test would time out."""
    with (
        httpx.Client(verify=front.ctx(), timeout=20) as client,
        client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "data: 1"
        front.upstream.gate.set()
        rest = [line for line in lines if line]
    assert rest == ["data: 2", "data: [DONE]"]


def test_identity_not_on_the_allowlist_is_closed_before_http(front: Front) -> None:
    # TLS 1.3 clients send their first request right behind their handshake, often in the
    # same read as it, and asyncio delivers it even after close(): repeat, so that a request
    # slipping through would be seen by the upstream.
    for _ in range(20):
        with (
            pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError)),
            httpx.Client(verify=front.ctx("other")) as client,
        ):
            client.get(f"{front.url}/v1/models")
        with pytest.raises(OSError):
            raw_request(front.url, front.ctx("other"), "GET", b"/v1/models")
    # Throttled: one event per second and reason, each counting the refusals it stands for.
    wait_until(lambda: sum(e.get("count", 0) for e in front.events) >= 40, "not all counted")
    rejected = audit_events(front, "tls_handshake_rejected")
    assert sum(e["count"] for e in rejected) == 40 and len(rejected) <= 3
    assert list(rejected[0]["presented"]) == ["URI:spiffe://test.local/ns/x/sa/other"]
    assert front.upstream.seen == []


def test_request_events_carry_identity_and_no_body(front: Front) -> None:
    secret_prompt = "the prompt text must never be logged"
    with httpx.Client(verify=front.ctx()) as client:
        client.post(f"{front.url}/v1/completions", json={"model": "demo", "prompt": secret_prompt})
    raw_request(front.url, front.ctx(), "GET", b"/pause")
    [ok] = audit_events(front, "request")
    [rejected] = audit_events(front, "request_rejected")
    assert ok["identity"] == rejected["identity"] == ALLOWED
    assert ok["route"] == "/v1/completions" and ok["status"] == 200
    assert rejected["route"] == "/pause" and rejected["reason"] == "route_not_allowed"
    assert secret_prompt not in json.dumps(front.events)


def test_tls_context_is_tls13_only_and_requires_client_certs(front: Front) -> None:
    host, port = front.url.removeprefix("https://").split(":")
    ctx = client_context(
        front.pki_dir / "ca.pem",
        front.pki_dir / "client.pem",
        front.pki_dir / "client-key.pem",
        max_tls=ssl.TLSVersion.TLSv1_2,
    )
    with socket.create_connection((host, int(port))) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")
    ok = front.ctx()
    with (
        socket.create_connection((host, int(port))) as raw,
        ok.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"model": "demo", "prompt": "hi", "max_tokens": 257}, {}, 400, "max_tokens_exceeded"),
        ({"model": "demo", "prompt": "hi", "n": 5}, {}, 400, "limit_exceeded"),
        ({"model": "other", "prompt": "hi"}, {}, 404, "model_not_found"),
        (
            {"model": "demo", "prompt": "hi", "use_beam_search": True},
            {},
            400,
            "unsupported_parameter",
        ),
        (b"not json", {"content-type": "application/json"}, 400, "invalid_json"),
        (
            b'{"model": "demo", "prompt": "hi"}',
            {"content-type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
    ],
)
def test_limit_rejections_never_reach_the_engine(
    front: Front, body: object, headers: dict[str, str], status: int, code: str
) -> None:
    with httpx.Client(verify=front.ctx()) as client:
        if isinstance(body, bytes):
            response = client.post(f"{front.url}/v1/completions", content=body, headers=headers)
        else:
            response = client.post(f"{front.url}/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert front.upstream.seen == []
    [event] = audit_events(front, "request_rejected")
    assert event["reason"] == code and event["status"] == status


def test_forwarded_body_is_the_checked_one_with_the_default_injected(front: Front) -> None:
    with httpx.Client(verify=front.ctx()) as client:
        response = client.post(
            f"{front.url}/v1/completions",
            content=b'{"model":"demo",   "prompt":"hi"}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
    assert response.status_code == 200
    [seen] = front.upstream.seen
    assert json.loads(seen["body"]) == {"model": "demo", "prompt": "hi", "max_tokens": 256}
    assert seen["headers"][b"content-type"] == b"application/json"


def _send_head(front: Front, head: bytes) -> tuple[int, bytes]:
    """Send a request head in pieces; the status and raw body of the response."""
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        try:
            for start in range(0, len(head), 4096):
                tls.sendall(head[start : start + 4096])
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the front closed the connection mid-head: its answer is already there
        data = b""
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            while chunk := tls.recv(65536):
                data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("where", ["headers", "target"])
def test_an_oversized_request_head_gets_431_and_nothing_is_forwarded(
    front: Front, where: str
) -> None:
    from runtime.front.server import MAX_HEAD_BYTES

    pad = b"x" * 1000
    if where == "headers":
        lines = b"".join(b"x-pad-%d: %s\r\n" % (i, pad) for i in range(MAX_HEAD_BYTES // 1000 + 2))
        head = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + lines + b"\r\n"
    else:
        head = b"GET /v1/models?" + pad * (MAX_HEAD_BYTES // 1000 + 2) + b" HTTP/1.1\r\n\r\n"
    status, body = _send_head(front, head)
    error = json.loads(body)["error"]
    assert status == 431 and error["code"] == "header_too_large"
    assert f"larger than {MAX_HEAD_BYTES} bytes" in error["message"]  # what, and the fix:
    assert "shorter headers" in error["message"]
    [event] = audit_events(front, "request_rejected")
    assert event["reason"] == "header_too_large" and event["limit_bytes"] == MAX_HEAD_BYTES
    assert front.upstream.seen == []
    # A head well within the cap is served.
    lines = b"".join(b"x-pad-%d: %s\r\n" % (i, pad) for i in range(MAX_HEAD_BYTES // 2000))
    status, _ = _send_head(
        front,
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + lines + b"\r\n",
    )
    assert status == 200 and len(front.upstream.seen) == 1


def test_prometheus_metrics_from_the_audit_events(front: Front) -> None:
    from runtime import telemetry
    from runtime.front import metrics

    port = free_port()
    open_now = front.server.server_state.connections
    assert front.tls_material is not None
    handshakes = front.tls_material.handshakes
    collected = metrics.serve(
        f"127.0.0.1:{port}",
        metrics.Gauges(lambda: 0.0, lambda: len(open_now), lambda: handshakes.in_progress),
    )
    host, front_port = front.url.removeprefix("https://").split(":")
    try:
        with httpx.Client(verify=front.ctx()) as client:
            assert client.get(f"{front.url}/v1/models").status_code == 200
            assert (
                client.post(f"{front.url}/v1/completions", json={"model": "x"}).status_code == 404
            )
        raw_request(front.url, front.ctx(), "GET", b"/pause")
        with pytest.raises(httpx.HTTPError), httpx.Client(verify=front.ctx("other")) as client:
            client.get(f"{front.url}/v1/models")
        audit_events(front, "request_rejected", 2)
        audit_events(front, "tls_handshake_rejected")
        with (  # one connection held open, one stalled in its handshake, while scraped
            socket.create_connection((host, int(front_port)), timeout=10) as raw,
            front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
            socket.create_connection((host, int(front_port)), timeout=10),
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_status(tls) == 200
            wait_until(lambda: len(open_now) == 1, "connections closed earlier are still counted")
            wait_until(lambda: handshakes.in_progress == 1, "the stalled handshake is not counted")
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        telemetry.unsubscribe(collected.observe)
    assert (
        'harness_requests_total{outcome="allowed",reason="",route="/v1/models",status="200"} 1.0'
    ) in text
    assert (
        'harness_requests_total{outcome="blocked",reason="model_not_found",'
        'route="/v1/completions",status="404"} 1.0'
    ) in text
    assert 'reason="route_not_allowed",route="other"' in text  # attacker paths not as labels
    assert 'harness_connections_refused_total{reason="identity_not_allowed"} 1.0' in text
    assert 'harness_request_duration_seconds_count{route="/v1/models"} 1.0' in text
    assert "harness_requests_in_flight 0.0" in text
    assert "harness_connections_open 1.0" in text
    assert "harness_handshakes_in_progress 1.0" in text
