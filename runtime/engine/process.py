"""The engine process: start it on its Unix socket, wait until it is ready, stop it.

The engine runs in its own session (process group) so that a terminal's Ctrl+C reaches only
the front, which then drains before stopping the engine, and so that stopping it also stops
vLLM's own children (EngineCore, workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from runtime import telemetry
from runtime.config import Config
from runtime.engine.command import EnginePlan, RuntimePaths, build_plan
from runtime.errors import ConfigError, EngineError, SandboxError
from runtime.sandbox import privileges

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UDS_PATH = 107


def make_runtime_dir(cfg: Config) -> RuntimePaths:
    parent = cfg.engine.runtime_dir
    try:
        root = Path(tempfile.mkdtemp(prefix="harness-", dir=parent))  # mode 0700
    except OSError as exc:
        raise ConfigError(
            f"engine.runtime_dir {parent}: cannot create a private dir there: {exc}",
            fix="point engine.runtime_dir at a writable folder (a tmpfs in production)",
        ) from exc
    paths = RuntimePaths(root)
    if len(os.fsencode(paths.socket)) > _MAX_UDS_PATH:
        shutil.rmtree(root, ignore_errors=True)
        raise ConfigError(
            f"engine.runtime_dir {parent}: the engine socket path {paths.socket} is longer "
            f"than the {_MAX_UDS_PATH} bytes a Unix socket address can hold",
            fix="use a shorter engine.runtime_dir, such as /run/harness or /tmp",
        )
    for sub in paths.dirs():
        sub.mkdir(mode=0o700)
    return paths


class Engine:
    """A running engine. Use as a context manager: leaving it always stops the engine."""

    def __init__(self, cfg: Config, paths: RuntimePaths, plan: EnginePlan) -> None:
        self.cfg = cfg
        self.paths = paths
        self.plan = plan
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @classmethod
    def create(cls, cfg: Config) -> Engine:
        paths = make_runtime_dir(cfg)
        return cls(cfg, paths, build_plan(cfg, paths))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.plan.socket

    def start(self) -> None:
        """Start stage 2 (runtime.sandbox.exec), which sandboxes itself and execs vLLM."""
        self.started_at = time.monotonic()
        drop = privileges.build(self.cfg.engine, os.geteuid())
        privileges.check_reachable(self.cfg.engine, drop, self.cfg.model.dir)
        if drop.uid is not None:  # the engine's private runtime dir becomes the engine's
            for path in (self.paths.root, *self.paths.dirs()):
                os.chown(path, drop.uid, drop.gid if drop.gid is not None else -1)
        plan = {
            "argv": list(self.plan.argv),
            "env": self.plan.env,
            "cwd": str(self.plan.cwd),
            "network_namespace": self.cfg.engine.network_namespace,
            "privileges": drop.to_json(),
        }
        plan_r, plan_w = os.pipe()
        report_r, report_w = os.pipe()
        stage2 = [
            sys.executable,
            "-I",
            "-m",
            "runtime.sandbox.exec",
            "--plan-fd",
            str(plan_r),
            "--report-fd",
            str(report_w),
        ]
        try:
            # The plan is small (< pipe buffer), so it is written before the child exists.
            os.write(plan_w, json.dumps(plan).encode())
            os.close(plan_w)
            # The engine's output goes to harness's stderr; stdout carries only events.
            self.proc = subprocess.Popen(
                stage2,
                env=self.plan.env,
                cwd=self.plan.cwd,
                stdin=subprocess.DEVNULL,
                stdout=2,
                stderr=2,
                close_fds=True,
                pass_fds=(plan_r, report_w),
                start_new_session=True,
            )
        except OSError as exc:
            raise EngineError(
                f"cannot start the engine's stage 2 ({sys.executable}): {exc}"
            ) from exc
        finally:
            os.close(plan_r)
            os.close(report_w)
        with os.fdopen(report_r, "rb") as report_file:
            raw = report_file.read()  # EOF at exec (success) or exit (failure)
        report = json.loads(raw) if raw.strip() else {"error": "stage 2 exited without a report"}
        self._report_sandbox(report)
        telemetry.emit(
            "engine_start",
            "ok",
            pid=self.proc.pid,
            socket=str(self.socket),
            device=self.cfg.engine.device,
            argv=list(self.plan.argv[1:]),
            env_names=sorted(self.plan.env),
        )

    def _report_sandbox(self, report: dict[str, Any]) -> None:
        net = report.get("network")
        if net is not None:
            telemetry.emit("network_namespace", "ok" if net["isolated"] else "failed", **net)
        dropped = report.get("privileges")
        if dropped is not None:
            as_root = dropped["uid"] == 0
            telemetry.emit("privilege_drop", "failed" if as_root else "ok", **dropped)
            if as_root and self.cfg.engine.unsafe_run_as_root:
                telemetry.emit(
                    "unsafe_setting",
                    "allowed",
                    setting="engine.unsafe_run_as_root",
                    risk="the engine runs as uid 0 (with no capabilities)",
                )
        if "error" in report:
            self.stop()
            raise SandboxError(
                f"engine sandbox: {report['error']}",
                fix="run harness with the privilege it needs (see README, Sandbox), or relax "
                "the setting named in the error for development only",
            )

    def wait_ready(self) -> None:
        """Poll /health on the Unix socket until it answers 200, the engine dies, or timeout."""
        assert self.proc is not None
        deadline = self.started_at + self.cfg.engine.ready_timeout_s
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://engine", timeout=5) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise EngineError(
                        f"the engine exited with code {code} before it was ready",
                        fix="read the engine's log above (on stderr) for the cause",
                    )
                if self.socket.exists():
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the engine was not ready after {self.cfg.engine.ready_timeout_s:.0f} s",
                        fix="raise engine.ready_timeout_s, or read the engine's log above",
                    )
                time.sleep(0.25)
        telemetry.emit(
            "engine_ready",
            "ok",
            pid=self.proc.pid,
            seconds=round(time.monotonic() - self.started_at, 3),
        )

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> int | None:
        """SIGTERM the engine's process group, wait, then SIGKILL whatever is left."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        deadline = time.monotonic() + self.cfg.engine.stop_timeout_s
        _killpg(pgid, signal.SIGTERM)  # the whole group, even when the API server is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=self.cfg.engine.stop_timeout_s)
        # Give vLLM's children the rest of the stop timeout: its resource tracker unlinks the
        # shared memory it left in /dev/shm (hundreds of MB per run). Then none may survive.
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _killpg(pgid, signal.SIGKILL)
        return self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.paths.root, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
