"""The front as one object: what it holds (TLS material, the bound port, admission, its
connections, gauges and metrics) and its two phases in the startup sequence.

`Front.prepare(cfg)` runs before the engine: a wrong TLS file, a busy port or too few open
files fail then (exit 2), not after the engine spent a minute loading. `front.run(engine)`
runs once the engine is ready and its weights re-checked: mTLS, the identity and route
allowlists, the request model, until SIGTERM (0) or the engine's death (6).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime import telemetry
from runtime.config import Config
from runtime.engine.resources import CpuPlacement
from runtime.errors import EngineError
from runtime.front import metrics, server, tls
from runtime.front.admission import Admission
from runtime.front.proxy import FORWARDED, LOCAL, FrontApp, FrontState
from runtime.front.server import ServerState
from runtime.sandbox import front as front_sandbox

if TYPE_CHECKING:
    from runtime.engine.process import Engine


@dataclass
class Front:
    cfg: Config
    tls_material: tls.RotatingContext
    files: dict[str, int]  # open files needed and the limit (front_listen, harness check)
    listener: socket.socket | None  # None for `harness check`, which binds nothing
    admission: Admission
    connections: ServerState = field(default_factory=ServerState)  # uvicorn's record of them

    @classmethod
    def prepare(cls, cfg: Config, *, bind: bool = True) -> Front:
        """Everything that can fail before the engine starts (exit 2). With `bind` (serve), the
        soft open-files limit is raised to what the caps need and the port is bound (not yet
        listening); without (check), only whether the hard limit allows it."""
        server.check_versions()
        tls_material = tls.RotatingContext(cfg.front.tls)
        files = server.open_files(cfg.front, apply=bind)
        listener = server.bind(cfg.front) if bind else None
        return cls(cfg, tls_material, files, listener, Admission.from_config(cfg.front))

    def describe(self, vocab_size: int | None) -> dict[str, dict[str, Any]]:
        """The front's controls, as `harness check` reports them (runtime/startup.py)."""
        cfg = self.cfg
        return {
            "front_tls": {
                "status": "enforced",
                "listen": cfg.front.listen,
                "minimum_version": "TLSv1.3",
                "client_certificate": "required",
                "client_ca": str(cfg.front.tls.client_ca),
                "allowed_identities": list(cfg.front.allowed_identities),
            },
            "route_allowlist": {
                "status": "enforced",
                "forwarded": {k.decode(): sorted(v) for k, v in FORWARDED.items()},
                "answered_by_front": sorted(p.decode() for p in LOCAL),
                "match": "exact raw request target; query string dropped",
            },
            "request_body_limit": {"status": "enforced", "max_bytes": cfg.front.max_body_bytes},
            "request_model": {
                "status": "enforced",
                "vocab_size": vocab_size,
                "structured_outputs": cfg.limits.structured_outputs.allow,
                "media_parts": list(cfg.limits.media.parts),
                "tools": cfg.limits.tools.allow,
                "tool_call_parser": cfg.engine.vllm.get("tool_call_parser"),
            },
            "connections": {
                "status": "enforced",
                "max_connections": cfg.front.max_connections,
                "max_handshakes": cfg.front.max_handshakes,
                "handshake_timeout_s": cfg.front.handshake_timeout_s,
                **self.files,
            },
        }

    @property
    def gauges(self) -> metrics.Gauges:
        return metrics.Gauges(
            in_flight=lambda: self.admission.in_flight,
            connections=lambda: len(self.connections.connections),
            handshakes=lambda: self.tls_material.handshakes.in_progress,
        )

    def serve_metrics(self) -> None:
        """The loopback Prometheus endpoint, when configured (exit 2 if its port is taken)."""
        if self.cfg.front.metrics_listen:
            metrics.serve(self.cfg.front.metrics_listen, self.gauges)

    def run(
        self,
        engine: Engine,
        *,
        vocab_size: int | None,
        placement: CpuPlacement | None = None,
        on_ready: Callable[[Config], None] | None = None,
    ) -> int:
        """Serve until stopped; the exit code (0 drained, 6 the engine died)."""
        return server.run(self._serve(engine, vocab_size, placement, on_ready))

    async def _serve(
        self,
        engine: Engine,
        vocab_size: int | None,
        placement: CpuPlacement | None,
        on_ready: Callable[[Config], None] | None,
    ) -> int:
        cfg = self.cfg
        front_sandbox.serving()  # the loop runs: uvloop's io_uring probe is behind us
        state = FrontState(engine_ready=True)
        app = FrontApp(
            engine.socket,
            state,
            front=cfg.front,
            limits=cfg.limits,
            served_names=cfg.served_names,
            admission=self.admission,
            vocab_size=vocab_size,
            tool_parser=cfg.engine.vllm.get("enable_auto_tool_choice", False),
        )
        assert self.listener is not None, "prepared by harness check: nothing bound"
        front = server.build_server(cfg.front, app, state, self.tls_material, self.connections)
        died: list[int] = []

        # The engine's death wakes us at once (pidfd), not at the next poll.
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(engine.pid)

        def on_engine_exit() -> None:
            loop.remove_reader(pidfd)
            code = engine.exit_status()
            died.append(code if code is not None else -1)
            engine.report_sigsys(code)
            reason = engine.stop_reason or "exited"
            if engine.stop_reason is None and engine.namespace_init_gone():
                reason = "its PID namespace's init ended first, and the kernel ended the engine"
            telemetry.emit(
                "engine_exit", "failed", pid=engine.pid, exit_code=died[0], reason=reason
            )
            front.request_stop()

        loop.add_reader(pidfd, on_engine_exit)
        announce = asyncio.ensure_future(self._announce(front, placement, on_ready))
        try:
            await front.serve(sockets=[self.listener])
        finally:
            announce.cancel()
            if not died:
                loop.remove_reader(pidfd)
            os.close(pidfd)
        if died:
            return EngineError.exit_code
        return 0 if front.started else 1

    async def _announce(
        self,
        front: server.FrontServer,
        placement: CpuPlacement | None,
        on_ready: Callable[[Config], None] | None,
    ) -> None:
        while not front.started:
            await asyncio.sleep(0.05)
        cfg = self.cfg
        telemetry.emit(
            "front_listen",
            "ok",
            listen=cfg.front.listen,
            tls="1.3",
            client_cert="required",
            allowed_identities=list(cfg.front.allowed_identities),
            max_connections=cfg.front.max_connections,
            **self.files,
            **(placement.describe() if placement else {}),
        )
        if on_ready is not None:
            on_ready(cfg)
