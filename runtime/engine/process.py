"""The engine process: start it on its Unix socket, wait until it is ready, stop it.

The engine runs in its own session (process group) so that a terminal's Ctrl+C reaches only
the front, which then drains before stopping the engine, and so that stopping it also stops
vLLM's own children (EngineCore, workers).

Why one module of this size: the engine's life (its runtime dir, namespaces prepared, stage 2
spawned, readiness, its exit status, stop and the kill of its process group) is one sequence
owned by `Engine`; its helpers are small and used nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from runtime import telemetry, vllm_options
from runtime.config import Config
from runtime.engine.command import EnginePlan, RuntimePaths, build_plan
from runtime.engine.output import Relay
from runtime.engine.reaper import Reaper
from runtime.engine.resources import MemoryCaps
from runtime.errors import ConfigError, EngineError, SandboxError
from runtime.sandbox import landlock, namespaces, privileges, stage_plan
from runtime.sandbox.seccomp.bpf import compile_plan, recording_plan
from runtime.sandbox.seccomp.configured import engine_profile
from runtime.sandbox.seccomp.notify import Supervisor
from runtime.sandbox.seccomp.policy import exit_event
from runtime.sandbox.stage_plan import SeccompPlan, StagePlan, StageReport, fields

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


@contextlib.contextmanager
def runtime_dir(cfg: Config) -> Iterator[RuntimePaths]:
    """The engine's private runtime dir, made before the engine (harness confines itself to
    it first) and removed on the way out, whatever happens."""
    paths = make_runtime_dir(cfg)
    try:
        yield paths
    finally:
        shutil.rmtree(paths.root, ignore_errors=True)


def prepare_namespaces(
    cfg: Config, paths: RuntimePaths, wrapper: list[str] | None = None
) -> namespaces.Prepared:
    """The engine's namespaces and root, made by a helper before harness confines itself
    (Landlock forbids mounting to a confined process and everything it starts). The root
    holds what the engine's Landlock rules name. Exit 5 when `required` cannot be met."""
    mount_point = paths.root / ".root"
    if cfg.sandbox.namespaces != "off":
        mount_point.mkdir(mode=0o700, exist_ok=True)
    fence = landlock.build(cfg, paths.root, [])
    drop = privileges.build(cfg.engine, os.geteuid())
    root = namespaces.root_plan(mount_point, fence, cfg.engine.shm_bytes, _harness_files(cfg), drop)
    try:
        return namespaces.prepare(cfg.sandbox.namespaces, root, wrapper)
    except OSError as exc:
        detail = str(exc.strerror).removeprefix("namespaces: ")
        telemetry.emit("namespaces", "failed", mode="required", isolated=False, reason=detail)
        raise SandboxError(
            f"sandbox.namespaces = required, and the engine's namespaces cannot be made: {detail}",
            fix="allow unprivileged user namespaces on the node (user.max_user_namespaces, "
            "AppArmor's userns restriction) and `unshare`/`mount`/`pivot_root`/`setns` in the "
            "container's seccomp profile (docs/sandbox.md, namespaces), or set "
            "sandbox.namespaces = auto",
        ) from exc


def _harness_files(cfg: Config) -> list[str]:
    """What only harness reads: its config, TLS files, signature and trust, secrets."""
    tls, otlp, sig = cfg.front.tls, cfg.telemetry, cfg.model.signature
    files = [cfg.source, tls.cert, tls.key, tls.client_ca, otlp.otlp_ca, otlp.otlp_client_cert]
    files.append(cfg.secrets.dir)
    if sig is not None:
        files += [sig.path, *sig.certificate_chain, sig.public_key, sig.trust_config]
    return [str(p) for p in files if p is not None]


