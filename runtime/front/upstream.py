"""The front's client to the engine: HTTP/1.1 over the engine's Unix socket, with keep-alive.

A general HTTP client was half of the front's CPU per request (httpx, measured with py-spy;
`benchmarks/front_bench.py --engine stand-in` has the numbers), and every millisecond the front
spends is taken from the engine's compute threads on a small node. This client does only what
the front needs: the front writes requests it built itself (a constant path from the route
allowlist, its own headers, the body it checked), so writing them is one line; responses are
parsed by httptools (llhttp, the parser uvicorn uses), which also undoes chunked encoding.
Response bodies are handed on as they arrive; a slow client pauses reading from the engine.
The engine is not trusted: a response head over MAX_HEAD_BYTES is refused, so is an interim
(1xx) response, and a body must be framed by content-length or chunked encoding (vLLM's always
are).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import httptools

from runtime.engine.command import KEEP_ALIVE_S

# Pause reading from the engine when this much of a response waits for a slow client.
HIGH_WATER = 256 * 1024
# The engine closes idle connections after KEEP_ALIVE_S (harness sets it); reusing one close
# to that would race the engine's close, and a completion is not safe to retry.
IDLE_REUSE_S = KEEP_ALIVE_S / 2
# A response head larger than this is not HTTP from vLLM (h11's default limit is 16 KiB).
MAX_HEAD_BYTES = 64 * 1024


class EngineUnavailable(Exception):
    """No response head came back: the engine is not listening, or closed the connection."""


class EngineBrokeOff(Exception):
    """The engine closed the connection or sent bad HTTP in the middle of a response."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. httptools calls the on_* methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.raw_head_bytes = 0  # what arrived before the head was whole
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.lost = False
        self.error: Exception | None = None
        self.idle_since = 0.0

    # -- asyncio protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
            if self.head is not None and not self.head.done():
                # Counted in raw bytes too: llhttp hands a header over only once its line
                # ends, and joins the pieces of an unfinished one at a cost that grows with
                # its square (one endless line from a hostile engine would take the CPU).
                self.raw_head_bytes += len(data)
                if self.raw_head_bytes > MAX_HEAD_BYTES:
                    raise EngineBrokeOff(
                        f"the engine's response head is over {MAX_HEAD_BYTES} bytes"
                    )
        except EngineBrokeOff as exc:
            self._fail(exc)
            assert self.transport is not None
            self.transport.abort()
        except httptools.HttpParserError as exc:
            # An exception in a callback arrives wrapped, with the callback's as its context.
            cause = exc.__context__ if isinstance(exc.__context__, EngineBrokeOff) else None
            self._fail(cause or EngineBrokeOff(f"bad HTTP from the engine: {exc}"))
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            self._fail(EngineBrokeOff("the engine closed the connection"))

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise EngineBrokeOff(f"the engine's response head is over {MAX_HEAD_BYTES} bytes")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 1xx: vLLM sends none, and a final response would follow, unpaired
            raise EngineBrokeOff(f"the engine sent an interim response ({status})")
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once complete
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- used by the client ----------------------------------------------------------------
    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def start(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.head = asyncio.get_running_loop().create_future()
        self.headers = []
        self.head_bytes = self.raw_head_bytes = 0
        self.complete = self.keep_alive = False
        self.transport.write(request)
        return self.head

    async def next_chunk(self) -> bytes | None:
        """All of the body that has arrived and not been taken, or None at its end."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        # What has already arrived goes on as one piece: fewer TLS records and wake-ups when
        # the engine got ahead of the client, and no waiting for what has not arrived.
        chunk = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= HIGH_WATER // 4 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return self.complete and not self.lost and self.error is None and self.keep_alive


class Response:
    """A response head; the body follows through `chunks()`. Always `close()` it."""

    def __init__(self, client: EngineClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self.status_code = conn.parser.get_status_code()
        self.headers = conn.headers
        self._closed = False

    async def chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """(chunk, more): `more` is False on the last one, so a response that arrived whole
        goes out in one write."""
        conn = self._conn
        while (chunk := await conn.next_chunk()) is not None:
            yield chunk, not (conn.complete and not conn.chunks)
            if conn.complete and not conn.chunks:
                return
        yield b"", False

    def close(self) -> None:
        """Back to the pool when the whole response was read; otherwise the connection is
        closed, which makes vLLM abort the request instead of generating into the void."""
        if self._closed:
            return
        self._closed = True
        self._client._release(self._conn)


class EngineClient:
    def __init__(self, socket_path: str, *, connect_timeout: float = 5.0, max_idle: int = 64):
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[_Connection] = []

    async def request(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        head = [f"{method} {path} HTTP/1.1\r\nhost: engine\r\n".encode()]
        head.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        if body or method == "POST":
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        request = b"".join(head) + body
        # No retry: a completion is not idempotent. A reused connection has been idle for well
        # under the engine's keep-alive timeout, so the engine does not close it under us.
        conn = self._reuse() or await self._connect()
        return await self._send(conn, request)

    async def _send(self, conn: _Connection, request: bytes) -> Response:
        try:
            await conn.start(request)
        except EngineBrokeOff as exc:
            self._discard(conn)
            raise EngineUnavailable(str(exc)) from None
        except BaseException:
            self._discard(conn)  # cancelled while waiting: the engine must not go on
            raise
        return Response(self, conn)

    def _reuse(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recent first: least likely to be timed out
            if not conn.lost and now - conn.idle_since < IDLE_REUSE_S:
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_unix_connection(_Connection, self.socket_path)
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"cannot connect to the engine: {exc}") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and len(self._idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._discard(conn)

    @staticmethod
    def _discard(conn: _Connection) -> None:
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.close()

    def close(self) -> None:
        while self._idle:
            self._discard(self._idle.pop())
