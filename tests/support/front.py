"""The front in-process, for real: uvicorn + our TLS context + our identity protocol, in front
of a real HTTP server on a Unix socket that records what reaches it (`Upstream`). No vLLM.
`make_front` starts one with `[front]` overrides; the integration tier's conftest provides it
and `front` (the defaults) as fixtures."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn

from runtime.config import Config
from runtime.demo import pki
from runtime.front import server as front_server
from runtime.front.proxy import FrontApp, FrontState
from runtime.front.tls import RotatingContext
from tests.support import client_context, free_port

ALLOWED = "spiffe://test.local/ns/gateway/sa/ai-gateway"
CHAT = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "demo", "prompt": "hi", "max_tokens": 4}


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
            # Both at once: each uvicorn server takes ~0.2 s of its own ticks to stop, and
            # every test of the tier starts and stops a pair.
            upstream.gate.set()
            server.should_exit = up_server.should_exit = True
            thread.join(15)
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


def wait_until(condition: Callable[[], object], message: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def audit_events(
    front: Front, kind: str, count: int = 1, timeout: float = 10
) -> list[dict[str, Any]]:
    """Events of `kind` once at least `count` are in: the server thread emits them just
    after the client has its response."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in front.events if e["event_type"] == kind]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def read_response(
    tls: ssl.SSLSocket, head_only: bool = False
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One whole response from a kept-alive connection (httptools frames it; `head_only`: the
    answer to a HEAD): its status, headers (lowercased) and body."""
    done: list[bool] = []
    headers: dict[bytes, bytes] = {}
    body = bytearray()

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            headers[name.lower()] = value

        def on_body(self, chunk: bytes) -> None:
            body.extend(chunk)

        def on_message_complete(self) -> None:
            done.append(True)

        def on_headers_complete(self) -> None:
            if head_only:
                done.append(True)

    parser = httptools.HttpResponseParser(Callbacks())
    while not done:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole response")
        parser.feed_data(chunk)
    return parser.get_status_code(), headers, bytes(body)


def read_status(tls: ssl.SSLSocket, headers: dict[bytes, bytes] | None = None) -> int:
    """The status of one whole response; its headers go into `headers` when given."""
    status, found, _body = read_response(tls)
    if headers is not None:
        headers.update(found)
    return status


def load_ca(pki_dir: Path) -> pki.Issued:
    """The test CA that `make_front` wrote, to issue more certificates from."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return pki.Issued(
        x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()),
        serialization.load_pem_private_key(  # type: ignore[arg-type]
            (pki_dir / "ca-key.pem").read_bytes(), None
        ),
    )
