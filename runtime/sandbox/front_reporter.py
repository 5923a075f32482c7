"""The supervisor of harness's own seccomp filter, in a process of its own.

The front's filter (runtime/sandbox/front.py) sends the calls it refuses to a listener fd. No
thread of harness may answer them: a thread blocked in a refused call while it holds the GIL
would stop the answering thread too, and harness would hang instead of getting EPERM. So this
small process, started before the filter is loaded (it is not under that filter), receives
the listener over a Unix socket (SCM_RIGHTS), answers every notification with EPERM, and sends
one JSON line per `seccomp_violation` record back to harness, which emits the event; on
harness's `serving` line it ends the startup phase and sends back the startup probes seen. It exits
when harness is gone (the filter has no user left) or the socket closes. If it dies, the
front's refused calls fail with ENOSYS: refused all the same, and harness reports its exit.

Run by harness as `python -m runtime.sandbox.front_reporter --channel-fd N`.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
from typing import Any

from runtime.sandbox.seccomp.notify import Supervisor


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.sandbox.front_reporter")
    parser.add_argument("--channel-fd", type=int, required=True)
    args = parser.parse_args()
    channel = socket.socket(fileno=args.channel_fd)
    _msg, fds, _flags, _addr = socket.recv_fds(channel, 16, 1)
    if not fds:
        return 1  # harness did not load its filter
    lock = threading.Lock()

    def send(record: dict[str, Any]) -> None:
        with lock:
            channel.sendall(json.dumps({"scope": "front", **record}).encode() + b"\n")

    # "startup" until harness says its event loop runs: creating it, uvloop probes io_uring
    # once (and falls back to epoll), a known probe and no alert (policy.startup_probe).
    supervisor = Supervisor(fds[0], "enforce", report=send, phase="startup")
    supervisor.start()
    with channel.makefile("rb") as lines:
        for line in lines:
            if line.strip() == b"serving":
                send({"startup_probes": supervisor.end_startup()})
    supervisor.join()  # POLLHUP: no process uses the filter any more
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
