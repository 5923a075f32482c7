"""A running `harness serve` seen from outside (`Observed`; `Harness`, a process on this
machine; tests.support.container.Container, the image under podman), and the clients tests
talk to it with."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.support import REPO, clean_environ, client_context, free_port, process_group

ENGINE_READY_TIMEOUT = 600


def openai_client(base_url: str, ctx: ssl.SSLContext) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",
        http_client=httpx.Client(verify=ctx, timeout=120),
        max_retries=0,
    )


def engine_lines(log: str) -> list[str]:
    """The engine's own lines in harness's stderr, without their tag (runtime/engine/output.py)."""
    tags = ("engine[stdout]: ", "engine[stderr]: ")
    return [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith(tags)]


class Observed:
    """A running `harness serve` seen from outside: its events (stdout, JSON lines) and log
    (stderr) in files, its process. Harness (a process here) and tests.support.container.Container
    (the image under podman) are both, so that e2e tests take either as their target."""

    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if event_type is None or record["event_type"] == event_type:
                    out.append(record)
        return out

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def engine_pid(self) -> int:
        return self.events("engine_start")[0]["pid"]

    def wait_for_event(self, event_type: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event_type)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"no {event_type} event (exit={self.proc.poll()}); log tail:\n{self.log()[-3000:]}"
        )

    def wait_for(self, event_type: str, timeout: float = 5, **match: Any) -> dict[str, Any]:
        """The latest event of this type whose fields equal `match` (events land a moment
        after the response the client already has)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                e for e in self.events(event_type) if all(e.get(k) == v for k, v in match.items())
            ]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event_type} event matching {match}")
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self.wait_for_event("front_listen", ENGINE_READY_TIMEOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None


class Harness(Observed):
    """One `harness serve` child process; events on stdout, logs on stderr, both to files."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        overrides: list[str] | None = None,
        command: list[str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """`command`: what follows `harness` instead of `serve --config CONFIG`. `prefix`: a
        program harness runs under (POD: uid 10001 without capabilities)."""
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.metrics_url: str | None = None  # set when started with front.metrics_listen
        self.workdir = workdir
        self.stdout_path = workdir / f"harness-{self.port}.events"
        self.stderr_path = workdir / f"harness-{self.port}.log"
        args = [
            *(prefix or []),
            sys.executable,
            "-m",
            "runtime",
            *(command or ["serve", "--config", str(config)]),
            "--set",
            f'front.listen="127.0.0.1:{self.port}"',
        ]
        for item in overrides or []:
            args += ["--set", item]
        env = dict(clean_environ(), HARNESS_TEST_CANARY="must-not-reach-the-engine")
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )

    def python(self, code: str, *args: str) -> str:
        """`python -c CODE ARGS` where harness runs (here, as root), its stdout."""
        command = [sys.executable, "-c", code, *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def engine_group(self) -> list[dict[str, Any]]:
        """The engine's live processes: pid, pgid, state and /proc/PID/status (as
        tests.support.container.Container reports them from inside the image)."""
        out = []
        for pid in process_group(self.engine_pid):
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue  # ended meanwhile
            status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
            out.append({"pid": pid, "pgid": self.engine_pid, "state": "", "status": status})
        return out

    def signal_engine(self, sig: signal.Signals) -> None:
        os.kill(self.engine_pid, sig)

    def gone(self) -> bool:
        """After exit: no engine process is left."""
        return not process_group(self.engine_pid)

    # -- control --------------------------------------------------------------------------
    def send_stop(self) -> None:
        """SIGTERM, without waiting (as the kubelet sends it)."""
        self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Stop for good: SIGTERM first, so vLLM cleans its shared memory out of /dev/shm."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Never leave an engine behind, whatever happened to harness.
        for record in self.events("engine_start"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record["pid"], signal.SIGKILL)


def stand_in_harness(
    demo_dir: Path, workdir: Path, *overrides: str, prefix: list[str] | None = None
) -> Harness:
    """`harness serve` of the demo config with the stand-in engine (tests/support/fake_engine.py),
    HARNESS_FAKE_ENGINE_* passed through to it."""
    from runtime.demo import assets
    from tests.support import fake_engine

    return Harness(
        demo_dir / assets.CONFIG_NAME,
        workdir,
        [
            f'engine.python="{fake_engine.install(workdir)}"',
            'engine.env_passthrough=["HARNESS_FAKE_ENGINE_MB", "HARNESS_FAKE_ENGINE_HOSTILE", '
            '"HARNESS_FAKE_ENGINE_GONE_AFTER"]',
            *overrides,
        ],
        prefix=prefix,
    )


def list_models(harness: Harness, demo_dir: Path) -> httpx.Response:
    """GET /v1/models over mTLS with the demo client certificate (the stand-in engine forks
    its child on the first one)."""
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    with httpx.Client(verify=ctx, timeout=30) as client:
        return client.get(f"{harness.url}/v1/models")
