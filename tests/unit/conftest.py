"""The unit tier is pure: a test here that binds or connects a socket, starts a process or
forks fails, saying where it belongs. (asyncio's own socketpair, which neither binds nor
connects, is allowed: tests/unit/test_admission.py runs an event loop.)"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest


def _refuse(*_args: object, **_kwargs: object) -> None:
    raise AssertionError(
        "the unit tier opens no connection and starts no process: move this test to "
        "tests/integration"
    )


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse)
    monkeypatch.setattr(os, "fork", _refuse)
    monkeypatch.setattr(os, "posix_spawn", _refuse)
    yield
