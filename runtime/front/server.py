"""The front's server: uvicorn on a pre-bound socket, with our TLS context and a protocol
that checks the client's identity right after the handshake, before any HTTP is read.

uvicorn does not hand the peer certificate to the app, and headers are client-controlled;
so the identity is taken from the TLS connection itself and attached to each request's scope.

Why one module of this size: everything that reaches into uvicorn's and uvloop's internals
(the httptools protocol it extends, the loop and its SSL protocol, the server state) is here
and nowhere else, so that an upgrade of either is reviewed in one file; their versions are
pinned to the tested range and checked when the front is prepared (`check_versions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import resource
import signal
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import httptools
import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState
from uvloop.loop import SSLProtocol as UvloopSSLProtocol  # what its TLS servers use

from runtime import telemetry
from runtime.config import FrontSection, split_listen
from runtime.errors import ConfigError
from runtime.front import framing
from runtime.front.proxy import (
    BODY_WHOLE_KEY,
    IDENTITY_KEY,
    LAST_RESPONSE_KEY,
    REFUSED_KEY,
    WATCH_KEY,
    FrontApp,
    FrontState,
)
from runtime.front.tls import (
    Handshakes,
    RotatingContext,
    client_certificate_unfit,
    peer_identities,
)
from runtime.identity import match_identity

T = TypeVar("T")

# The front's protocol and TLS handshakes are built on uvicorn's and uvloop's internals (above):
# the releases they were written and tested against, as pyproject.toml pins them.
TESTED_RELEASES = {"uvicorn": "0.55", "uvloop": "0.23", "httptools": "0.9"}


def check_versions(installed: Callable[[str], str] = importlib.metadata.version) -> None:
    """Refuse to serve on other releases of them (exit 2): their internals change without
    notice, and a front that fails in a new way on a client's request is worse than none."""
    wrong = {}
    for name, release in TESTED_RELEASES.items():
        try:
            found = installed(name)
        except importlib.metadata.PackageNotFoundError:
            found = "none"
        if found.split(".")[:2] != release.split("."):
            wrong[name] = found
    if wrong:
        listed = ", ".join(f"{n} {v} (tested: {TESTED_RELEASES[n]}.x)" for n, v in wrong.items())
        raise ConfigError(
            f"the front is built on these libraries' internals and was tested with other "
            f"releases: {listed}",
            fix="install harness into a venv of its own, so that pip resolves the ranges its "
            "pyproject.toml pins (`make install` in a checkout, or `pip install .`); do not "
            "upgrade these three by hand",
        )


# The request line and headers of one request, in bytes. uvicorn's httptools protocol has no
# limit of its own: a client could make the front hold an unbounded head in memory.
MAX_HEAD_BYTES = 64 * 1024


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the front on uvloop: its transports and TLS records are handled in C, which cuts
    the front's CPU per request (`benchmarks/front_bench.py --engine stand-in`)."""
    with asyncio.Runner(loop_factory=HandshakeBoundLoop) as runner:
        return runner.run(main)


class HandshakeBoundLoop(uvloop.Loop):
    """uvloop, running the TLS handshakes of the servers it starts itself (TlsHandshake).
    uvicorn hands create_server an SSL context and no handshake timeout, and then uvloop
    would bound each handshake by its default of 60 s and nothing else: anyone who can reach
    the port could hold sockets and SSL objects without ever showing a certificate, and a
    failed or stalled handshake would say nothing about who tried."""

    handshakes: Handshakes | None = None  # FrontServer.startup sets it

    async def create_server(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.Protocol], *args: Any, **kwargs: Any
    ) -> asyncio.Server:
        ctx, handshakes = kwargs.get("ssl"), self.handshakes
        if ctx is not None and handshakes is not None:
            kwargs["ssl"] = None
            kwargs.pop("ssl_handshake_timeout", None)
            app_factory = protocol_factory

            def protocol_factory() -> asyncio.Protocol:
                return TlsHandshake(self, app_factory, ctx, handshakes)

        return await super().create_server(protocol_factory, *args, **kwargs)


# How long a connection the front closes waits for the client's TLS close_notify (uvloop's
# default: 30 s). A kept-alive client between requests reads nothing and never answers: at 30 s
# it held every drain until front.drain_timeout_s, and any close holds the socket and its TLS
# buffers until then.
TLS_CLOSE_TIMEOUT_S = 2.0


