"""The unit tier is pure: a test here whose setup, body or teardown binds, connects or sends
on a socket, starts a process or forks fails, naming the call and where the test belongs.
(asyncio's own socketpair, which is made without any of these, is allowed:
tests/unit/test_admission.py runs an event loop.)"""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Every way a test could reach the network or another process, as (owner, attribute).
GUARDED: list[tuple[Any, str]] = [
    *((socket.socket, name) for name in ("bind", "connect", "connect_ex", "listen")),
    *((socket.socket, name) for name in ("sendto", "sendmsg")),
    (subprocess.Popen, "__init__"),
    (_posixsubprocess, "fork_exec"),  # multiprocessing's spawn and forkserver
    *((os, name) for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp")),
    *((os, name) for name in dir(os) if name.startswith("exec")),
]


def _refusal(owner: Any, name: str) -> Callable[..., None]:
    what = f"{getattr(owner, '__name__', owner)}.{name}"

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(
            f"{what}: the unit tier opens no connection and starts no process; "
            "move this test to tests/integration"
        )

    return refuse


def _guarded() -> pytest.MonkeyPatch:
    patch = pytest.MonkeyPatch()
    for owner, name in GUARDED:
        patch.setattr(owner, name, _refusal(owner, name))
    return patch


# Around each phase of a unit test, fixtures' setup and teardown included (a module-scoped
# fixture is set up within the first test that asks for it). These hooks run for the items
# under this folder only.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _within_guard())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _within_guard())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    return (yield from _within_guard())


def _within_guard() -> Iterator[None]:
    patch = _guarded()
    try:
        return (yield)
    finally:
        patch.undo()
