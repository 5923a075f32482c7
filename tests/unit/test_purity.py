"""The unit tier's guard (tests/unit/conftest.py) refuses what makes a test impure: without
it, a test that needs the network or a process would pass here and hide in the fast tier."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
from collections.abc import Callable

import pytest


def _udp_send() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"x", ("127.0.0.1", 9))


def _listen() -> None:
    with socket.socket() as tcp:
        tcp.listen()


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: socket.create_connection(("127.0.0.1", 9), timeout=1), "socket.connect"),
        (_udp_send, "socket.sendto"),
        (_listen, "socket.listen"),
        (lambda: subprocess.run(["true"], check=False), "Popen.__init__"),
        (lambda: os.system("true"), "os.system"),
        (lambda: multiprocessing.get_context("spawn").Process(target=print).start(), "fork_exec"),
        (lambda: os.posix_spawnp("true", ["true"], dict(os.environ)), "os.posix_spawnp"),
    ],
    ids=["connect", "udp", "listen", "subprocess", "system", "spawn", "posix_spawnp"],
)
def test_the_guard_refuses_and_names_the_call(call: Callable[[], object], named: str) -> None:
    with pytest.raises(AssertionError, match="move this test to tests/integration") as info:
        call()
    assert named in str(info.value)


@pytest.fixture(scope="module")
def module_socket() -> str:
    """A module-scoped fixture is set up within a test's setup: guarded too."""
    try:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
    except AssertionError as exc:
        return str(exc)
    return "bound"


def test_a_module_fixture_is_guarded_too(module_socket: str) -> None:
    assert "socket.bind" in module_socket


def test_an_event_loop_still_runs() -> None:
    import asyncio

    assert asyncio.run(asyncio.sleep(0, result=7)) == 7
