"""A private network namespace for the engine.

vLLM's HTTP server listens only on its Unix socket, but torch.distributed (gloo) in vLLM's
worker opens TCP listeners on 127.0.0.1 even at world size 1. In a namespace of its own the
engine has just a loopback device: those listeners are reachable by nobody else, and the
engine can connect to nothing outside. The Unix socket is a path, so the front still reaches it.

Needs CAP_SYS_ADMIN (root on a node or a dev box). Under `auto`, without it, the engine keeps
the host's (pod's) network and an event says so; `required` refuses to start instead.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from typing import Any

from runtime.sandbox import _linux

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def apply(mode: str) -> dict[str, Any]:
    """Enter a new network namespace and bring its loopback up. Returns the report."""
    if mode == "off":
        return {"mode": mode, "isolated": False, "reason": "disabled by config"}
    try:
        _linux.unshare(_linux.CLONE_NEWNET)
    except OSError as exc:
        if mode == "required":
            raise
        return {"mode": mode, "isolated": False, "reason": str(exc)}
    _loopback_up()
    return {"mode": mode, "isolated": True, "interfaces": ["lo"]}


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
