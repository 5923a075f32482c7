"""The in-process front (tests/support/front.py) with requests in flight: clients that leave
(mid-stream, before the head, while queued), deadlines, drain, the concurrency cap and the
per-identity rate."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.front import (
    CHAT,
    COMPLETION,
    Front,
    audit_events,
    wait_until,
)


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
    wait_until(lambda: not connections, "the engine connection outlived its client")
    [event] = audit_events(front, "request")
    assert (event["status"], event["outcome"]) == (499, "failed")
    assert event["reason"] == "client_left"


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
        wait_until(lambda: front.upstream.seen, "the request never reached the engine")
        assert len(connections) == 1  # the engine is "generating"
    wait_until(lambda: not connections, "the engine connection outlived its client")
    [event] = audit_events(front, "request")
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
        wait_until(lambda: front.upstream.seen, "the request never reached the engine")
        time.sleep(0.2)  # the pipelined request is parsed and queued behind the first
    wait_until(lambda: not connections, "the engine connection outlived its client")
    [event] = audit_events(front, "request")
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
        wait_until(
            lambda: len(front.upstream.seen) == 1, "the first request never reached the engine"
        )
        with _completion_sent(front):
            wait_until(lambda: admission.waiting == 1, "the second request was not queued")
        [left] = audit_events(front, "request")
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
    wait_until(lambda: not connections, "the engine connection outlived the deadline")
    [event] = audit_events(front, "request")
    assert (event["status"], event["reason"]) == (504, "deadline_exceeded")
    assert front.app is not None and front.app.admission.in_flight == 0


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
