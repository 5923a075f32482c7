"""`harness serve`: the startup sequence of docs/design.md, top to bottom.

Each step is one call that either returns or raises a HarnessError carrying its exit code.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from runtime import config as config_mod
from runtime import otel, startup, telemetry
from runtime.config import Config
from runtime.engine import liveness, resources, watchdog
from runtime.engine import process as engine_process
from runtime.engine.process import Engine
from runtime.errors import EngineError
from runtime.sandbox import _linux
from runtime.sandbox import front as front_sandbox
from runtime.sandbox.seccomp import configured
from runtime.weights import recheck_weights

ENGINE_FAILED = EngineError.exit_code


class StopRequested(BaseException):
    """SIGTERM/SIGINT before the front serves: unwind, stop the engine, exit 0."""


def serve(
    config_path: str | Path,
    overrides: list[str] | None = None,
    *,
    on_ready: Callable[[Config], None] | None = None,
) -> int:
    _stop_on_signals()
    # Not dumpable: no core file of keys and secrets, and its /proc/<pid>/{environ,mem,fd,
    # root} belong to root, so no process of its uid (the engine's, in a pod) reads them.
    # Every program harness starts is dumpable again after its execve.
    _linux.prctl(_linux.PR_SET_DUMPABLE, 0)

    # 1. Configuration: validated, typed, unknown keys refused (exit 2).
    cfg = config_mod.load(config_path, overrides)
    configured.check_config(cfg)  # the engine's profile exists and compiles, before any work
    container = front_sandbox.container_profile(cfg)  # the runtime's, for harness's own filter
    export = otel.install(cfg)  # OTLP, when configured: events are held until step 3
    telemetry.emit("config_loaded", "ok", config=str(cfg.source), model=str(cfg.model.dir))

    # Harness itself, before its first thread (every thread, and the engine, inherit it):
    # Landlock lets it read only the system, its code, the model and signature, its secrets
    # and TLS files, and write only the engine's private runtime dir and /dev/shm (exit 5 if
    # sandbox.landlock = required cannot be met). The dir is removed on the way out.
    # The engine's namespaces and root come first: once confined, harness may not mount.
    with engine_process.runtime_dir(cfg) as paths:
        spaces = engine_process.prepare_namespaces(cfg, paths)
        confined = front_sandbox.confine(cfg, paths.root, spaces.shm_path, spaces.proc_path)
        telemetry.emit("landlock", "ok" if confined["enforced"] else "failed", **confined)

        # 2-4. Weights (exit 3), secrets (exit 4), caps and placement, the front's TLS
        #    material, port and open-files limit (exit 2): runtime/startup.py. The secrets go
        #    to the OTLP exporter, which holds events until then (its credentials are secrets).
        site = startup.Site(
            paths.root,
            landlocked=bool(confined["enforced"]),
            own_shm=spaces.isolated,
            hidden=spaces.report.get("root", {}).get("hidden", []),
        )
        prepared = startup.prepare(cfg, site, container, on_secrets=export.start)
        front, caps, placement = prepared.front, prepared.caps, prepared.placement
        export.watch_gauges(front.gauges)
        front.serve_metrics()

        with (
            front.listener,
            Engine.create(cfg, caps, paths=paths, spaces=spaces) as engine,
            watchdog.for_engine(engine, caps),
        ):
            engine.start()
            if placement is not None:  # after the start: the engine keeps every CPU to bind its own
                resources.place_front(placement)
            engine.wait_ready()

            # 6. The weights the engine loaded are the ones verified in step 2.
            recheck_weights(prepared.weights)

            # 7. Front: harness itself may no longer start programs, mount, trace, load BPF or
            #    open raw sockets (a filter on every thread, within the container's profile
            #    where harness knows it); then mTLS, identity allowlist, route allowlist;
            #    supervise until stopped.
            if cfg.sandbox.seccomp != "off":
                telemetry.emit("seccomp_install", "ok", **front_sandbox.apply(container))
            # From now on the engine must keep answering (engine.liveness_timeout_s, exit 6).
            with liveness.watch(engine, cfg.engine.liveness_timeout_s):
                code = front.run(
                    engine,
                    vocab_size=prepared.weights.model.vocab_size,
                    placement=placement,
                    on_ready=on_ready,
                )
            engine_code = engine.stop()
    telemetry.emit(
        "shutdown",
        "ok" if code == 0 else "failed",
        exit_code=code,
        engine_exit_code=engine_code,
        reason=engine.stop_reason or ("engine_exit" if code == ENGINE_FAILED else None),
    )
    return code


def _stop_on_signals() -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