class TlsHandshake(asyncio.Protocol):
    """An accepted connection, until its TLS handshake ends. It is what uvloop's own TLS
    server does on accept (its SSLProtocol, in C, made the transport's protocol before the
    first byte is read; the HTTP protocol sees the connection once the handshake is done), and
    in addition: past front.max_handshakes, or front.max_handshakes_per_client from its
    address, the connection is closed at once, a handshake is cut after
    front.handshake_timeout_s, and those and the handshakes OpenSSL refuses are reported with
    the client's address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_factory: Callable[[], asyncio.Protocol],
        ctx: ssl.SSLContext,
        handshakes: Handshakes,
    ) -> None:
        self.loop, self.app_factory, self.ctx, self.handshakes = loop, app_factory, ctx, handshakes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if peer else None
        if not self.handshakes.begin(client):
            transport.abort()  # type: ignore[attr-defined]
            return
        done = self.loop.create_future()
        tls = UvloopSSLProtocol(
            self.loop,
            self.app_factory(),
            self.ctx,
            done,
            server_side=True,
            ssl_handshake_timeout=self.handshakes.timeout_s,
            ssl_shutdown_timeout=TLS_CLOSE_TIMEOUT_S,
        )
        # Now, not later: uvloop starts reading when this returns, and the ClientHello must
        # reach the SSL protocol.
        transport.set_protocol(tls)
        tls.connection_made(transport)
        done.add_done_callback(functools.partial(self._ended, transport, client))

    def _ended(
        self, transport: asyncio.BaseTransport, client: str | None, done: asyncio.Future[None]
    ) -> None:
        self.handshakes.end(client)
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            return  # the HTTP protocol has the connection (or it closed as the handshake ended)
        transport.abort()  # type: ignore[attr-defined]
        if isinstance(exc, ssl.SSLError):
            self.handshakes.failed(exc, client)
        elif isinstance(exc, ConnectionAbortedError):  # uvloop's own abort: the timeout
            self.handshakes.timed_out(client)
        # Otherwise the client left mid-handshake (the kubelet's TCP probes do): no event.


# Open files harness needs besides its connections: the engine's pipes, logs, the metrics and
# OTLP sockets, the engine connections kept for reuse.
OWN_FILES = 256


def open_files(front: FrontSection, *, apply: bool) -> dict[str, int]:
    """Room for front.max_connections: each connection is a file descriptor, and so are each
    handshake in progress and each admitted request's connection to the engine. Past
    RLIMIT_NOFILE a new connection is closed at accept, unanswered and unreported (libuv
    drops it), so a soft limit below that need would be a lower, silent connection cap. With
    `apply`, raise the soft limit to the need, within the hard limit; past the hard limit,
    refuse to start (exit 2)."""
    others = front.max_handshakes + front.max_concurrency + OWN_FILES
    needed = front.max_connections + others
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        room = hard - others
        raise ConfigError(
            f"front.max_connections {front.max_connections}: the front needs {needed} open "
            f"files (a connection each, {front.max_handshakes} for front.max_handshakes, "
            f"{front.max_concurrency} to the engine for front.max_concurrency, {OWN_FILES} for "
            f"itself), and its limit is {hard} (RLIMIT_NOFILE)",
            fix=(f"lower front.max_connections to at most {room}, or " if room > 0 else "")
            + "raise the open-files limit (docker run --ulimit nofile=N, systemd LimitNOFILE=N)",
        )
    if apply and soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return {"open_files_needed": needed, "open_files_limit": soft}


def bind(front: FrontSection) -> socket.socket:
    """Bind the listening socket early: a busy port fails in a second, not after the engine
    has loaded, and later the front can drop the privilege to bind."""
    host, port = split_listen(front.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"front.listen {front.listen}: cannot bind: {exc.strerror}",
            fix="choose a free port, or stop the process that holds it",
        ) from exc
    # Headers and body go out as separate TLS records; with Nagle on, the second waits for
    # the client's delayed ACK: ~40 ms on every response. Accepted sockets inherit this.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.set_inheritable(False)
    return sock


class CoalescingTransport:
    """The connection's TLS transport, with a response's head sent together with what follows
    it. uvicorn writes the head as soon as the app starts the response and the body right
    after: two TLS records and two send(2) calls for every non-streamed response, where one
    does (5-10 % less CPU per request, benchmarks/front_bench.py). The head waits for the
    next write or the end of this turn of the event loop, whichever comes first; everything
    else goes out at once. Anything that ends the connection flushes first: no write is lost
    or reordered. Once the head is out, the rest of the response (a stream's events) is
    written by the transport's own `write`, with no Python call in between, until the
    protocol says the response is complete (`response_done`)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is not None:
            data, self._pending = self._pending + data, None
            self.write = self._transport.write  # type: ignore[method-assign]
        elif bytes(data[:7]) == b"HTTP/1.":  # a response head: hold it for this turn
            self._pending = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._pending is not None:
            data, self._pending = self._pending, None
            self.write = self._transport.write  # type: ignore[method-assign]
            if not self._transport.is_closing():
                self._transport.write(data)

    def response_done(self) -> None:
        """The next write is the next response's head: hold it again."""
        self.__dict__.pop("write", None)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self.flush()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # the rest, as the transport has it
        return getattr(self._transport, name)


@dataclass(frozen=True)
class ProtocolSettings:
    """What every connection of one server shares: its allowlist, limits and event throttles."""

    allowed: tuple[str, ...]
    header_timeout: float
    tls_material: RotatingContext
    max_connections: int
    # An allowed client could otherwise open connections without end, each holding a socket
    # and TLS buffers until the keep-alive timeout; the events for it are throttled.
    refused_connections: telemetry.Throttled
    # Requests refused by their framing (the parser's refusals included), before the app:
    # one event a second per reason and detail, as refused handshakes are.
    refused_requests: telemetry.Throttled
    header_timed_out: framing.Refusal


class IdentityCheckingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the client's identity checked right after the
    handshake and the request head and body framed before the parser sees them. One
    subclass per server carries that server's `settings` (`_identity_protocol`)."""

    settings: ProtocolSettings
    rejected = False  # refused: whatever else arrives is dropped, the app never runs
    header_timer: asyncio.TimerHandle | None = None
    # The parser's position, for feeding it in segments (_feed): the head in progress
    # (its bytes so far, their last 3, its headers), the body bytes still to come in
    # bulk, and in a chunked body the chunk-size line in progress.
    head_bytes = 0
    head_tail = b""
    head: framing.Head | None = None
    in_body = False  # the head is done, the body is not
    body_seen = False  # and some of it has been parsed
    body_left = 0
    chunked = False
    chunks = 0
    chunk_line = b""
    between_requests = False  # idle: a new connection, or a response went out; no request yet
    client_ca_generation = 0  # the client CA this connection's certificate was checked by
    not_after = float("inf")  # when that certificate expires (epoch seconds)
    running_scope: dict[str, Any] | None = None  # the request the app is running

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # now one of server_state.connections
        # Responses go out through it (flow control keeps the transport itself).
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        address = self.client[0] if self.client else None  # uvicorn's (host, port)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        # What OpenSSL's purpose check lets through: no EKU, or a CA certificate. (With no
        # certificate OpenSSL ends the handshake; refused here too, should one get by.)
        unfit = client_certificate_unfit(der) if der else ("no_client_certificate", "none")
        if unfit is not None:
            self._refuse_connection()
            reason, detail = unfit
            self.settings.tls_material.handshakes.events.record(
                address, reason=reason, detail=detail
            )
            return
        if len(self.server_state.connections) > self.settings.max_connections:
            self._refuse_connection()
            self.settings.refused_connections.record(
                address, reason="too_many_connections", limit=self.settings.max_connections
            )
            return
        peercert = ssl_object.getpeercert() if ssl_object else None
        sans = peer_identities(peercert)
        self.client_ca_generation = self.settings.tls_material.client_ca_generation
        if peercert and "notAfter" in peercert:
            self.not_after = ssl.cert_time_to_seconds(str(peercert["notAfter"]))
        identity = match_identity(sans, self.settings.allowed)
        if identity is None:
            self._refuse_connection()
            # Throttled as the other refused handshakes: one event a second per set of
            # SANs presented (bounded: only certificates the client CA issued get here).
            self.settings.tls_material.handshakes.events.record(
                address,
                reason="identity_not_allowed",
                detail="no SAN is in front.allowed_identities",
                presented=tuple(f"{kind}:{value}"[:256] for kind, value in sans[:8]),
            )
            return
        inner = self.app

        async def app_with_identity(scope: Any, receive: Any, send: Any) -> None:
            scope[IDENTITY_KEY] = identity
            self.running_scope = scope
            try:
                await inner(scope, receive, send)
            finally:
                self.running_scope = None

        self.app = app_with_identity
        # Until its first byte a connection is idle, not slow (a gateway may open one
        # before it has a request for it): uvicorn's keep-alive timer closes it quietly,
        # as between requests, and the header timer starts with the first byte.
        self.between_requests = True
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _refuse_connection(self) -> None:
        # The client's first request may arrive in the same read as its handshake, and
        # asyncio delivers it even after abort(): drop it in data_received, and never let
        # the app run for this connection.
        self.rejected = True
        self.app = _refuse
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if self.between_requests:  # the next request's first bytes: its head is timed
            self.between_requests = False
            self._arm_header_timer()
        self._unset_keepalive_if_required()
        # Not uvicorn's handling of the parser's errors: a 400 with an unthrottled log line
        # and no event, and for an error inside a body, a client that left for the app.
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade:
            if not self.rejected:  # CONNECT and upgrades are refused with their head
                self._refuse(framing.UPGRADE)
        except httptools.HttpParserError as exc:
            if not self.rejected:
                self._refuse(framing.parser_refusal(exc, self.body_seen))

    # httptools hands a header over only once it is whole, gluing its pieces together as
    # they arrive: one endless header line grew without bound (32 MB took 19 s of CPU)
    # before any count taken in a callback could see it. So the parser is fed in
    # segments that end where a head, a body or a chunk-size line ends, and heads and
    # chunk-size lines are counted in raw bytes before the parser sees them (llhttp gives
    # no hook for chunk extensions). A head and body that come in one read, the usual
    # case, take two calls into the parser instead of one.
    def _feed(self, data: bytes) -> None:
        view, pos, end = memoryview(data), 0, len(data)
        while pos < end and not self.rejected:
            line_done = False
            if self.body_left:  # body bytes (and a chunk's CRLF): in bulk
                stop = min(end, pos + self.body_left)
                self.body_left -= stop - pos
                self.body_seen = True
            elif self.chunked:  # a chunk-size line, a trailer, the final blank line
                self.body_seen = True
                lf = data.find(b"\n", pos)
                stop, line_done = (end, False) if lf < 0 else (lf + 1, True)
                if len(self.chunk_line) + stop - pos > framing.MAX_CHUNK_LINE_BYTES:
                    self._refuse(framing.CHUNK_LINE_TOO_LONG)
                    return
                self.chunk_line += data[pos:stop]
            else:  # a head, up to its blank line
                stop = self._head_end(data, pos)
                self.head_bytes += stop - pos
                if self.head_bytes > MAX_HEAD_BYTES:
                    self._refuse(framing.head_too_large(MAX_HEAD_BYTES))
                    return
                if stop == end:  # the head may go on in the next read
                    self.head_tail = (self.head_tail + data[max(pos, stop - 3) : stop])[-3:]
            self.parser.feed_data(view[pos:stop])
            if line_done:
                self.chunk_line = b""
            pos = stop

    def _head_end(self, data: bytes, pos: int) -> int:
        """Just past the blank line that ends the head in progress, or the end of data."""
        if self.head_tail:  # a blank line across reads
            split = (self.head_tail + data[pos : pos + 3]).find(b"\r\n\r\n")
            if split >= 0:
                return pos + split + 4 - len(self.head_tail)
        found = data.find(b"\r\n\r\n", pos)
        return len(data) if found < 0 else found + 4

    # uvicorn has no timeout for reading a request head, and any byte received cancels
    # its keep-alive timer: a client trickling header bytes (slowloris) would hold the
    # connection forever. The head must be complete within header_timeout_s of the
    # request's first byte; the idle time before it, on a new connection or between
    # requests, is the keep-alive timeout's.
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(
            self.settings.header_timeout, self._header_timed_out
        )

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        self._refuse(self.settings.header_timed_out, answer=False)

    def _refuse(self, refusal: framing.Refusal, *, answer: bool = True) -> None:
        """Refuse what this connection sent and end it; the parser is not fed again. A
        refusal inside the body the app is reading is the app's to answer (its event
        then has the route, and this status rather than a client that left). Otherwise
        a throttled event, and `refusal` is the answer, or, with a response under way,
        that response is the connection's last (on_response_complete closes it)."""
        self.rejected = True
        self._cancel_header_timer()
        queued, cycle = bool(self.pipeline), self.cycle
        self.pipeline.clear()  # requests parsed behind the refused one never run
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body and not queued and not cycle.response_started:
                cycle.keep_alive = False  # the answer says `connection: close`
                cycle.scope[REFUSED_KEY] = refusal.rejected()
                cycle.message_event.set()  # wakes the app's receive()
                return
            self._record(refusal)
            return
        self._record(refusal)
        if answer:
            self.transport.write(refusal.response())
        self.transport.close()

    def _record(self, refusal: framing.Refusal) -> None:
        ssl_object: ssl.SSLObject | None = self.transport.get_extra_info("ssl_object")
        sans = peer_identities(ssl_object.getpeercert() if ssl_object else None)
        self.settings.refused_requests.record(
            self.client[0] if self.client else None,  # uvicorn's (host, port)
            reason=refusal.code,
            status=refusal.status,
            identity=match_identity(sans, self.settings.allowed),
            **refusal.fields,
        )

    def on_message_begin(self) -> None:
        self.head = framing.Head()
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.rejected:
            return
        if self.in_body:  # a trailer: uvicorn adds it to the headers the app has read
            self._refuse(framing.TRAILERS)
            return
        assert self.head is not None
        refusal = self.head.add(name.lower(), value)
        if refusal is not None:
            self._refuse(refusal)
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.rejected:
            return
        self._cancel_header_timer()
        self.head_bytes, self.head_tail = 0, b""
        head = self.head
        assert head is not None
        version, upgrade = self.parser.get_http_version(), self.parser.should_upgrade()
        refusal = head.check(version, self.url, upgrade)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.in_body, self.body_seen, self.chunked, self.chunks = True, False, head.chunked, 0
        self.body_left = 0 if head.chunked else head.body_bytes
        super().on_headers_complete()
        if head.chunked or head.body_bytes:
            # For the app to call when it answers before the body is whole (a refusal):
            # the response then says `connection: close`, as the connection ends.
            last = functools.partial(_last_response, weakref.ref(self.cycle))  # no cycle
            self.cycle.scope[LAST_RESPONSE_KEY] = last
        # A keep-alive connection outlives its handshake. Once the client CA has changed
        # or the client's certificate has expired, this request is its last: the response
        # says `connection: close`, and the client shows its certificate again on a new
        # connection (the old CA's clients are then refused).
        self.settings.tls_material.reload_if_changed()
        stale = self.settings.tls_material.client_ca_generation != self.client_ca_generation
        if (stale or time.time() >= self.not_after) and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_chunk_header(self) -> None:
        if self.rejected:
            return
        size = framing.chunk_size(self.chunk_line)  # the line just fed, whole
        if size is None:
            self._refuse(framing.BAD_CHUNK_SIZE)
        elif size:  # its data and CRLF are body bytes
            self.chunks += 1
            self.body_left = size + 2
            if self.chunks > framing.MAX_CHUNKS:
                self._refuse(framing.TOO_MANY_CHUNKS)
        # After the last chunk (size 0): trailers, or the final blank line.

    def on_body(self, body: bytes) -> None:
        if not self.rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_body = self.chunked = False
        self.body_left = 0
        if not self.rejected:
            super().on_message_complete()
            if self.cycle is not None and not self.cycle.more_body:  # read with no body timer
                self.cycle.scope[BODY_WHOLE_KEY] = True

    def on_response_complete(self) -> None:
        # Answered before its body was whole (a refusal: 413, 408...): the rest of that
        # body is not read, and the connection ends with this response.
        cycle = self.cycle
        self.transport.response_done()  # type: ignore[attr-defined]
        if self.rejected or (cycle is not None and cycle.more_body and not self.pipeline):
            self.rejected = True
            self.transport.close()
        super().on_response_complete()  # starts uvicorn's keep-alive timer, if still open
        self.between_requests = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        # The request the app is running, not uvicorn's current cycle: with a request
        # pipelined behind it, that cycle is the queued one. An answered request's watch
        # is disarmed and ignores this.
        scope = self.running_scope
        watch = scope.get(WATCH_KEY) if scope is not None else None
        if watch is not None:  # the client left mid-request: the engine must stop
            watch.client_left()
        super().connection_lost(exc)
        # The identity wrapper (self.app) closes over self, and queued requests hold it:
        # a reference cycle, which kept the connection, its TLS objects and their read
        # buffers (~600 KiB after a 1 MB body) until a full garbage collection, long
        # after a flood of slow bodies was gone. Without it, they go now.
        self.app = _refuse
        self.pipeline.clear()


def _identity_protocol(
    allowed: tuple[str, ...],
    header_timeout: float,
    tls_material: RotatingContext,
    max_connections: int,
) -> type[HttpToolsProtocol]:
    settings = ProtocolSettings(
        allowed=allowed,
        header_timeout=header_timeout,
        tls_material=tls_material,
        max_connections=max_connections,
        refused_connections=telemetry.Throttled("request_rejected", "blocked"),
        refused_requests=telemetry.Throttled("request_rejected", "blocked"),
        header_timed_out=framing.Refusal(
            408, "header_timeout", "The request head took too long", {"seconds": header_timeout}
        ),
    )
    return type("IdentityCheckingProtocol", (IdentityCheckingProtocol,), {"settings": settings})


def _last_response(cycle: weakref.ref[RequestResponseCycle]) -> None:
    request = cycle()
    if request is not None:
        request.keep_alive = False


async def _refuse(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("a connection whose identity was refused reached the app")


class FrontServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT meaning *drain*: readiness goes false, no new
    connections, in-flight requests finish within front.drain_timeout_s. Unlike plain
    uvicorn, the signal is not re-raised afterwards: the supervisor still has to stop the
    engine and exit 0."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: FrontState,
        *,
        handshakes: Handshakes,
        server_state: ServerState | None = None,
    ) -> None:
        super().__init__(config)
        if server_state is not None:  # made before the server, for the metrics to read
            self.server_state = server_state
        self.state = state
        self.stop_signal: int | None = None
        self.handshakes = handshakes
        self._stopping = asyncio.Event()  # wakes main_loop at once
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if not isinstance(loop, HandshakeBoundLoop):  # not through run(): no handshake bound
            raise RuntimeError("the front must run on front.server.run()'s event loop")
        loop.handshakes = self.handshakes
        self._loop = loop
        await super().startup(sockets)

    # uvicorn's main loop wakes ten times a second to see whether it should stop. Each
    # wake-up of an idle front costs CPU that, on a small node, vLLM's API server could
    # use (benchmarks/README.md). This one wakes once a second, to refresh the Date
    # header as uvicorn does, and at once when told to stop.
    TICK_S = 1.0

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # on_tick refreshes the Date header when counter % 10 == 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.TICK_S):
                    await self._stopping.wait()

    def _wake(self) -> None:
        # Safe from the signal handler too: it only schedules the set on the loop.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        if self.stop_signal is None:
            self.stop_signal = sig
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting
        self.should_exit = True
        self._wake()

    def request_stop(self) -> None:
        self.state.draining = True
        self.should_exit = True
        self._wake()


def build_server(
    front: FrontSection,
    app: FrontApp,
    state: FrontState,
    tls_material: RotatingContext,
    server_state: ServerState | None = None,
) -> FrontServer:
    """`server_state`: uvicorn's record of the open connections (the ones counted against
    front.max_connections), when something made earlier reads it."""
    tls_material.handshakes.timeout_s = front.handshake_timeout_s
    tls_material.handshakes.limit = front.max_handshakes
    tls_material.handshakes.per_client = front.handshakes_per_client
    config = uvicorn.Config(
        app,
        http=_identity_protocol(
            tuple(front.allowed_identities),
            front.header_timeout_s,
            tls_material,
            front.max_connections,
        ),
        ssl_context_factory=_fixed(tls_material.base),
        ws="none",  # no WebSocket upgrades: the front serves none, and no library parses them
        lifespan="on",
        log_config=None,
        access_log=False,  # the front emits its own audit events
        proxy_headers=False,  # never trust X-Forwarded-* from clients
        server_header=False,
        # uvicorn annotates these as int but only hands them to call_later and asyncio.timeout:
        # the configured seconds are kept as they are, not rounded (0.4 s is not 1 s).
        timeout_keep_alive=front.keepalive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=front.drain_timeout_s,  # type: ignore[arg-type]
    )
    return FrontServer(config, state, handshakes=tls_material.handshakes, server_state=server_state)


def _fixed(
    ctx: ssl.SSLContext,
) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    return lambda _config, _default: ctx
