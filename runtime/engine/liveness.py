"""Liveness of the engine once it is ready: its /health on the Unix socket, polled.

A live process that no longer answers (its socket renamed or gone, its API server wedged)
would leave the front answering 502 forever, and an orchestrator's TCP probe sees a healthy
pod. Unanswered for `engine.liveness_timeout_s`: an `engine_unresponsive` event, the engine's
process group SIGKILLed, and harness exits 6 as for any engine death (reason in the events).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from runtime import telemetry

if TYPE_CHECKING:
    from runtime.engine.process import Engine

REASON = "engine_unresponsive"
_BODY_BYTES = 4096  # /health answers with an empty body; more is not read


class Liveness(threading.Thread):
    def __init__(self, engine: Engine, timeout_s: float) -> None:
        super().__init__(name="engine-liveness", daemon=True)
        self.engine = engine
        self.timeout_s = timeout_s
        self.interval_s = min(5.0, timeout_s / 4)
        self.stopped = threading.Event()
        self.tripped = False

    def run(self) -> None:
        transport = httpx.HTTPTransport(uds=str(self.engine.socket))
        last_ok, last_error = time.monotonic(), ""
        with httpx.Client(
            transport=transport, base_url="http://engine", timeout=self.interval_s
        ) as client:
            while not self.stopped.wait(self.interval_s):
                if self.engine.returncode() is not None:
                    return  # dead, not unresponsive: the front reports that
                try:
                    status = self._probe(client)
                    if status == 200:
                        last_ok = time.monotonic()
                        continue
                    last_error = f"/health answered {status}"
                except Exception as exc:  # whatever the engine answers, the watch goes on
                    last_error = f"{type(exc).__name__}: {exc}"
                silent = time.monotonic() - last_ok
                if silent >= self.timeout_s:
                    self._trip(silent, last_error)
                    return

    def _probe(self, client: httpx.Client) -> int:
        """GET /health with a deadline for the whole answer (an engine that drips its body
        would otherwise hold this thread, and the watch, forever) and a bounded body."""
        deadline = time.monotonic() + self.interval_s
        with client.stream("GET", "/health") as response:
            read = 0
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > _BODY_BYTES or time.monotonic() > deadline:
                    raise httpx.ReadTimeout("/health: no whole answer in time")
            return response.status_code

    def _trip(self, silent: float, error: str) -> None:
        self.tripped = True
        if self.engine.stop_reason is None:  # a watchdog's reason, when it acted first
            self.engine.stop_reason = REASON
        telemetry.emit(
            REASON,
            "failed",
            action="engine stopped",
            setting="engine.liveness_timeout_s",
            seconds_without_answer=round(silent, 1),
            timeout_s=self.timeout_s,
            last_error=error,
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.engine.pid, signal.SIGKILL)


@contextlib.contextmanager
def watch(engine: Engine, timeout_s: float) -> Iterator[Liveness]:
    """Polls from the moment the engine is ready until the block is left."""
    liveness = Liveness(engine, timeout_s)
    liveness.start()
    try:
        yield liveness
    finally:
        liveness.stopped.set()
        liveness.join(timeout=liveness.interval_s + 1)
