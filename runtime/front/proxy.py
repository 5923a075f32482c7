"""The front's ASGI app: an exact route allowlist and a streaming proxy to the engine's socket.

Routes are matched on the raw request target exactly as received (`scope["raw_path"]`), never
on a decoded or normalised form: `/%761/models`, `/v1/../pause` and `//v1/models` are unknown
routes, and the engine never sees them. The upstream path sent is our constant, not the
client's bytes, and the query string is dropped.

Why one module of this size: it is the path of every request (route, admission, body budget,
relay to the engine, audit event); read top to bottom, it is what a request goes through.
"""

from __future__ import annotations

import asyncio
import ctypes
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
LOCAL_METHODS = frozenset({"GET", "HEAD"})

# Only these request headers reach the engine; nothing the client sends about hosts,
# forwarding, auth or encodings does.
REQUEST_HEADERS = frozenset({b"content-type", b"accept"})
# Only these response headers reach the client: the engine is not trusted to set cookies,
# CORS, redirects or anything else on the gateway's side. Framing (chunked or not) and the
# connection are the front's own business.
RESPONSE_HEADERS = frozenset({b"content-type", b"content-length"})
IDENTITY_KEY = "harness.identity"
WATCH_KEY = "harness.watch"
# Set by the front's protocol: a refusal of the request's framing found while the app reads
# its body (a Rejected, for the app to raise), and for a request with a body, what to call
# when answering before the body is whole (the connection then ends: `connection: close`).
REFUSED_KEY = "harness.refused"
LAST_RESPONSE_KEY = "harness.last_response"
BODY_KEY = "harness.body"  # the request's share of the body budget
# Set by the front's protocol once the request's body is parsed whole: the app's first
# receive() then returns it at once, with no timer to arm.
BODY_WHOLE_KEY = "harness.body_whole"
RESPONDED_KEY = "harness.responded"  # a response's head is out: a deadline cannot answer 504
# The minimum body rate (front.min_body_bytes_per_s) is an average from the body's start,
# after this long: a body's first bytes may trail its head by a round trip or two.
BODY_RATE_GRACE_S = 1.0
# After request bodies held at least this much at once, the memory freed when they (and
# their connections' TLS buffers) are gone is handed back to the system with malloc_trim, a
# second after the last one, at most every TRIM_EVERY_S: glibc keeps it otherwise (a flood
# of 100 slow 1 MB bodies left the RSS 115 MB up), and the front shares the pod's
# memory limit with the engine. A trim takes ~0.1 ms, ~10 ms after a 200 MB flood.
TRIM_AFTER_BYTES = 1 << 20
TRIM_EVERY_S = 10.0


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


