"""The benchmarks' load generator: HTTP/1.1 keep-alive connections on asyncio (uvloop) with
httptools' parser, one request at a time per connection.

On a small machine the load generator shares a CPU with the front. A general client (httpx)
spent about 2 ms of CPU per request there, in both paths, and its queueing on that CPU became
part of what the benchmark called the front's overhead; this one spends 0.1-0.2 ms, and
0.5-0.7 ms for a streamed response of 16 events (the benchmarks report it). It writes
prepared requests and reads the whole response, streamed or not (httptools undoes the chunked
encoding); latency is from the write to the last byte.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass

import httptools


@dataclass(frozen=True)
class Target:
    """Where the requests go: the engine's Unix socket, or the front over mTLS."""

    uds: str | None = None
    port: int | None = None
    ssl: ssl.SSLContext | None = None


def completion(body: dict) -> bytes:
    """POST /v1/completions with this JSON body, as one prepared request."""
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"closed during a request: {exc}"))


class Client:
    """`size` keep-alive connections to one target. One closed while idle (the front's
    keep-alive timeout) is opened again at the start of the next run, outside the timing."""

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self.conns: list[_Connection | None] = [None] * size  # opened by run()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.target.uds:
            _, conn = await loop.create_unix_connection(_Connection, self.target.uds)
        else:
            _, conn = await loop.create_connection(
                _Connection,
                "127.0.0.1",
                self.target.port,
                ssl=self.target.ssl,
                server_hostname="localhost" if self.target.ssl else None,
            )
        return conn

    async def _ready(self, slot: int) -> _Connection:
        conn = self.conns[slot]
        if conn is None or conn.closed:
            conn = self.conns[slot] = await self._open()
        return conn

    async def run(
        self, request: bytes | list[bytes], n: int, concurrency: int
    ) -> tuple[float, list[float]]:
        """`n` requests from `concurrency` clients, each sending its next when its last one
        finished. A list of requests is sent in turn (the k-th request of a run is
        request[k % len]), so every run of the same n does the same work. Returns (requests
        per second, each request's latency in seconds)."""
        requests = [request] if isinstance(request, bytes) else request
        latencies: list[float] = []
        sent = 0

        async def worker(slot: int) -> None:
            nonlocal sent
            while sent < n:
                this = requests[sent % len(requests)]
                sent += 1
                conn = await self._ready(slot)
                conn.done = asyncio.get_running_loop().create_future()
                started = time.perf_counter()
                assert conn.transport is not None
                conn.transport.write(this)
                status = await conn.done
                latencies.append(time.perf_counter() - started)
                assert status == 200, f"status {status}"

        for slot in range(concurrency):  # open outside the timing
            await self._ready(slot)
        started = time.perf_counter()
        await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
        return n / (time.perf_counter() - started), latencies

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None and conn.transport is not None and not conn.closed:
                conn.transport.close()
