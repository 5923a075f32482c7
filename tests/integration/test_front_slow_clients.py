"""The in-process front (tests/support/front.py) against slow and idle clients: the header,
handshake and keep-alive timeouts, and the caps on handshakes and connections."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.front import (
    Front,
    audit_events,
    read_status,
    wait_until,
)

# The timeouts these tests run under, short so that the tier stays fast, with margins that a
# loaded two-core machine keeps: the header timeout, the keep-alive timeout (not a whole
# number of seconds: it must reach uvicorn as configured), an idle pause that lies past the
# first and well within the second, and the slack allowed past a timeout before it is late.
HEADER_S, KEEPALIVE_S, IDLE_S, LATE_S = 0.3, 1.4, 0.6, 1.5


def test_slowloris_is_disconnected_by_the_header_timeout(make_front: Callable[..., Front]) -> None:
    front = make_front(header_timeout_s=HEADER_S)
    host, port = front.url.removeprefix("https://").split(":")
    started = time.monotonic()
    with (
        socket.create_connection((host, int(port))) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")
        closed = False
        for _ in range(80):  # one header byte every 0.05 s: never a complete head
            try:
                tls.sendall(b"X")
                tls.settimeout(0.05)
                if tls.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
                break
    assert closed and time.monotonic() - started < HEADER_S + LATE_S
    assert any(e.get("reason") == "header_timeout" for e in audit_events(front, "request_rejected"))
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
    front = make_front(handshake_timeout_s=0.5, header_timeout_s=30, keepalive_timeout_s=30)
    assert front.tls_material is not None
    handshakes = front.tls_material.handshakes
    host, port = front.url.removeprefix("https://").split(":")
    # A TLS 1.x handshake record header announcing 512 bytes, and then 5 of them.
    partial_hello = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03"
    for send in (b"", partial_hello):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            wait_until(lambda: handshakes.in_progress == 1, "the stalled handshake is not counted")
            assert 0.2 < _closed_after(raw, send, limit_s=8) < 2.5
            wait_until(lambda: handshakes.in_progress == 0, "the cut handshake is still counted")
    wait_until(
        lambda: sum(e.get("count", 0) for e in front.events) >= 2,
        "the cut handshakes were not reported",
    )
    cut = audit_events(front, "tls_handshake_rejected")
    assert {e["reason"] for e in cut} == {"handshake_timeout"}
    assert sum(e["count"] for e in cut) == 2
    assert "front.handshake_timeout_s (0.5 s)" in cut[0]["detail"]
    assert cut[0]["clients"] == ["127.0.0.1"]
    # A client that connects and closes at once (the kubelet's TCP probe) is no timeout.
    socket.create_connection((host, int(port))).close()
    wait_until(lambda: handshakes.in_progress == 0, "a closed connection is still counted")
    # A client that completes its handshake is not affected, however long it then waits
    # before its request (within the keep-alive timeout).
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        time.sleep(1.0)  # twice the handshake timeout
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_status(tls) == 200
    # Only that request reached the engine, and nothing else was reported.
    assert [seen["path"] for seen in front.upstream.seen] == [b"/v1/models"]
    assert sum(e["count"] for e in audit_events(front, "tls_handshake_rejected")) == 2
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
        wait_until(lambda: handshakes.in_progress == 2, "the stalled handshakes are not counted")
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                assert _closed_after(extra, b"", limit_s=5) < 2
        assert handshakes.in_progress == 2
        first.close()
        wait_until(lambda: handshakes.in_progress == 1, "a closed connection is still counted")
        with httpx.Client(verify=front.ctx(), timeout=10) as client:
            assert client.get(f"{front.url}/v1/models").status_code == 200
        second.settimeout(0.2)  # still held: the front has not closed it
        with pytest.raises(TimeoutError):
            second.recv(1)
    wait_until(
        lambda: sum(e.get("count", 0) for e in audit_events(front, "tls_handshake_rejected")) >= 3,
        "the refused connections were not all counted",
    )
    refused = audit_events(front, "tls_handshake_rejected")
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
            assert read_status(tls) == 200
        for _ in range(6):
            with connect() as extra, pytest.raises((ssl.SSLError, ConnectionError)):
                extra.sendall(request)
                if not extra.recv(1):  # TLS 1.3: the verdict comes after the client's Finished
                    raise ConnectionError("closed")
        for tls in (first, second):  # still served
            tls.sendall(request)
            assert read_status(tls) == 200
    wait_until(
        lambda: sum(e.get("count", 0) for e in front.events) >= 6,
        "the refused connections were not all counted",
    )
    refused = audit_events(front, "request_rejected")
    assert {e["reason"] for e in refused} == {"too_many_connections"}
    assert refused[0]["count"] == 1 and sum(e["count"] for e in refused) == 6
    assert len(refused) <= 3 and refused[0]["limit"] == 2
    assert all(e["clients"] == ["127.0.0.1"] for e in refused)
    assert len(front.upstream.seen) == 4  # only the held connections' requests
    wait_until(lambda: not front.server.server_state.connections, "the held connections stayed")
    with httpx.Client(verify=front.ctx(), timeout=10) as client:
        assert client.get(f"{front.url}/v1/models").status_code == 200


def test_a_fresh_connection_idles_as_a_kept_alive_one_does(
    make_front: Callable[..., Front],
) -> None:
    """A gateway may open a connection before it has a request for it. Until the first byte
    that connection is idle, not slow: the keep-alive timeout closes it quietly, and the
    header timeout runs from the first byte, as between requests."""
    front = make_front(header_timeout_s=HEADER_S, keepalive_timeout_s=KEEPALIVE_S)
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        time.sleep(IDLE_S)  # past the header timeout, within the keep-alive timeout
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_status(tls) == 200
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        started = time.monotonic()
        assert tls.recv(1) == b""  # never used: closed by the keep-alive timeout...
        assert KEEPALIVE_S - 0.2 < time.monotonic() - started < KEEPALIVE_S + LATE_S
    time.sleep(0.2)  # ...and neither connection was a slow header
    assert audit_events(front, "request_rejected", count=0, timeout=0) == []


def test_an_idle_keep_alive_connection_is_not_a_slow_header(
    make_front: Callable[..., Front],
) -> None:
    """Idle time between requests is the keep-alive timeout's business: the header timeout
    starts with the next request's first byte, even when it is the shorter of the two."""
    front = make_front(header_timeout_s=HEADER_S, keepalive_timeout_s=KEEPALIVE_S)
    host, port = front.url.removeprefix("https://").split(":")
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        assert read_status(tls) == 200
        time.sleep(IDLE_S)  # idle past the header timeout, within the keep-alive timeout
        tls.sendall(request)
        assert read_status(tls) == 200
        # A slow head on the same connection is still cut by the header timeout.
        started = time.monotonic()
        tls.sendall(b"GET /v1/models HTTP/1.1\r\n")
        tls.settimeout(0.05)
        closed = False
        while not closed and time.monotonic() - started < 5:
            try:
                tls.sendall(b"X")
                closed = tls.recv(1) == b""
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
        assert closed and time.monotonic() - started < HEADER_S + LATE_S
    [slow] = audit_events(front, "request_rejected")
    assert slow["reason"] == "header_timeout"
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        front.ctx().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        assert read_status(tls) == 200
        started = time.monotonic()
        assert tls.recv(1) == b""  # closed by the keep-alive timeout...
        assert KEEPALIVE_S - 0.2 < time.monotonic() - started < KEEPALIVE_S + LATE_S
    time.sleep(0.2)  # ...with no slow-header event for it
    assert len(audit_events(front, "request_rejected")) == 1
    assert len(front.upstream.seen) == 3


def test_timeouts_reach_uvicorn_as_configured(make_front: Callable[..., Front]) -> None:
    """Seconds are seconds: a keep-alive or drain timeout under one second is not rounded."""
    front = make_front(keepalive_timeout_s=0.4, drain_timeout_s=2.5)
    assert front.server.config.timeout_keep_alive == 0.4
    assert front.server.config.timeout_graceful_shutdown == 2.5
