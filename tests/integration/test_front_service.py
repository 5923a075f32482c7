"""The front as an object: it serves only on the uvicorn and uvloop releases it was tested
with (those pyproject.toml pins), and it reports how the engine died."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import select
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import uvicorn

from runtime.engine.process import Engine
from runtime.errors import ConfigError
from runtime.front import server
from runtime.front.proxy import FrontState
from runtime.front.tls import Handshakes

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_installed_releases_are_the_tested_ones() -> None:
    server.check_versions()


def test_another_release_or_a_missing_library_is_refused_by_name() -> None:
    def installed(name: str) -> str:
        if name == "httptools":
            raise importlib.metadata.PackageNotFoundError(name)
        return {"uvicorn": "0.56.1"}.get(name) or importlib.metadata.version(name)

    with pytest.raises(ConfigError) as caught:
        server.check_versions(installed)
    assert "uvicorn 0.56.1 (tested: 0.55.x)" in caught.value.message
    assert "httptools none (tested: 0.9.x)" in caught.value.message
    assert "uvloop" not in caught.value.message
    assert ConfigError.exit_code == 2


def test_the_tested_releases_are_what_pyproject_pins() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for name, release in server.TESTED_RELEASES.items():
        (spec,) = [d for d in deps if re.match(rf"{name}(\[|>|=|<)", d)]
        major, minor = release.split(".")
        assert f">={release}," in spec and f",<{major}.{int(minor) + 1}" in spec, spec


def test_the_engines_exit_status_is_collected_while_another_thread_polls() -> None:
    """The front learns of the engine's death from its pidfd and reports the exit status.
    The watchdog and the liveness check poll the same process from their threads; while one
    holds Popen's lock, poll() answers None, and the engine_exit event said exit_code -1."""
    engine = Engine(None, None, None)  # type: ignore[arg-type]  # only its process is used
    engine.proc = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    pidfd = os.pidfd_open(engine.proc.pid)
    select.select([pidfd], [], [], 30)  # readable: the process has exited
    os.close(pidfd)
    lock = engine.proc._waitpid_lock  # what another thread's poll() holds for an instant
    lock.acquire()
    threading.Timer(0.2, lock.release).start()
    assert engine.returncode() is None  # the race, as it was
    assert engine.exit_status() == -signal.SIGKILL


class _Recorded:
    """Records what reaches the TLS transport (only its writes and closing matter here)."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def write(self, data: bytes) -> None:
        self.calls.append(bytes(data))

    def is_closing(self) -> bool:
        return "close" in self.calls or "abort" in self.calls

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


def test_a_response_head_goes_out_with_its_body_and_nothing_is_held_past_a_turn() -> None:
    async def scenario() -> list[list[object]]:
        loop = asyncio.get_running_loop()
        seen = []
        for ending in ("body", "turn", "close", "abort"):
            inner = _Recorded()
            transport = server.CoalescingTransport(inner, loop)  # type: ignore[arg-type]
            transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            assert inner.calls == []
            if ending == "body":
                transport.write(bytearray(b"{}"))
                transport.write(b"more")  # not a head: straight through
            elif ending == "close":
                transport.close()
            elif ending == "abort":
                transport.abort()
            await asyncio.sleep(0)  # one turn of the loop
            seen.append(inner.calls)
        return seen

    body, turn, close, abort = asyncio.run(scenario())
    assert body == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]
    assert turn == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert close == [b"HTTP/1.1 200 OK\r\n\r\n", "close"]
    assert abort == [b"HTTP/1.1 200 OK\r\n\r\n", "abort"]


def test_after_its_head_a_response_is_written_straight_through_until_it_is_done() -> None:
    """A stream's events skip the head check (`write` is the transport's own), and the next
    response's head is held again once the protocol says the first is complete."""

    async def scenario() -> list[object]:
        inner = _Recorded()
        transport = server.CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"data: 1\n\n")
        assert transport.write == inner.write  # straight through
        transport.write(b"HTTP/1.1 is text in a stream")
        transport.response_done()
        transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # the next response: held
        assert len(inner.calls) == 2
        await asyncio.sleep(0)
        return inner.calls

    assert asyncio.run(scenario()) == [
        b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\n",
        b"HTTP/1.1 is text in a stream",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]


@pytest.mark.parametrize("how", ["request_stop", "signal"])
def test_the_front_wakes_at_once_when_told_to_stop(how: str) -> None:
    """The main loop ticks once a second (uvicorn's, ten times), so a stop must wake it:
    with a tick of an hour, it still ends, draining."""

    async def scenario() -> bool:
        config = uvicorn.Config(app=_refusing_app, log_config=None)
        config.load()
        front = server.FrontServer(config, FrontState(), handshakes=Handshakes())
        front.TICK_S = 3600.0
        front._loop = asyncio.get_running_loop()
        loop = asyncio.ensure_future(front.main_loop())
        await asyncio.sleep(0.01)  # in its wait
        if how == "signal":
            front.handle_exit(signal.SIGTERM, None)
        else:
            front.request_stop()
        await asyncio.wait_for(loop, 30)
        return front.state.draining

    assert asyncio.run(scenario())


async def _refusing_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("no request reaches this server")