class BodyBudget:
    """Request body bytes held by the front across all connections, each from its arrival
    until the body is handed to the engine or its request ends in any way (refused, timed
    out, its client gone). Without it, slow clients each holding an unfinished body could
    take the front's memory (150 connections with ~1 MB each took it from 208 to 360 MB).
    Past front.max_buffered_body_bytes a request is refused: 503 with Retry-After."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._peak = 0  # the most held at once since memory was last handed back
        self._trim: asyncio.TimerHandle | None = None
        self._trimmed_at = -TRIM_EVERY_S

    def _released(self, size: int) -> None:
        self.held -= size
        if not self.held and self._peak >= TRIM_AFTER_BYTES and self._trim is None:
            # A second later: the requests and connections that held the bodies are gone.
            loop = asyncio.get_running_loop()
            delay = max(1.0, self._trimmed_at + TRIM_EVERY_S - loop.time())
            self._trim = loop.call_later(delay, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        if self.held:  # busy again: once they are gone
            return
        self._peak = 0
        self._trimmed_at = asyncio.get_running_loop().time()
        if _malloc_trim is not None:
            _malloc_trim(0)


class BodyHold:
    """One request's share of the BodyBudget; `release` gives it all back (once). The app
    releases it when the body goes to the engine, and whatever is left when the request ends
    in any way (FrontApp.__call__)."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.size = 0

    def take(self, size: int) -> bool:
        budget = self._budget
        if budget.held + size > budget.limit:
            return False
        self.size += size
        budget.held += size
        budget._peak = max(budget._peak, budget.held)
        return True

    def release(self) -> None:
        if self.size:
            size, self.size = self.size, 0
            self._budget._released(size)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, found once (before the front's sandbox); None elsewhere (musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (AttributeError, OSError):
        return None


_malloc_trim = _libc_malloc_trim()


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
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    scope: Scope | None = None,
) -> None:
    """The whole response; with `scope`, marked as started once its head is written."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    if scope is not None:
        scope[RESPONDED_KEY] = True
    await send({"type": "http.response.body", "body": body, "more_body": False})


class FrontApp:
    def __init__(
        self,
        engine_socket: Path,
        state: FrontState,
        *,
        front: FrontSection,
        limits: LimitsSection,
        served_names: tuple[str, ...],
        admission: Admission | None = None,
        vocab_size: int | None = None,
        tool_parser: bool = False,
    ) -> None:
        self.engine_socket = engine_socket
        self.state = state
        self.max_body_bytes = front.max_body_bytes
        self.deadline_s = front.request_deadline_s
        self.limits = limits
        self.served_names = served_names
        self.vocab_size = vocab_size  # token ids in requests must be below it
        self.tool_parser = tool_parser  # the engine parses tool calls out of the text
        self.body_timeout_s = front.body_timeout_s
        self.min_body_rate = front.min_body_bytes_per_s
        self.bodies = BodyBudget(front.max_buffered_body_bytes)
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

        def audit_event(kind: str, outcome: telemetry.Outcome, status: int, **extra: Any) -> None:
            latency_ms = round((time.perf_counter() - started) * 1000, 3)
            telemetry.emit(kind, outcome, **audit, status=status, latency_ms=latency_ms, **extra)

        watch = scope[WATCH_KEY] = RequestWatch(self.deadline_s)
        try:
            try:
                status = await self._handle(scope, receive, send, raw_path, audit)
            finally:
                watch.disarm()
                hold = scope.get(BODY_KEY)
                if hold is not None:  # however the request ended, its body is gone
                    hold.release()
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
            if not scope.get(RESPONDED_KEY):
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
        refused = scope.get(REFUSED_KEY)
        if refused is not None:  # the protocol refused the body's framing before we ran
            raise refused
        # Exact match on the raw target; the decoded `path` must agree (defence in depth).
        if scope.get("root_path") or not isinstance(raw_path, bytes):
            raise Rejected(404, "Not found", "route_not_allowed")
        if raw_path in LOCAL and scope["path"].encode() == raw_path:
            if scope["method"] not in LOCAL_METHODS:
                raise Rejected(405, f"{scope['method']} is not allowed here", "method_not_allowed")
            _no_body(scope)
            await self._local(scope, raw_path, send)
            return None
        methods = FORWARDED.get(raw_path)
        if methods is None or scope["path"].encode() != raw_path:
            raise Rejected(404, "Not found", "route_not_allowed")
        if scope["method"] not in methods:
            raise Rejected(405, f"{scope['method']} is not allowed here", "method_not_allowed")
        if scope["method"] == "GET":
            _no_body(scope)
        if self.state.draining:
            raise Rejected(503, "The server is shutting down", "draining")
        body = await self._read_body(scope, receive)
        if scope["method"] == "POST":
            checked = request_limits.check(
                raw_path,
                _header(scope, b"content-type"),
                body,
                self.limits,
                self.served_names,
                self.vocab_size,
                self.tool_parser,
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

    async def _local(self, scope: Scope, raw_path: bytes, send: Send) -> None:
        if raw_path == b"/healthz":
            await _respond(send, 200, b'{"status":"ok"}', scope=scope)
        elif self.state.ready:
            await _respond(send, 200, b'{"status":"ready"}', scope=scope)
        else:
            status = "draining" if self.state.draining else "starting"
            await _respond(send, 503, json.dumps({"status": status}).encode(), scope=scope)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        try:
            return await self._read_whole_body(scope, receive)
        except BaseException:
            _last_response(scope)  # what is left of the body is not read
            raise

    async def _read_whole_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                raise Rejected(413, f"Request body is larger than {limit} bytes", "body_too_large")
        hold = scope[BODY_KEY] = BodyHold(self.bodies)
        if scope.get(BODY_WHOLE_KEY):  # the usual case: it came with its head, nothing to time
            body, more = self._take(scope, await receive(), hold, 0)
            if not more:
                return body
            chunks, size = [body], len(body)  # (whole means none follows; any more is timed)
        else:
            chunks, size = [], 0
        # Slow bodies: the whole body within front.body_timeout_s, and (past a short grace)
        # at front.min_body_bytes_per_s on average; each part that arrives moves the deadline.
        now = asyncio.get_running_loop().time()
        hard, rated = now + self.body_timeout_s, now + BODY_RATE_GRACE_S
        try:
            async with asyncio.timeout_at(self._body_due(hard, rated, size)) as timer:
                while True:
                    chunk, more = self._take(scope, await receive(), hold, size)
                    size += len(chunk)
                    chunks.append(chunk)
                    if not more:
                        return b"".join(chunks)
                    timer.reschedule(self._body_due(hard, rated, size))
        except TimeoutError:
            if self._body_due(hard, rated, size) < hard:
                raise Rejected(408, "The request body came too slowly", "body_too_slow") from None
            raise Rejected(408, "The request body took too long", "body_timeout") from None

    def _take(
        self, scope: Scope, message: Message, hold: BodyHold, size: int
    ) -> tuple[bytes, bool]:
        """One part of the body (`size` bytes came before it), counted against the body's
        limit and the budget: (its bytes, whether more follow)."""
        refused = scope.get(REFUSED_KEY)
        if refused is not None:  # the protocol refused the body's framing
            raise refused
        if message["type"] == "http.disconnect":
            # Not reached in the front: its protocol tells the watch before uvicorn marks the
            # request disconnected. Elsewhere (the app alone), nothing to answer.
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        limit = self.max_body_bytes
        if size + len(chunk) > limit:  # counted while it streams in, not after
            raise Rejected(413, f"Request body is larger than {limit} bytes", "body_too_large")
        if chunk and not hold.take(len(chunk)):
            raise Rejected(
                503,
                "The server holds too many request bodies at once; retry shortly",
                "body_buffer_full",
                retry_after=1,
            )
        return chunk, message.get("more_body", False)

    def _body_due(self, hard: float, rated: float, size: int) -> float:
        """When a body of which `size` bytes are in is too late (loop time)."""
        if self.min_body_rate <= 0:
            return hard
        return min(hard, rated + size / self.min_body_rate)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, route: bytes, body: bytes, request_id: str
    ) -> int:
        assert self.client is not None, "lifespan startup did not run"
        first: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in REQUEST_HEADERS:  # the first of each: a repeated `accept` goes once
                first.setdefault(name, value)
        if body:  # the checked body is always JSON, whatever the client declared
            first[b"content-type"] = b"application/json"
        headers = [*first.items(), (b"x-request-id", request_id.encode())]
        hold = scope.get(BODY_KEY)
        if hold is not None:  # handed to the engine: no longer the body budget's
            hold.release()
        try:
            upstream = await self.client.request(scope["method"], route.decode(), headers, body)
        except EngineUnavailable:
            raise Rejected(502, "The model engine is unavailable", "engine_unavailable") from None
        try:
            await self._relay(upstream, send, request_id, scope)
        except EngineBrokeOff:
            # The engine broke off mid-response; the client sees a truncated stream.
            return 502
        finally:
            # Also when the client left or the deadline passed (the watch cancels this task):
            # closing the engine connection makes vLLM abort the request instead of
            # generating into the void.
            upstream.close()
        return upstream.status_code

    async def _relay(self, upstream: Response, send: Send, request_id: str, scope: Scope) -> None:
        headers = [(k, v) for k, v in upstream.headers if k in RESPONSE_HEADERS]
        headers.append((b"x-request-id", request_id.encode()))
        await send(
            {"type": "http.response.start", "status": upstream.status_code, "headers": headers}
        )
        # Its head is written (send waits only before writing): a deadline now cuts the
        # response instead of answering 504.
        scope[RESPONDED_KEY] = True
        # Chunk by chunk: a server-sent-event stream is never buffered whole.
        async for chunk, more in upstream.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": more})


def _no_body(scope: Scope) -> None:
    """GET and HEAD carry no body: one was forwarded, relabelled application/json, and
    intermediaries disagree on whether a GET has one. The answer is the connection's last."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            _last_response(scope)
            method = scope["method"]
            raise Rejected(400, f"A {method} request carries no body", "body_not_allowed")


def _last_response(scope: Scope) -> None:
    last = scope.get(LAST_RESPONSE_KEY)
    if last is not None:
        last()


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
