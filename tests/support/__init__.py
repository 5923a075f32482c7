"""Helpers shared by the tests: a real `harness serve` process and real mTLS clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
ENGINE_READY_TIMEOUT = 600


def clean_environ() -> dict[str, str]:
    """This environment minus secret-like names, which `harness serve` refuses (exit 4)."""
    from runtime.config import SECRET_LIKE

    return {k: v for k, v in os.environ.items() if not SECRET_LIKE.search(k)}


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_context(
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    max_tls: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    if max_tls is not None:
        ctx.maximum_version = max_tls
    return ctx


def raw_request(
    url: str, ctx: ssl.SSLContext, method: str, target: bytes, body: bytes = b""
) -> tuple[int, bytes]:
    """Send a request target byte for byte (HTTP clients normalise `..` and `//`)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    head = (
        f"{method} ".encode() + target + b" HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(head + body)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    if not data:
        raise ConnectionError("the server closed the connection without a response")
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


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
    (stderr) in files, its process. Harness (a process here) and tests.container.Container
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
        tests.container.Container reports them from inside the image)."""
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


def json_values(max_leaves: int) -> st.SearchStrategy[Any]:
    """Any JSON value, nested lists and objects included (hypothesis)."""

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)

    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        containers,
        max_leaves=max_leaves,
    )


# As in a pod: uid 10001, no capabilities at all (setpriv, before harness starts).
POD = [
    "setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", "--inh-caps=-all",
    "--bounding-set=-all",
]  # fmt: skip


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


# The demo's LoRA adapter and draft model (runtime/demo/assets.py), signed with the model's
# key; their folders are as writable as the demo model's.
_DEMO_SIGNATURE = 'method="key", public_key="signing-key.pub"'
LORA_NAME = "demo-lora"
LORA = (
    f'engine.lora=[{{name="{LORA_NAME}", dir="adapter", unsafe_allow_writable=true, '
    f'signature={{path="adapter.sig", {_DEMO_SIGNATURE}}}}}]'
)
DRAFT = (
    'engine.draft={dir="draft", unsafe_allow_writable=true, num_speculative_tokens=3, '
    f'signature={{path="draft.sig", {_DEMO_SIGNATURE}}}}}'
)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real `harness` entry point, in a clean environment, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=REPO,
        env=clean_environ(),
        text=True,
        capture_output=True,
        timeout=timeout,
    )
