"""The front's client to the engine (runtime/front/upstream.py) against scripted HTTP servers on
real Unix sockets: what it writes, keep-alive, chunked bodies as they arrive, back-pressure,
and an engine that breaks off, speaks bad HTTP, or is not there. Fast tier."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from runtime.front import upstream
from runtime.front.upstream import EngineBrokeOff, EngineClient, EngineUnavailable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BODY = b'{"model":"demo","prompt":"hi"}'
JSON_HEADERS = [(b"content-type", b"application/json")]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def json_response(payload: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(payload),
        payload,
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_all(response: upstream.Response) -> bytes:
    return b"".join([part async for part, _more in response.chunks()])


def run(tmp_path: Path, handler: Handler, scenario: Callable[[EngineClient], Awaitable[None]]):
    """Serve `handler` on a Unix socket and run `scenario` with a client to it."""
    sock = str(tmp_path / "engine.sock")

    async def main() -> None:
        server = await asyncio.start_unix_server(handler, sock)
        client = EngineClient(sock)
        try:
            async with asyncio.timeout(20):
                await scenario(client)
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_requests_are_written_exactly_and_share_one_connection(tmp_path: Path) -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(json_response(b'{"n":%d}' % len(seen)))

    async def scenario(client: EngineClient) -> None:
        for n in (1, 2, 3):
            response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
            assert response.status_code == 200
            assert (b"content-type", b"application/json") in response.headers
            assert json.loads(await read_all(response)) == {"n": n}
            response.close()
        response = await client.request("GET", "/v1/models", [], b"")
        await read_all(response)
        response.close()

    run(tmp_path, handler, scenario)
    assert connections == 1
    assert seen[0] == (
        b"POST /v1/completions HTTP/1.1\r\nhost: engine\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    assert seen[3] == b"GET /v1/models HTTP/1.1\r\nhost: engine\r\n\r\n"


def test_chunked_body_is_handed_on_as_it_arrives(tmp_path: Path) -> None:
    """The server holds its second chunk until the client has the first: a client that
    waited for the whole body would time out here."""
    first_seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n")
        )
        await first_seen.wait()
        writer.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await read_request(reader)  # the connection is reused for the next request
        writer.write(json_response(b"{}"))

    async def scenario(client: EngineClient) -> None:
        response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        parts = response.chunks()
        assert await anext(parts) == (b"data: 1\n\n", True)
        first_seen.set()
        rest = [part async for part in parts]
        assert b"".join(p for p, _ in rest) == b"data: 2\n\ndata: [DONE]\n\n"
        assert rest[-1][1] is False  # the last piece says so
        response.close()
        again = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        assert await read_all(again) == b"{}"
        again.close()

    run(tmp_path, handler, scenario)


def test_a_whole_response_goes_out_as_one_last_piece(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(json_response(b'{"ok":true}'))

    async def scenario(client: EngineClient) -> None:
        response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        assert [part async for part in response.chunks()] == [(b'{"ok":true}', False)]
        response.close()

    run(tmp_path, handler, scenario)


def test_engine_breaking_off_mid_response_raises_and_the_connection_is_dropped(
    tmp_path: Path,
) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        if connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            await writer.drain()
            writer.close()
            return
        writer.write(json_response(b"{}"))

    async def scenario(client: EngineClient) -> None:
        response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        with pytest.raises(EngineBrokeOff):
            await read_all(response)
        response.close()
        again = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        assert await read_all(again) == b"{}"
        again.close()

    run(tmp_path, handler, scenario)
    assert connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + json_response(b"{}"),
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
    ],
    ids=["closed", "not-http", "bad-status", "interim-100", "switching-101"],
)
def test_no_response_head_is_engine_unavailable(tmp_path: Path, reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        writer.close()

    async def scenario(client: EngineClient) -> None:
        with pytest.raises(EngineUnavailable):
            await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)

    run(tmp_path, handler, scenario)


def test_an_oversized_response_head_is_refused(tmp_path: Path) -> None:
    """The engine is not trusted: a head that never ends is not buffered without bound."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for n in range(upstream.MAX_HEAD_BYTES // 1000 + 2):
            writer.write(b"x-filler-%d: %s\r\n" % (n, b"a" * 1000))
        await writer.drain()

    async def scenario(client: EngineClient) -> None:
        with pytest.raises(EngineUnavailable, match="response head is over"):
            await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)

    run(tmp_path, handler, scenario)


