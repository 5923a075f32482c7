"""The front's ASGI app: an exact route allowlist and a streaming proxy to the engine's socket.

Routes are matched on the raw request target exactly as received (`scope["raw_path"]`), never
on a decoded or normalised form: `/%761/models`, `/v1/../pause` and `//v1/models` are unknown
routes, and the engine never sees them. The upstream path sent is our constant, not the
client's bytes, and the query string is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import telemetry
from runtime.config import FrontSection, LimitsSection
from runtime.front import limits as request_limits
from runtime.front.admission import Admission, retry_after_header
from runtime.front.limits import Rejected
from runtime.front.upstream import EngineBrokeOff, EngineClient, EngineUnavailable, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Route -> allowed methods. Everything else is 404 from the front.
FORWARDED: dict[bytes, frozenset[str]] = {
    b"/v1/models": frozenset({"GET"}),
    b"/v1/completions": frozenset({"POST"}),
    b"/v1/chat/completions": frozenset({"POST"}),
}
LOCAL = frozenset({b"/healthz", b"/readyz"})

# Only these request headers reach the engine; nothing the client sends about hosts,
# forwarding, auth or encodings does.
REQUEST_HEADERS = frozenset({b"content-type", b"accept"})
# Only these response headers reach the client: the engine is not trusted to set cookies,
# CORS, redirects or anything else on the gateway's side. Framing (chunked or not) and the
# connection are the front's own business.
RESPONSE_HEADERS = frozenset({b"content-type", b"content-length"})
IDENTITY_KEY = "harness.identity"
WATCH_KEY = "harness.watch"


class RequestWatch:
    """Ends a request early, saying why: its deadline passed, or its client left (the front's
    protocol calls `client_left` when the connection is lost). It cancels the request's task,
    which reaches the request wherever it waits: for its body, a slot, the engine's response
    head (a completion that is not streamed sends nothing until it is whole) or the stream.
    One timer per request and no extra tasks: on a small node, the front's CPU time is taken
    from the engine's."""

    __slots__ = ("_task", "_timer", "reason")

    def __init__(self, deadline_s: float) -> None:
        self._task = asyncio.current_task()
        self.reason: str | None = None
        self._timer = asyncio.get_running_loop().call_later(
            deadline_s, self._end, "deadline_exceeded"
        )

    def client_left(self) -> None:
        self._end("client_left")

    def _end(self, reason: str) -> None:
        if self._task is not None and self.reason is None:
            self.reason = reason
            self._task.cancel()

    def disarm(self) -> None:
        """The request is answered: from here on nothing ends it."""
        self._timer.cancel()
        self._task = None


@dataclass
class FrontState:
    """Shared with the supervisor: readiness flips to false while draining."""

    engine_ready: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.engine_ready and not self.draining


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