class Engine:
    """A running engine. Use as a context manager: leaving it always stops the engine."""

    def __init__(
        self, cfg: Config, paths: RuntimePaths, plan: EnginePlan, seccomp_mode: str | None = None
    ) -> None:
        self.cfg = cfg
        self.paths = paths
        self.plan = plan
        # Made before harness confined itself (launcher), or at start (profile, tests).
        self.spaces: namespaces.Prepared | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        # `record` (harness profile) overrides the configured mode.
        self.seccomp_mode = seccomp_mode
        self.supervisor: Supervisor | None = None
        self.reaper: Reaper | None = None
        self.errno_ret = errno.EPERM
        # Runs stage 2 under another program (tests: strace, to check a recording).
        self.stage2_wrapper: list[str] = []
        # Why harness stopped the engine on purpose (a watchdog), for the exit's events.
        self.stop_reason: str | None = None
        # The engine's stdout and stderr, relayed as tagged lines (runtime/engine/output.py).
        self.output: list[Relay] = []

    @classmethod
    def create(
        cls,
        cfg: Config,
        caps: MemoryCaps | None = None,
        seccomp_mode: str | None = None,
        paths: RuntimePaths | None = None,
        spaces: namespaces.Prepared | None = None,
    ) -> Engine:
        paths = paths or make_runtime_dir(cfg)
        plan = build_plan(cfg, paths, caps=caps, rendezvous_port=_free_port())
        engine = cls(cfg, paths, plan, seccomp_mode)
        engine.spaces = spaces
        return engine

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.plan.socket

    def _landlock(self) -> landlock.LandlockPlan:
        rules = landlock.build(self.cfg, self.paths.root, list(self.plan.tcp_ports))
        if vllm_options.ranks(self.cfg.engine.vllm) == 1:
            return rules
        # vLLM's workers (tensor/pipeline parallel) meet over gloo, on TCP ports each of them
        # picks. In the engine's own network namespace (lo only, no process but the engine's)
        # every port is the engine's own; outside it they would be the host's.
        assert self.spaces is not None
        if "net" not in self.spaces.fds:
            reason = self.spaces.report.get("reason", "sandbox.namespaces is off")
            raise SandboxError(
                "engine.vllm tensor_parallel_size x pipeline_parallel_size > 1: vLLM's workers "
                "talk over TCP on ports of their choosing, which harness allows only inside "
                f"the engine's own network namespace, and there is none ({reason})",
                fix="allow unprivileged user namespaces (and `unshare` in the container's "
                "seccomp profile; the shipped one does), or serve with one rank",
            )
        return dataclasses.replace(rules, restrict_tcp=False)

    def start(self) -> None:
        """Start stage 2 (runtime.sandbox.exec), which sandboxes itself and execs vLLM."""
        self.started_at = time.monotonic()
        if self.spaces is None:
            self.spaces = prepare_namespaces(self.cfg, self.paths)
        drop = privileges.build(self.cfg.engine, os.geteuid())
        privileges.check_reachable(
            self.cfg.engine, drop, *(section.dir for _label, section in self.cfg.artifacts())
        )
        if drop.uid is not None:  # the engine's private runtime dir becomes the engine's
            for path in (self.paths.root, *self.paths.dirs()):
                os.chown(path, drop.uid, drop.gid if drop.gid is not None else -1)
        spaces = self.spaces.stage2()
        plan = StagePlan(
            argv=list(self.plan.argv),
            env=self.plan.env,
            cwd=str(self.plan.cwd),
            namespaces=spaces,
            privileges=drop,
            landlock=self._landlock(),
            seccomp=self.seccomp_plan(),
        )
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.output = [Relay(out_r, "stdout"), Relay(err_r, "stderr")]
        for relay in self.output:
            relay.start()
        try:
            self.proc, report = spawn_stage2(
                plan,
                wrapper=self.stage2_wrapper,
                on_listener=self._start_supervisor,
                extra_fds=tuple(spaces.fds.values()),
                stdout=out_w,
                stderr=err_w,
            )
        finally:
            self.spaces.release()  # stage 2 holds them now, or nobody needs them
            os.close(out_w)
            os.close(err_w)
        self.reaper = Reaper(self.proc.pid)  # harness gone, however: the engine goes too
        self._report_sandbox(report)
        inside = {}
        if report.namespaces is not None and report.namespaces.pid_in_namespace is not None:
            # stage 2's own process waits outside the PID namespace; vLLM is its child.
            inside["engine_pid"] = _child_of(self.proc.pid)
        telemetry.emit(
            "engine_start",
            "ok",
            pid=self.proc.pid,
            **inside,
            socket=str(self.socket),
            device=self.cfg.engine.device,
            argv=list(self.plan.argv[1:]),
            env_names=sorted(self.plan.env),
        )

    def seccomp_plan(self) -> SeccompPlan:
        mode = self.seccomp_mode or self.cfg.sandbox.seccomp
        if mode == "record":
            return recording_plan()
        if mode == "off":
            return compile_plan("off", {}, "")
        profile, path, _ = engine_profile(self.cfg)
        # The supervisor answers with the profile's own errno, as the kernel would have.
        self.errno_ret = int(profile.get("defaultErrnoRet", errno.EPERM))
        return compile_plan(mode, profile, str(path))

    def _start_supervisor(self, fd: int) -> None:
        mode = self.seccomp_mode or self.cfg.sandbox.seccomp
        self.supervisor = Supervisor(fd, mode, errno_ret=self.errno_ret, report=_violation_event)
        self.supervisor.start()

    def _report_sandbox(self, report: StageReport) -> None:
        entered = report.namespaces
        if entered is not None and self.spaces is not None:
            made = self.spaces.report
            isolated = made["isolated"] and report.error is None
            telemetry.emit("namespaces", "ok" if isolated else "failed", **fields(entered), **made)
        dropped, fenced, filtered = report.privileges, report.landlock, report.seccomp
        if fenced is not None:
            telemetry.emit("landlock", "ok" if fenced.enforced else "failed", **fields(fenced))
        if filtered is not None:
            installed = filtered.get("installed")
            telemetry.emit("seccomp_install", "ok" if installed else "failed", **filtered)
        for mode, setting, risk in (
            (
                fenced.mode if fenced else None,
                "sandbox.landlock = off",
                "harness and the engine may use any path their uids may",
            ),
            (
                filtered["mode"] if filtered else None,
                "sandbox.seccomp = off",
                "the engine may call any syscall the kernel has",
            ),
        ):
            if mode == "off":
                telemetry.emit("unsafe_setting", "allowed", setting=setting, risk=risk)
        if dropped is not None and dropped.uid is not None:  # stage 2 got as far as the drop
            as_root = dropped.uid == 0
            telemetry.emit("privilege_drop", "failed" if as_root else "ok", **fields(dropped))
            if as_root and self.cfg.engine.unsafe_run_as_root:
                telemetry.emit(
                    "unsafe_setting",
                    "allowed",
                    setting="engine.unsafe_run_as_root",
                    risk="the engine runs as uid 0 (with no capabilities)",
                )
        if report.error is not None:
            self.stop()
            raise SandboxError(
                f"engine sandbox: {report.error}",
                fix="run harness with the privilege it needs (see docs/sandbox.md), or relax "
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
                    for relay in self.output:  # its last words, above harness's error
                        relay.join(timeout=2)
                    self.report_sigsys(code)
                    why = f" ({self.stop_reason})" if self.stop_reason else ""
                    raise EngineError(
                        f"the engine exited with code {code} before it was ready{why}",
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
        if self.supervisor is not None:
            probes = self.supervisor.end_startup()
            if probes:  # one info event for vLLM's known startup probes, not an alert each
                mode = self.supervisor.mode
                telemetry.emit(
                    "seccomp_startup_probes",
                    "blocked" if mode == "enforce" else "allowed",
                    mode=mode,
                    probes=probes,
                    meaning="vLLM's known startup probes, answered without an alert while the "
                    "engine started; from now on the same calls are seccomp_violation events",
                )
        telemetry.emit(
            "engine_ready",
            "ok",
            pid=self.proc.pid,
            seconds=round(time.monotonic() - self.started_at, 3),
        )

    def report_sigsys(self, code: int | None) -> None:
        """In `kill` mode the kernel kills a violating process with SIGSYS; say so when it is
        the engine's main process (vLLM's own children are not harness's to wait for)."""
        record = exit_event(code, mode=self.seccomp_mode or self.cfg.sandbox.seccomp)
        if record is not None:
            telemetry.emit("seccomp_violation", "blocked", pid=self.pid, **record)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def namespace_init_gone(self) -> bool:
        """The PID namespace's init ended before harness let it go (its lifeline hung up):
        then the kernel killed the engine with it, and the engine's SIGKILL is init's doing."""
        fd = self.spaces.fds.get("lifeline") if self.spaces is not None else None
        if fd is None:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        return bool(poller.poll(0))  # init never writes: readable means its end is closed

    def exit_status(self) -> int | None:
        """The status of an engine known to have exited (its pidfd said so). poll() answers
        None while another thread (the watchdog, the liveness check) holds Popen's lock for
        its own poll; wait() takes the lock in turn, and the exit is there to collect."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

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
        code = self.proc.wait()
        for relay in self.output:  # its last lines before harness says why it stopped
            relay.join(timeout=2)
        if self.reaper is not None:
            self.reaper.release()
        return code

    def close(self) -> None:
        self.stop()
        if self.spaces is not None:
            self.spaces.close()  # when the start failed before stage 2 took them
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


def spawn_stage2(
    plan: StagePlan,
    *,
    wrapper: list[str] | None = None,
    on_listener: Callable[[int], None],
    stdout: int | IO[bytes] = 2,
    stderr: int = 2,
    extra_fds: tuple[int, ...] = (),
) -> tuple[subprocess.Popen[bytes], StageReport]:
    """Start stage 2 (runtime.sandbox.exec) with `plan` and return it with its report. The
    seccomp listener, when stage 2 sends one, goes to `on_listener` at once: from then on the
    child's filtered syscalls wait for whoever answers it."""
    plan_r, plan_w = os.pipe()
    report_parent, report_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        *(wrapper or []),
        sys.executable,
        "-I",
        "-m",
        "runtime.sandbox.exec",
        "--plan-fd",
        str(plan_r),
        "--report-fd",
        str(report_child.fileno()),
    ]
    try:
        # The plan goes through a pipe the child reads at once; write it from a thread so a
        # plan larger than the pipe buffer (the seccomp profile) cannot block us.
        writer = threading.Thread(target=_write_all, args=(plan_w, stage_plan.to_json(plan)))
        writer.start()
        # The engine's output goes to harness's stderr (the engine: through Relay pipes);
        # stdout carries only events.
        proc = subprocess.Popen(
            argv,
            env=plan.env,
            cwd=plan.cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            close_fds=True,
            pass_fds=(plan_r, report_child.fileno(), *extra_fds),
            start_new_session=True,
        )
    except OSError as exc:
        os.close(plan_w)
        raise EngineError(f"cannot start stage 2 ({sys.executable}): {exc}") from exc
    finally:
        os.close(plan_r)
        report_child.close()
    writer.join()
    chunks: list[bytes] = []
    with report_parent:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(report_parent, 1 << 16, 1)
            for fd in fds:
                on_listener(fd)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    if not raw.strip():
        return proc, StageReport(error="stage 2 exited without a report")
    try:
        return proc, stage_plan.report_from_json(raw)
    except ValueError as exc:  # harness's own code on both ends: a bug, said as such
        return proc, StageReport(error=f"stage 2's report does not parse: {exc}")


def _child_of(pid: int) -> int | None:
    """The first child of `pid` (from /proc: psutil would scan every process)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            first = children.read().split()
    except OSError:
        return None
    return int(first[0]) if first else None


def _free_port() -> int:
    """A loopback port free now, for torch.distributed's rendezvous. In the engine's own
    network namespace nothing else can take it; without one a race is possible, and vLLM
    then moves up within the range Landlock allows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_all(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass  # stage 2 died before reading: its missing report says so


def _violation_event(record: dict[str, Any]) -> None:
    refused = record.get("action") == "refused_eperm"
    telemetry.emit("seccomp_violation", "blocked" if refused else "allowed", **record)


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