def test_a_response_header_line_that_never_ends_is_refused(tmp_path: Path) -> None:
    """One endless line is never handed to on_header: it is cut by its raw bytes, before the
    parser's joining of its pieces takes the front's CPU."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(upstream.MAX_HEAD_BYTES // 4096 + 4):
            writer.write(b"a" * 4096)
            await writer.drain()
            await asyncio.sleep(0.001)  # separate reads, as a trickling engine sends them
        await asyncio.sleep(5)

    async def scenario(client: EngineClient) -> None:
        with pytest.raises(EngineUnavailable, match="response head is over"):
            await asyncio.wait_for(
                client.request("POST", "/v1/completions", JSON_HEADERS, BODY), timeout=4
            )

    run(tmp_path, handler, scenario)


def test_no_engine_listening_is_engine_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        client = EngineClient(str(tmp_path / "missing.sock"))
        with pytest.raises(EngineUnavailable, match="cannot connect"):
            await client.request("GET", "/v1/models", [], b"")

    asyncio.run(main())


def test_an_abandoned_response_closes_its_connection(tmp_path: Path) -> None:
    """What makes vLLM abort a generation whose client left: the engine sees EOF."""
    engine_saw_eof = asyncio.Event()
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        if connections == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n")
            )
            if await reader.read() == b"":
                engine_saw_eof.set()
            return
        writer.write(json_response(b"{}"))

    async def scenario(client: EngineClient) -> None:
        response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        assert await anext(response.chunks()) == (b"data: 1\n\n", True)
        response.close()
        await asyncio.wait_for(engine_saw_eof.wait(), 5)
        again = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        assert await read_all(again) == b"{}"
        again.close()

    run(tmp_path, handler, scenario)
    assert connections == 2


def test_a_slow_reader_stops_reading_from_the_engine(tmp_path: Path) -> None:
    """Back-pressure: with nobody reading the body, the client buffers at most about
    HIGH_WATER and the engine's writes block; reading on gets every byte."""
    total = 16 * upstream.HIGH_WATER
    piece = b"x" * 16384
    written = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while written < total:
            writer.write(chunk(piece))
            await writer.drain()
            written += len(piece)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def scenario(client: EngineClient) -> None:
        response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
        parts = response.chunks()
        received = len((await anext(parts))[0])
        await asyncio.sleep(0.5)  # the engine writes as fast as it can meanwhile
        assert written < total / 2, "the engine was never held back"
        assert response._conn.buffered <= 2 * upstream.HIGH_WATER
        async for part, _ in parts:
            received += len(part)
        assert received == total
        response.close()

    run(tmp_path, handler, scenario)


def test_idle_connections_are_reused_only_while_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle connection the engine closed, or one idle for longer than IDLE_REUSE_S, is
    never written to: the request goes out on a new connection and succeeds."""
    monkeypatch.setattr(upstream, "IDLE_REUSE_S", 0.3)
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(json_response(b"{}"))
            if number == 1:  # the first connection is closed by the engine once idle
                await asyncio.sleep(0.05)
                writer.close()
                return

    async def scenario(client: EngineClient) -> None:
        for pause in (0.2, 0.5, 0.0):
            response = await client.request("POST", "/v1/completions", JSON_HEADERS, BODY)
            assert await read_all(response) == b"{}"
            response.close()
            await asyncio.sleep(pause)

    run(tmp_path, handler, scenario)
    # 1: closed by the engine; 2: too old after 0.5 s; 3: reused for the last request.
    assert connections == 3
