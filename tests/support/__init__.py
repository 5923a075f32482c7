"""What the tests share that needs only the standard library: the repository, clean environments,
ports, mTLS clients, the harness command line and the demo's signed extras. The heavier helpers
are in harness.py (a running `harness serve`), front.py, strategies.py and the others here."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


# As in a pod: uid 10001, no capabilities at all (setpriv, before harness starts).
POD = [
    "setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", "--inh-caps=-all",
    "--bounding-set=-all",
]  # fmt: skip


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