async def _respond(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()
) -> None:  # type: ignore[assignment]
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class FrontApp:
    def __init__(
        self,
        engine_socket: Path,
        state: FrontState,
        *,
        front: FrontSection,
        limits: LimitsSection,
        served_name: str,
        admission: Admission | None = None,
    ) -> None:
        self.engine_socket = engine_socket
        self.state = state
        self.max_body_bytes = front.max_body_bytes
        self.deadline_s = front.request_deadline_s
        self.limits = limits
        self.served_name = served_name
        self.admission = admission or Admission.from_config(front)
        self.client: EngineClient | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = EngineClient(str(self.engine_socket))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests ------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not a route we serve
            return
        started = time.perf_counter()
        request_id = os.urandom(16).hex()
        raw_path = scope.get("raw_path")
        identity = scope.get(IDENTITY_KEY)
        audit: dict[str, Any] = {
            "request_id": request_id,
            "identity": identity,
            "method": scope["method"],
        }
        route = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else None
        responded = False

        async def tracked_send(message: Message) -> None:
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        def audit_event(kind: str, outcome: telemetry.Outcome, status: int, **extra: Any) -> None:
            latency_ms = round((time.perf_counter() - started) * 1000, 3)
            telemetry.emit(kind, outcome, **audit, status=status, latency_ms=latency_ms, **extra)

        watch = scope[WATCH_KEY] = RequestWatch(self.deadline_s)
        try:
            try:
                status = await self._handle(scope, receive, tracked_send, raw_path, audit)
            finally:
                watch.disarm()
        except asyncio.CancelledError:
            if watch.reason is None:
                raise  # not this request's end: the server is stopping
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            if watch.reason == "client_left":
                audit_event("request", "failed", 499, route=route, reason="client_left")
                return
            # The deadline covers the body, the wait for a slot and the whole generation.
            if not responded:
                await _respond(
                    send, 504, error_body(504, "The request took too long", "deadline_exceeded")
                )
            audit_event("request", "failed", 504, route=route, reason="deadline_exceeded")
            return
        except Rejected as rej:
            extra = []
            if rej.retry_after is not None:
                extra.append((b"retry-after", retry_after_header(rej.retry_after)))
            await _respond(
                send, rej.status, error_body(rej.status, rej.message, rej.code, rej.param), extra
            )
            failed = rej.status >= 500
            audit_event(
                "request" if failed else "request_rejected",
                "failed" if failed else "blocked",
                rej.status,
                route=_loggable(route),  # may be an attacker-chosen target
                reason=rej.code,
            )
            return
        if status is not None:
            audit_event("request", "allowed" if status < 400 else "failed", status, route=route)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, raw_path: Any, audit: dict[str, Any]
    ) -> int | None:
        # Exact match on the raw target; the decoded `path` must agree (defence in depth).
        if scope.get("root_path") or not isinstance(raw_path, bytes):
            raise Rejected(404, "Not found", "route_not_allowed")
        if raw_path in LOCAL and scope["path"].encode() == raw_path:
            await self._local(raw_path, send)
            return None
        methods = FORWARDED.get(raw_path)
        if methods is None or scope["path"].encode() != raw_path:
            raise Rejected(404, "Not found", "route_not_allowed")
        if scope["method"] not in methods:
            raise Rejected(405, f"{scope['method']} is not allowed here", "method_not_allowed")
        if self.state.draining:
            raise Rejected(503, "The server is shutting down", "draining")
        body = await self._read_body(scope, receive)
        if scope["method"] == "POST":
            checked = request_limits.check(
                raw_path, _header(scope, b"content-type"), body, self.limits, self.served_name
            )
            audit.update(
                stream=checked.stream,
                tokens_asked=checked.tokens_asked,
                tokens_allowed=checked.tokens_allowed,
            )
            body = checked.body
        self.admission.check_rate(audit["identity"])
        await self.admission.acquire()
        try:
            return await self._forward(scope, receive, send, raw_path, body, audit["request_id"])
        finally:
            self.admission.release()

    async def _local(self, raw_path: bytes, send: Send) -> None:
        if raw_path == b"/healthz":
            await _respond(send, 200, b'{"status":"ok"}')
        elif self.state.ready:
            await _respond(send, 200, b'{"status":"ready"}')
        else:
            status = "draining" if self.state.draining else "starting"
            await _respond(send, 503, json.dumps({"status": status}).encode())

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                raise Rejected(413, f"Request body is larger than {limit} bytes", "body_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Not reached in the front: its protocol tells the watch before uvicorn marks
                # the request disconnected. Elsewhere (the app alone), nothing to answer.
                raise asyncio.CancelledError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # counted while it streams in, not after
                raise Rejected(413, f"Request body is larger than {limit} bytes", "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, route: bytes, body: bytes, request_id: str
    ) -> int:
        assert self.client is not None, "lifespan startup did not run"
        headers = [(k, v) for k, v in scope["headers"] if k in REQUEST_HEADERS]
        if body:  # the checked body is always JSON, whatever the client declared
            headers = [(k, v) for k, v in headers if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        headers.append((b"x-request-id", request_id.encode()))
        try:
            upstream = await self.client.request(scope["method"], route.decode(), headers, body)
        except EngineUnavailable:
            raise Rejected(502, "The model engine is unavailable", "engine_unavailable") from None
        try:
            await self._relay(upstream, send, request_id)
        except EngineBrokeOff:
            # The engine broke off mid-response; the client sees a truncated stream.
            return 502
        finally:
            # Also when the client left or the deadline passed (the watch cancels this task):
            # closing the engine connection makes vLLM abort the request instead of
            # generating into the void.
            upstream.close()
        return upstream.status_code

    async def _relay(self, upstream: Response, send: Send, request_id: str) -> None:
        headers = [(k, v) for k, v in upstream.headers if k in RESPONSE_HEADERS]
        headers.append((b"x-request-id", request_id.encode()))
        await send(
            {"type": "http.response.start", "status": upstream.status_code, "headers": headers}
        )
        # Chunk by chunk: a server-sent-event stream is never buffered whole.
        async for chunk, more in upstream.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": more})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _loggable(route: str | None) -> str | None:
    """Rejected targets are attacker-chosen: log a bounded, printable form."""
    if route is None:
        return None
    return route[:256].encode("ascii", "backslashreplace").decode()
