"""Three fronts that do less than harness's, for `front_bench.py --baselines`: what any mTLS
front on this machine costs, measured in the same run as harness's, so that the front's
added latency can be split into the floor, the HTTP server and harness's own controls.

    python benchmarks/baseline_fronts.py KIND PORT ENGINE_SOCKET CERT KEY CLIENT_CA

`relay`: a bare mTLS byte relay on uvloop (TLS 1.3, client certificate required, as the
front's context is) with one engine connection per client connection; no HTTP parsing, no
checks: the least a Python front in front of the engine's socket can do.
`httptools`: HTTP/1.1 parsed by httptools (llhttp, the parser under uvicorn) in a plain
asyncio protocol, forwarding through harness's engine client: an HTTP-aware front without
uvicorn's ASGI layer, to show what that layer costs.
`uvicorn`: uvicorn (httptools, uvloop) with the same TLS, forwarding each request to the
engine through harness's own engine client (runtime/front/upstream.py); no identity check,
no limits, no admission, no audit events.
None is a front to deploy: they check nothing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from typing import Any

import httptools
import uvicorn
import uvloop

from runtime.front.upstream import EngineClient


def tls_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(client_ca)
    return ctx


class _ToClient(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Relay(asyncio.Protocol):
    """One client connection: bytes in either direction go through as they come."""

    def __init__(self, engine_socket: str) -> None:
        self.engine_socket = engine_socket
        self.engine: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what arrived before the engine connection was open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client: asyncio.Transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        engine, _ = await loop.create_unix_connection(
            lambda: _ToClient(self.client), self.engine_socket
        )
        self.engine = engine  # type: ignore[assignment]
        if self.client.is_closing():  # the client left while the engine connection opened
            engine.close()
            return
        for data in self.early:
            engine.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.engine is None:
            self.early.append(data)
        else:
            self.engine.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.engine is not None:
            self.engine.close()


async def relay(port: int, engine_socket: str, ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Relay(engine_socket), "127.0.0.1", port, ssl=ctx)
    await server.serve_forever()


def uvicorn_app(engine_socket: str) -> Any:
    client = EngineClient(engine_socket)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = []
        while True:
            message = await receive()
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k == b"content-type"]
        upstream = await client.request(scope["method"], scope["path"], headers, b"".join(body))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": [(k, v) for k, v in upstream.headers if k == b"content-type"],
                }
            )
            async for chunk, more in upstream.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
        finally:
            upstream.close()

    return app


class _HttpFront(asyncio.Protocol):
    """HTTP/1.1 on httptools' parser with no ASGI in between: one task per request that
    forwards it through the engine client and writes the response itself (chunked when the
    engine's is). One request at a time per connection, as the load generator sends them."""

    def __init__(self, client: EngineClient) -> None:
        self.engine = client
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.content_type = b"application/json"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        asyncio.get_running_loop().create_task(self._forward(method, b"".join(self.body)))

    async def _forward(self, method: str, body: bytes) -> None:
        headers = [(b"content-type", self.content_type)]
        upstream = await self.engine.request(method, "/v1/completions", headers, body)
        try:
            chunked = not any(k == b"content-length" for k, _ in upstream.headers)
            head = [b"HTTP/1.1 %d OK\r\n" % upstream.status_code]
            head += [b"%s: %s\r\n" % (k, v) for k, v in upstream.headers if k in _KEPT]
            head.append(b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n")
            self.transport.write(b"".join(head))
            async for chunk, more in upstream.chunks():
                if not chunked:
                    self.transport.write(chunk)
                    continue
                framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b""
                self.transport.write(framed if more else framed + b"0\r\n\r\n")
        finally:
            upstream.close()


_KEPT = frozenset({b"content-type", b"content-length"})


async def serve_httptools(port: int, engine_socket: str, ctx: ssl.SSLContext) -> None:
    client = EngineClient(engine_socket)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HttpFront(client), "127.0.0.1", port, ssl=ctx)
    for sock in server.sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await server.serve_forever()


async def serve_uvicorn(port: int, engine_socket: str, ctx: ssl.SSLContext) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the front's listener
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        uvicorn_app(engine_socket),
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        ws="none",
        ssl_context_factory=lambda _config, _default: ctx,
    )
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    kind, port, engine_socket, cert, key, client_ca = sys.argv[1:7]
    ctx = tls_context(cert, key, client_ca)
    serve = {"relay": relay, "httptools": serve_httptools, "uvicorn": serve_uvicorn}[kind]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(int(port), engine_socket, ctx))


if __name__ == "__main__":
    main()
