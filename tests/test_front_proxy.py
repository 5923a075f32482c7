"""The front in-process, for real: uvicorn + our TLS context + our identity protocol, in front
of a real HTTP server on a Unix socket that records what reaches it. No vLLM: fast tier."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
import uvicorn

from runtime.config import Config
from runtime.demo import pki
from runtime.front import server as front_server
from runtime.front.proxy import FrontApp, FrontState
from runtime.front.tls import RotatingContext
from tests.support import client_context, free_port, raw_request

ALLOWED = "spiffe://test.local/ns/gateway/sa/ai-gateway"
CHAT = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Upstream:
    """A real HTTP server on a Unix socket standing where the engine would."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    hold_completions: bool = False  # answer /v1/completions only once the gate opens

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            {
                "path": scope["raw_path"],
                "query": scope["query_string"],
                "headers": dict(scope["headers"]),
                "body": body,
            }
        )
        if scope["path"] == "/v1/completions" and self.hold_completions:
            # As vLLM does for a completion that is not streamed: nothing until it is whole.
            await asyncio.to_thread(self.gate.wait, 30)
        if scope["path"] == "/v1/chat/completions":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            # Hold the rest of the stream until the test has seen the first chunk.
            await asyncio.to_thread(self.gate.wait, 30)
            await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        payload = json.dumps({"object": "list", "data": [{"id": "demo"}]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    # What an engine under an attacker's control might add.
                    (b"set-cookie", b"session=engine"),
                    (b"access-control-allow-origin", b"*"),
                    (b"x-request-id", b"chosen-by-the-engine"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _run_in_thread(server: uvicorn.Server, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: front_server.run(server.serve(**kwargs)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return thread


@dataclass
class Front:
    url: str
    upstream: Upstream
    server: front_server.FrontServer
    state: FrontState
    thread: threading.Thread
    pki_dir: Path
    events: list[dict[str, Any]]
    upstream_server: uvicorn.Server | None = None
    app: FrontApp | None = None
    tls_material: RotatingContext | None = None

    def ctx(self, name: str = "client") -> ssl.SSLContext:
        return client_context(
            self.pki_dir / "ca.pem", self.pki_dir / f"{name}.pem", self.pki_dir / f"{name}-key.pem"
        )


@pytest.fixture()
def make_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Front]]:
    """Start a front (and its recording upstream) with `[front]` overrides; stop at teardown."""
    from runtime import telemetry

    events: list[dict[str, Any]] = []
    real_emit = telemetry.emit
    monkeypatch.setattr(telemetry, "emit", lambda *a, **k: events.append(real_emit(*a, **k)))

    ca = pki.make_ca("test CA")
    ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    pki.server_cert(ca).write(tmp_path / "server.pem", tmp_path / "server-key.pem")
    pki.client_cert(ca, ALLOWED).write(tmp_path / "client.pem", tmp_path / "client-key.pem")
    pki.client_cert(ca, "spiffe://test.local/ns/x/sa/other").write(
        tmp_path / "other.pem", tmp_path / "other-key.pem"
    )
    stops: list[Callable[[], None]] = []

    def start(
        *,
        limits: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        **front_overrides: Any,
    ) -> Front:
        upstream = Upstream()
        sock_path = tmp_path / "engine.sock"
        up_server = uvicorn.Server(
            uvicorn.Config(upstream, uds=str(sock_path), log_config=None, lifespan="off")
        )
        up_thread = _run_in_thread(up_server)
        port = free_port()
        cfg = Config.model_validate(
            {
                "model": {"dir": str(tmp_path), "served_name": "demo", "unsafe_unsigned": True},
                "front": {
                    "listen": f"127.0.0.1:{port}",
                    "allowed_identities": [ALLOWED],
                    "max_body_bytes": 4096,
                    "drain_timeout_s": 10,
                    "tls": {
                        "cert": str(tmp_path / "server.pem"),
                        "key": str(tmp_path / "server-key.pem"),
                        "client_ca": str(tmp_path / "ca.pem"),
                    },
                    **front_overrides,
                },
                "limits": limits or {},
            }
        )
        state = FrontState(engine_ready=True)
        app = FrontApp(
            sock_path,
            state,
            front=cfg.front,
            limits=cfg.limits,
            served_names=("demo",),
            vocab_size=vocab_size,
        )
        listener = front_server.bind(cfg.front)
        tls_material = RotatingContext(cfg.front.tls)
        server = front_server.build_server(cfg.front, app, state, tls_material)
        thread = _run_in_thread(server, sockets=[listener])

        def stop() -> None:
            upstream.gate.set()
            server.should_exit = True
            thread.join(15)
            up_server.should_exit = True
            up_thread.join(15)
            listener.close()

        stops.append(stop)
        return Front(
            f"https://127.0.0.1:{port}",
            upstream,
            server,
            state,
            thread,
            tmp_path,
            events,
            upstream_server=up_server,
            app=app,
            tls_material=tls_material,
        )

    yield start
    for stop in stops:
        stop()


@pytest.fixture()
def front(make_front: Callable[..., Front]) -> Front:
    return make_front()


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


def test_client_leaving_mid_stream_closes_the_engine_connection(front: Front) -> None:
    """vLLM aborts a generation when its connection closes: the front closes it as soon as
    the client goes, instead of letting the engine generate into the void."""
    assert front.upstream_server is not None
    connections = front.upstream_server.server_state.connections
    with (
        httpx.Client(verify=front.ctx(), timeout=20) as client,
        client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
    ):
        lines = response.iter_lines()  # held: a dropped iterator closes the response
        assert next(lines) == "data: 1"
        assert len(connections) == 1
    _until(lambda: not connections, "the engine connection outlived its client")
    [event] = _events(front, "request")
    assert (event["status"], event["outcome"]) == (499, "failed")
    assert event["reason"] == "client_left"


COMPLETION = {"model": "demo", "prompt": "hi", "max_tokens": 4}


@contextlib.contextmanager
def _completion_sent(front: Front, keep_alive: bool = False) -> Iterator[ssl.SSLSocket]:
    """A completion (not streamed) sent on a TLS connection that the test holds; leaving the
    block closes it, as a client that gives up would."""
    body = json.dumps(COMPLETION).encode()
    host, port = front.url.removeprefix("https://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: localhost\r\nconnection: %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (b"keep-alive" if keep_alive else b"close", len(body), body)
        )
        yield tls


def _until(condition: Callable[[], object], message: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_client_leaving_before_the_response_head_closes_the_engine_connection(
    front: Front,
) -> None:
    """A completion that is not streamed sends nothing until it is whole, so a client that
    leaves meanwhile must be noticed from its connection, not from the response: otherwise
    the engine generates the whole completion for nobody."""
    assert front.upstream_server is not None
    connections = front.upstream_server.server_state.connections
    front.upstream.hold_completions = True
    with _completion_sent(front):
        _until(lambda: front.upstream.seen, "the request never reached the engine")
        assert len(connections) == 1  # the engine is "generating"
    _until(lambda: not connections, "the engine connection outlived its client")
    [event] = _events(front, "request")
    assert (event["status"], event["outcome"]) == (499, "failed")
    assert (event["reason"], event["route"]) == ("client_left", "/v1/completions")


def test_client_leaving_with_a_pipelined_request_behind_closes_the_engine_connection(
    front: Front,
) -> None:
    """With a second request pipelined behind the first, uvicorn's current cycle is the
    second, which has not started: the departure must still reach the first."""
    assert front.upstream_server is not None
    connections = front.upstream_server.server_state.connections
    front.upstream.hold_completions = True
    with _completion_sent(front, keep_alive=True) as tls:
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n")
        _until(lambda: front.upstream.seen, "the request never reached the engine")
        time.sleep(0.2)  # the pipelined request is parsed and queued behind the first
    _until(lambda: not connections, "the engine connection outlived its client")
    [event] = _events(front, "request")
    assert (event["status"], event["reason"]) == (499, "client_left")
    assert len(front.upstream.seen) == 1  # the queued request never ran


def test_a_client_that_leaves_while_queued_never_reaches_the_engine(
    make_front: Callable[..., Front],
) -> None:
    front = make_front(max_concurrency=1, max_queue=2, queue_timeout_s=20)
    assert front.app is not None
    admission = front.app.admission
    front.upstream.hold_completions = True
    with _completion_sent(front) as first:  # holds the only slot
        _until(lambda: len(front.upstream.seen) == 1, "the first request never reached the engine")
        with _completion_sent(front):
            _until(lambda: admission.waiting == 1, "the second request was not queued")
        [left] = _events(front, "request")
        assert (left["status"], left["reason"]) == (499, "client_left")
        assert admission.waiting == 0
        front.upstream.gate.set()  # the first completes; the slot is free again
        answer = b""
        while chunk := first.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
    with httpx.Client(verify=front.ctx(), timeout=20) as client:
        assert client.post(f"{front.url}/v1/completions", json=COMPLETION).status_code == 200
    assert len(front.upstream.seen) == 2  # the first and the last: never the one that left
    assert admission.in_flight == 0


def test_request_deadline_answers_504_while_the_engine_holds_a_completion(
    make_front: Callable[..., Front],
) -> None:
    front = make_front(request_deadline_s=1)
    assert front.upstream_server is not None
    connections = front.upstream_server.server_state.connections
    front.upstream.hold_completions = True
    with httpx.Client(verify=front.ctx(), timeout=20) as client:
        response = client.post(f"{front.url}/v1/completions", json=COMPLETION)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    _until(lambda: not connections, "the engine connection outlived the deadline")
    [event] = _events(front, "request")
    assert (event["status"], event["reason"]) == (504, "deadline_exceeded")
    assert front.app is not None and front.app.admission.in_flight == 0


def _events(front: Front, kind: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    """Events of `kind` once at least `count` are in: the server thread emits them just
    after the client has its response."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in front.events if e["event_type"] == kind]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


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
    _until(lambda: sum(e.get("count", 0) for e in front.events) >= 40, "not all counted")
    rejected = _events(front, "tls_handshake_rejected")
    assert sum(e["count"] for e in rejected) == 40 and len(rejected) <= 3
    assert list(rejected[0]["presented"]) == ["URI:spiffe://test.local/ns/x/sa/other"]
    assert front.upstream.seen == []


def test_request_events_carry_identity_and_no_body(front: Front) -> None:
    secret_prompt = "the prompt text must never be logged"
    with httpx.Client(verify=front.ctx()) as client:
        client.post(f"{front.url}/v1/completions", json={"model": "demo", "prompt": secret_prompt})
    raw_request(front.url, front.ctx(), "GET", b"/pause")
    [ok] = _events(front, "request")
    [rejected] = _events(front, "request_rejected")
    assert ok["identity"] == rejected["identity"] == ALLOWED
    assert ok["route"] == "/v1/completions" and ok["status"] == 200
    assert rejected["route"] == "/pause" and rejected["reason"] == "route_not_allowed"
    assert secret_prompt not in json.dumps(front.events)


def test_drain_finishes_open_streams_and_refuses_new_connections(front: Front) -> None:
    with (
        httpx.Client(verify=front.ctx(), timeout=20) as client,
        client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "data: 1"
        front.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does
        assert front.state.draining and not front.state.ready
        deadline = time.monotonic() + 10  # the listener closes on the server's next tick
        while True:
            try:
                with httpx.Client(verify=front.ctx()) as other:
                    other.get(f"{front.url}/healthz")
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "still accepting connections while draining"
            time.sleep(0.1)
        front.upstream.gate.set()
        rest = [line for line in lines if line]
    assert rest == ["data: 2", "data: [DONE]"]
    front.thread.join(10)
    assert not front.thread.is_alive()


def test_an_idle_client_that_does_not_read_does_not_hold_the_drain(
    make_front: Callable[..., Front], caplog: pytest.LogCaptureFixture
) -> None:
    """A kept-alive client between requests (a pooled HTTP client) reads nothing, so it never
    answers the front's TLS close_notify. Found with the openai client: the drain waited for
    that answer (uvloop's 30 s) until front.drain_timeout_s cut it, on every SIGTERM."""
    front = make_front(drain_timeout_s=5)
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive, and now idle
        front.server.handle_exit(signal.SIGTERM, None)
        front.thread.join(15)
        assert not front.thread.is_alive()
    assert "timeout graceful shutdown exceeded" not in caplog.text


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
    [event] = _events(front, "request_rejected")
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


# -- admission and slow clients ----------------------------------------------------------


def test_slowloris_is_disconnected_by_the_header_timeout(make_front: Callable[..., Front]) -> None:
    front = make_front(header_timeout_s=1)
    host, port = front.url.removeprefix("https://").split(":")
    started = time.monotonic()
    with (
        socket.create_connection((host, int(port))) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.2 s: never a complete head
            try:
                tls.sendall(b"X")
                tls.settimeout(0.2)
                if tls.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
                break
    assert closed and time.monotonic() - started < 4
    assert any(e.get("reason") == "header_timeout" for e in _events(front, "request_rejected"))
    assert front.upstream.seen == []
    with httpx.Client(verify=front.ctx()) as client:  # a normal client is unaffected
        assert client.get(f"{front.url}/v1/models").status_code == 200


def _closed_after(raw: socket.socket, send: bytes, limit_s: float) -> float:
    """Send `send` on a plain TCP connection, then wait (at most `limit_s`) for the front to
    close it; the seconds it took."""
    started = time.monotonic()
    raw.settimeout(limit_s)
    if send:
        raw.sendall(send)
    try:
        while raw.recv(4096):  # an alert, if OpenSSL sends one, then the close
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the front held a connection with no finished handshake for {limit_s} s")
    return time.monotonic() - started


def test_a_stalled_tls_handshake_is_closed_by_the_handshake_timeout(
    make_front: Callable[..., Front],
) -> None:
    """Before the handshake nobody is authenticated: a client that connects and sends nothing,
    or the start of a ClientHello and no more, is cut after handshake_timeout_s (uvloop's
    default, which uvicorn keeps, is 60 s). The header and keep-alive timeouts, longer here,
    start only once the handshake is done, so they are not what closes it. While it stalls
    it is counted as a handshake in progress; once cut, it is reported (uvloop is silent)."""
    front = make_front(handshake_timeout_s=1, header_timeout_s=30, keepalive_timeout_s=30)
    assert front.tls_material is not None
    handshakes = front.tls_material.handshakes
    host, port = front.url.removeprefix("https://").split(":")
    # A TLS 1.x handshake record header announcing 512 bytes, and then 5 of them.
    partial_hello = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03"
    for send in (b"", partial_hello):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            _until(lambda: handshakes.in_progress == 1, "the stalled handshake is not counted")
            assert 0.5 < _closed_after(raw, send, limit_s=8) < 4
            _until(lambda: handshakes.in_progress == 0, "the cut handshake is still counted")
    _until(
        lambda: sum(e.get("count", 0) for e in front.events) >= 2,
        "the cut handshakes were not reported",
    )
    cut = _events(front, "tls_handshake_rejected")
    assert {e["reason"] for e in cut} == {"handshake_timeout"}
    assert sum(e["count"] for e in cut) == 2
    assert "front.handshake_timeout_s (1 s)" in cut[0]["detail"]
    assert cut[0]["clients"] == ["127.0.0.1"]
    # A client that connects and closes at once (the kubelet's TCP probe) is no timeout.
    socket.create_connection((host, int(port))).close()
    _until(lambda: handshakes.in_progress == 0, "a closed connection is still counted")
    # A client that completes its handshake is not affected, however long it then waits
    # before its request (within the keep-alive timeout).
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        time.sleep(1.8)
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _read_response(tls) == 200
    # Only that request reached the engine, and nothing else was reported.
    assert [seen["path"] for seen in front.upstream.seen] == [b"/v1/models"]
    assert sum(e["count"] for e in _events(front, "tls_handshake_rejected")) == 2
    assert handshakes.in_progress == 0


def test_handshakes_past_max_handshakes_are_closed_at_accept(
    make_front: Callable[..., Front],
) -> None:
    """Connections that stall in their handshake hold memory before anyone is authenticated.
    At a cap of 2 in progress, a third connection is closed as it is accepted, and reported;
    the two stalled ones are still held, and once one goes, a client is served."""
    front = make_front(max_handshakes=2, handshake_timeout_s=30, keepalive_timeout_s=30)
    assert front.tls_material is not None
    handshakes = front.tls_material.handshakes
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as first,
        socket.create_connection((host, int(port)), timeout=10) as second,
    ):
        _until(lambda: handshakes.in_progress == 2, "the stalled handshakes are not counted")
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                assert _closed_after(extra, b"", limit_s=5) < 2
        assert handshakes.in_progress == 2
        first.close()
        _until(lambda: handshakes.in_progress == 1, "a closed connection is still counted")
        with httpx.Client(verify=front.ctx(), timeout=10) as client:
            assert client.get(f"{front.url}/v1/models").status_code == 200
        second.settimeout(0.2)  # still held: the front has not closed it
        with pytest.raises(TimeoutError):
            second.recv(1)
    _until(
        lambda: sum(e.get("count", 0) for e in _events(front, "tls_handshake_rejected")) >= 3,
        "the refused connections were not all counted",
    )
    refused = _events(front, "tls_handshake_rejected")
    assert {e["reason"] for e in refused} == {"too_many_handshakes"}
    assert sum(e["count"] for e in refused) == 3 and refused[0]["count"] == 1
    assert refused[0]["detail"] == "2 handshakes in progress (front.max_handshakes)"
    assert all(e["clients"] == ["127.0.0.1"] for e in refused)
    assert [seen["path"] for seen in front.upstream.seen] == [b"/v1/models"]


def test_connections_past_max_connections_are_closed_before_http(
    make_front: Callable[..., Front],
) -> None:
    """An allowed client holding `max_connections` open: each further connection is closed
    right after its handshake, its request never read, and the events for them are throttled
    (the first at once, the rest counted). The connections held are not disturbed, and once
    one closes, a new one is served."""
    front = make_front(max_connections=2, keepalive_timeout_s=30)
    host, port = front.url.removeprefix("https://").split(":")
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((host, int(port)), timeout=10)
        return front.ctx().wrap_socket(raw, server_hostname="localhost")

    with connect() as first, connect() as second:
        for tls in (first, second):  # both past the handshake and counted
            tls.sendall(request)
            assert _read_response(tls) == 200
        for _ in range(6):
            with connect() as extra, pytest.raises((ssl.SSLError, ConnectionError)):
                extra.sendall(request)
                if not extra.recv(1):  # TLS 1.3: the verdict comes after the client's Finished
                    raise ConnectionError("closed")
        for tls in (first, second):  # still served
            tls.sendall(request)
            assert _read_response(tls) == 200
    _until(
        lambda: sum(e.get("count", 0) for e in front.events) >= 6,
        "the refused connections were not all counted",
    )
    refused = _events(front, "request_rejected")
    assert {e["reason"] for e in refused} == {"too_many_connections"}
    assert refused[0]["count"] == 1 and sum(e["count"] for e in refused) == 6
    assert len(refused) <= 3 and refused[0]["limit"] == 2
    assert all(e["clients"] == ["127.0.0.1"] for e in refused)
    assert len(front.upstream.seen) == 4  # only the held connections' requests
    _until(lambda: not front.server.server_state.connections, "the held connections stayed")
    with httpx.Client(verify=front.ctx(), timeout=10) as client:
        assert client.get(f"{front.url}/v1/models").status_code == 200


def _read_response(tls: ssl.SSLSocket, headers: dict[bytes, bytes] | None = None) -> int:
    """One whole response from a keep-alive connection (httptools frames it); its status.
    Its headers go into `headers` when given."""
    done: list[bool] = []
    found = {} if headers is None else headers

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            found[name.lower()] = value

        def on_message_complete(self) -> None:
            done.append(True)

    parser = httptools.HttpResponseParser(Callbacks())
    while not done:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole response")
        parser.feed_data(chunk)
    return parser.get_status_code()


def test_a_fresh_connection_idles_as_a_kept_alive_one_does(
    make_front: Callable[..., Front],
) -> None:
    """A gateway may open a connection before it has a request for it. Until the first byte
    that connection is idle, not slow: the keep-alive timeout closes it quietly, and the
    header timeout runs from the first byte, as between requests."""
    front = make_front(header_timeout_s=1, keepalive_timeout_s=3)
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        time.sleep(1.8)  # past the header timeout, within the keep-alive timeout
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _read_response(tls) == 200
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        started = time.monotonic()
        assert tls.recv(1) == b""  # never used: closed by the keep-alive timeout...
        assert 2 < time.monotonic() - started < 6
    time.sleep(0.2)  # ...and neither connection was a slow header
    assert _events(front, "request_rejected", count=0, timeout=0) == []


def test_an_idle_keep_alive_connection_is_not_a_slow_header(
    make_front: Callable[..., Front],
) -> None:
    """Idle time between requests is the keep-alive timeout's business: the header timeout
    starts with the next request's first byte, even when it is the shorter of the two."""
    front = make_front(header_timeout_s=1, keepalive_timeout_s=3)
    host, port = front.url.removeprefix("https://").split(":")
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        assert _read_response(tls) == 200
        time.sleep(1.8)  # idle past the header timeout, within the keep-alive timeout
        tls.sendall(request)
        assert _read_response(tls) == 200
        # A slow head on the same connection is still cut by the header timeout.
        started = time.monotonic()
        tls.sendall(b"GET /v1/models HTTP/1.1\r\n")
        tls.settimeout(0.2)
        closed = False
        while not closed and time.monotonic() - started < 5:
            try:
                tls.sendall(b"X")
                closed = tls.recv(1) == b""
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
        assert closed and time.monotonic() - started < 2.5
    [slow] = _events(front, "request_rejected")
    assert slow["reason"] == "header_timeout"
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        assert _read_response(tls) == 200
        started = time.monotonic()
        assert tls.recv(1) == b""  # closed by the keep-alive timeout...
        assert 2 < time.monotonic() - started < 6
    time.sleep(0.2)  # ...with no slow-header event for it
    assert len(_events(front, "request_rejected")) == 1
    assert len(front.upstream.seen) == 3


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
    [event] = _events(front, "request_rejected")
    assert event["reason"] == "header_too_large" and event["limit_bytes"] == MAX_HEAD_BYTES
    assert front.upstream.seen == []
    # A head well within the cap is served.
    lines = b"".join(b"x-pad-%d: %s\r\n" % (i, pad) for i in range(MAX_HEAD_BYTES // 2000))
    status, _ = _send_head(
        front,
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + lines + b"\r\n",
    )
    assert status == 200 and len(front.upstream.seen) == 1


def test_streams_over_the_concurrency_cap_get_429_and_admitted_ones_complete(
    make_front: Callable[..., Front],
) -> None:
    front = make_front(max_concurrency=4, max_queue=2, queue_timeout_s=20)
    results: list[tuple[int, list[str], str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        with (
            httpx.Client(verify=front.ctx(), timeout=30) as client,
            client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
        ):
            lines = [line for line in response.iter_lines() if line]
            with lock:
                results.append((response.status_code, lines, response.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(50)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(results) < 50 - 6 and time.monotonic() < deadline:  # all but admitted + queued
        time.sleep(0.05)
    front.upstream.gate.set()  # let the admitted streams finish
    for thread in threads:
        thread.join(30)
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(results) == 50 and len(admitted) + len(refused) == 50
    assert len(admitted) == 6  # 4 running + 2 that waited in the queue
    assert all(lines == ["data: 1", "data: 2", "data: [DONE]"] for _s, lines, _r in admitted)
    assert all(retry == "1" for _s, _l, retry in refused)
    assert len(front.upstream.seen) == 6


def test_per_identity_rate_limit(make_front: Callable[..., Front]) -> None:
    front = make_front(rate_limit_rps=0.5, rate_limit_burst=2)
    with httpx.Client(verify=front.ctx()) as client:
        codes = [client.get(f"{front.url}/v1/models") for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].json()["error"]["code"] == "rate_limited"
    assert codes[2].headers["retry-after"] == "2"
    assert len(front.upstream.seen) == 2


def test_request_deadline_ends_a_stream_that_runs_too_long(
    make_front: Callable[..., Front],
) -> None:
    front = make_front(request_deadline_s=1)
    started = time.monotonic()
    with (
        httpx.Client(verify=front.ctx(), timeout=20) as client,
        client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "data: 1"
        with pytest.raises(httpx.RemoteProtocolError):  # cut: the stream never completes
            list(lines)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while not any(e.get("reason") == "deadline_exceeded" for e in front.events):
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("variant", ["expired", "not_yet_valid", "server_auth_only"])
def test_client_certificates_of_the_right_ca_but_unfit_are_refused(
    front: Front, variant: str
) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from runtime.demo.pki import SERVER_AUTH, Issued

    ca_key = front.pki_dir / "ca-key.pem"
    ca = Issued(
        x509.load_pem_x509_certificate((front.pki_dir / "ca.pem").read_bytes()),
        serialization.load_pem_private_key(ca_key.read_bytes(), None),  # type: ignore[arg-type]
    )
    now = dt.datetime.now(dt.UTC)
    kwargs: dict[str, Any] = {
        "expired": {
            "not_before": now - dt.timedelta(days=10),
            "not_after": now - dt.timedelta(days=1),
        },
        "not_yet_valid": {
            "not_before": now + dt.timedelta(days=1),
            "not_after": now + dt.timedelta(days=10),
        },
        "server_auth_only": {"eku": [SERVER_AUTH]},
    }[variant]
    pki.client_cert(ca, ALLOWED, **kwargs).write(
        front.pki_dir / f"{variant}.pem", front.pki_dir / f"{variant}-key.pem"
    )
    with (
        pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError)),
        httpx.Client(verify=front.ctx(variant)) as client,
    ):
        client.get(f"{front.url}/v1/models")
    assert front.upstream.seen == []
    # OpenSSL refused the handshake, before the front saw a connection; it is still reported.
    [event] = _events(front, "tls_handshake_rejected")
    assert event["reason"] == "client_certificate_invalid" and event["count"] == 1
    assert (
        event["detail"]
        == {
            "expired": "certificate has expired",
            "not_yet_valid": "certificate is not yet valid",
            "server_auth_only": "unsuitable certificate purpose",
        }[variant]
    )


def _handshake(front: Front, ctx: ssl.SSLContext) -> None:
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if not tls.recv(1):  # TLS 1.3: the server's verdict arrives after the client's Finished
            raise ConnectionError("closed")


def test_handshakes_openssl_refuses_are_reported_and_counted(front: Front) -> None:
    from runtime import telemetry
    from runtime.front import metrics

    port = free_port()
    collected = metrics.serve(
        f"127.0.0.1:{port}", metrics.Gauges(lambda: 0.0, lambda: 0.0, lambda: 0.0)
    )
    host, front_port = front.url.removeprefix("https://").split(":")
    try:
        for _ in range(3):  # the kubelet's probes: a TCP connect that sends nothing
            socket.create_connection((host, int(front_port))).close()
        no_cert = ssl.create_default_context(cafile=str(front.pki_dir / "ca.pem"))
        for _ in range(10):  # one event at once, the other nine within a second, counted
            _handshake(front, no_cert)
        tls12 = front.ctx()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        _handshake(front, tls12)
        with socket.create_connection((host, int(front_port)), timeout=10) as raw:
            raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw.recv(1)
        deadline = time.monotonic() + 10
        while sum(e.get("count", 0) for e in front.events) < 12:
            assert time.monotonic() < deadline, front.events
            time.sleep(0.05)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        telemetry.unsubscribe(collected.observe)
    events = [e for e in front.events if e["event_type"] == "tls_handshake_rejected"]
    no_certs = [e for e in events if e["reason"] == "no_client_certificate"]
    # The first at once, the rest held back and reported together (10 take well under 1 s).
    assert no_certs[0]["count"] == 1 and sum(e["count"] for e in no_certs) == 10
    assert len(no_certs) <= 3
    assert no_certs[0]["detail"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert all(e["clients"] == ["127.0.0.1"] for e in events)  # who tried, not in the key
    others = {(e["reason"], e["detail"], e["count"]) for e in events if e not in no_certs}
    assert others == {
        ("handshake_failed", "UNSUPPORTED_PROTOCOL", 1),  # TLS 1.2
        ("handshake_failed", "HTTP_REQUEST", 1),  # plain HTTP to the TLS port
    }
    assert 'harness_connections_refused_total{reason="no_client_certificate"} 10.0' in text
    assert 'harness_connections_refused_total{reason="handshake_failed"} 2.0' in text
    assert front.upstream.seen == []


# -- certificate rotation ----------------------------------------------------------------


def _peer_serial(front: Front, name: str = "client") -> int:
    from cryptography import x509

    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port))) as raw,
        front.ctx(name).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _ca(front: Front) -> pki.Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return pki.Issued(
        x509.load_pem_x509_certificate((front.pki_dir / "ca.pem").read_bytes()),
        serialization.load_pem_private_key(  # type: ignore[arg-type]
            (front.pki_dir / "ca-key.pem").read_bytes(), None
        ),
    )


def test_server_certificate_rotation_keeps_open_streams(front: Front) -> None:
    before = _peer_serial(front)
    with (
        httpx.Client(verify=front.ctx(), timeout=20) as client,
        client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "data: 1"
        # Rotate in place, as cert-manager or Vault Agent would.
        fresh = pki.server_cert(_ca(front))
        fresh.write(front.pki_dir / "server.pem.new", front.pki_dir / "server-key.pem.new")
        os.replace(front.pki_dir / "server-key.pem.new", front.pki_dir / "server-key.pem")
        os.replace(front.pki_dir / "server.pem.new", front.pki_dir / "server.pem")
        time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)
        assert _peer_serial(front) == fresh.cert.serial_number != before  # new connections
        front.upstream.gate.set()
        rest = [line for line in lines if line]
    assert rest == ["data: 2", "data: [DONE]"]  # the stream opened before it was not cut
    assert any(e["outcome"] == "ok" for e in _events(front, "tls_reload"))


def test_client_ca_rotation_applies_to_new_connections(front: Front) -> None:
    new_ca = pki.make_ca("rotated client CA")
    pki.client_cert(new_ca, ALLOWED).write(front.pki_dir / "new.pem", front.pki_dir / "new-key.pem")
    # Clients keep verifying the server with the CA that issued its certificate.
    shutil.copy(front.pki_dir / "ca.pem", front.pki_dir / "server-ca.pem")
    ctx_new = client_context(
        front.pki_dir / "server-ca.pem", front.pki_dir / "new.pem", front.pki_dir / "new-key.pem"
    )
    ctx_old = client_context(
        front.pki_dir / "server-ca.pem",
        front.pki_dir / "client.pem",
        front.pki_dir / "client-key.pem",
    )
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=ctx_new) as client:
        client.get(f"{front.url}/v1/models")
    new_ca.write(front.pki_dir / "ca.pem.new")
    os.replace(front.pki_dir / "ca.pem.new", front.pki_dir / "ca.pem")
    time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)
    with httpx.Client(verify=ctx_new) as client:
        assert client.get(f"{front.url}/v1/models").status_code == 200
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=ctx_old) as client:
        client.get(f"{front.url}/v1/models")


def test_session_resumption_cannot_outlive_a_client_ca_rotation(front: Front) -> None:
    """A resumed TLS session skips the client certificate: the front issues no session
    tickets, so a client the rotated CA no longer trusts cannot get back in with one."""
    host, port = front.url.removeprefix("https://").split(":")
    ctx = front.ctx()

    def get(session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession | None, bool]:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert _read_response(tls) == 200
            return tls.session, tls.session_reused

    session, _ = get()
    assert session is not None and not session.has_ticket
    _, reused = get(session)
    assert not reused  # every connection shows its certificate
    pki.make_ca("rotated client CA").write(front.pki_dir / "ca.pem.new")
    os.replace(front.pki_dir / "ca.pem.new", front.pki_dir / "ca.pem")
    time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(session)
    assert len(front.upstream.seen) == 2


def _keep_alive_requests(
    front: Front, ctx: ssl.SSLContext, between: Callable[[], None]
) -> list[tuple[int, bytes | None]]:
    """Two requests on one keep-alive connection, `between()` in between: each one's status
    and `connection` header, and whether the front closed the connection after the second."""
    host, port = front.url.removeprefix("https://").split(":")
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answers: list[tuple[int, bytes | None]] = []
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        for step in (None, between):
            if step is not None:
                step()
            tls.sendall(request)
            headers: dict[bytes, bytes] = {}
            answers.append((_read_response(tls, headers), headers.get(b"connection")))
        assert tls.recv(1) == b""  # closed by the front after that last response
    return answers


def test_a_client_ca_rotation_ends_kept_alive_connections_after_one_request(
    front: Front,
) -> None:
    """An open connection was authenticated by the old client CA: after the rotation it gets
    one more response, marked `connection: close`; its client cannot come back."""

    def rotate() -> None:
        pki.make_ca("rotated client CA").write(front.pki_dir / "ca.pem.new")
        os.replace(front.pki_dir / "ca.pem.new", front.pki_dir / "ca.pem")
        time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)

    assert _keep_alive_requests(front, front.ctx(), rotate) == [(200, None), (200, b"close")]
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=front.ctx()) as client:
        client.get(f"{front.url}/v1/models")
    assert len(front.upstream.seen) == 2


def test_an_expired_client_certificate_ends_its_kept_alive_connection(
    make_front: Callable[..., Front],
) -> None:
    import datetime as dt

    front = make_front(keepalive_timeout_s=30)
    now = dt.datetime.now(dt.UTC)
    expires = now.replace(microsecond=0) + dt.timedelta(seconds=3)
    pki.client_cert(
        _ca(front), ALLOWED, not_before=now - dt.timedelta(minutes=1), not_after=expires
    ).write(front.pki_dir / "brief.pem", front.pki_dir / "brief-key.pem")

    def expire() -> None:
        time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)

    answers = _keep_alive_requests(front, front.ctx("brief"), expire)
    assert answers == [(200, None), (200, b"close")]


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
        _events(front, "request_rejected", 2)
        _events(front, "tls_handshake_rejected")
        with (  # one connection held open, one stalled in its handshake, while scraped
            socket.create_connection((host, int(front_port)), timeout=10) as raw,
            front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
            socket.create_connection((host, int(front_port)), timeout=10),
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert _read_response(tls) == 200
            _until(lambda: len(open_now) == 1, "connections closed earlier are still counted")
            _until(lambda: handshakes.in_progress == 1, "the stalled handshake is not counted")
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
