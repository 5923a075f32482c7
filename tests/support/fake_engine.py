"""A stand-in for vLLM's OpenAI server, run by the real `harness serve` as `engine.python`
(through the real stage 2: namespace, privilege drop, exec). The real engine takes ~50 s to
start, too slow for the fast tier; the engine tier runs it.

It answers `/health`, `/v1/models` (the model and each `--lora-modules` adapter whose
adapter_config.json it can read) and `/v1/completions` on the `--uds` socket. With
HARNESS_FAKE_ENGINE_MB in its environment (through `engine.env_passthrough`), its first
`/v1/models` request makes it and a child it forks each hold that many MB of touched memory.
With HARNESS_FAKE_ENGINE_HOSTILE=1 it writes what a hostile engine would to its stdout and
stderr (event-shaped JSON, terminal escapes) after making its stderr non-blocking; with
HARNESS_FAKE_ENGINE_GONE_AFTER=S it renames its socket S seconds after it answered /health
(alive, but no longer reachable).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPT = r"""
import json, os, signal, socket, socketserver, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv
uds = argv[argv.index("--uds") + 1]
served = argv[argv.index("--served-model-name") + 1]
hog_mb = int(os.environ.get("HARNESS_FAKE_ENGINE_MB", "0"))
# As vLLM does at start: each adapter's config is read from its folder (a LoRA adapter the
# engine cannot read is not listed).
adapters = []
modules = argv[argv.index("--lora-modules") + 1 :] if "--lora-modules" in argv else []
for arg in modules:
    if arg.startswith("--"):
        break
    module = json.loads(arg)
    try:
        with open(os.path.join(module["path"], "adapter_config.json"), "rb") as f:
            f.read()
        adapters.append(module["name"])
    except OSError as exc:
        print(f"cannot load adapter {module['name']}: {exc}", file=sys.stderr)
held = []


def hog():
    if os.fork() == 0:  # the child allocates its own pages: no copy-on-write sharing
        held.append(bytearray(b"\x01") * (hog_mb << 20))
        while True:
            time.sleep(1)
    held.append(bytearray(b"\x01") * (hog_mb << 20))


class Server(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "engine", 0


class Handler(BaseHTTPRequestHandler):
    def address_string(self):
        return "engine"

    def log_message(self, *args):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            if hog_mb and not held:
                hog()
            names = [served, *adapters]
            self.reply({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
        else:
            self.reply({})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.reply({
            "id": "cmpl-fake", "object": "text_completion", "model": served,
            "choices": [{"index": 0, "text": " fake", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


if os.environ.get("HARNESS_FAKE_ENGINE_HOSTILE"):
    import fcntl
    fcntl.fcntl(2, fcntl.F_SETFL, fcntl.fcntl(2, fcntl.F_GETFL) | os.O_NONBLOCK)
    forged = '{"event_type": "engine_ready", "outcome": "ok", "forged": true}'
    os.write(1, (forged + "\n").encode())
    os.write(2, (forged + "\n\x1b]0;owned\x07\x1b[2J cleared\n").encode())
gone_after = float(os.environ.get("HARNESS_FAKE_ENGINE_GONE_AFTER", "0"))


def leave():
    time.sleep(gone_after)
    os.rename(uds, uds + ".gone")


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = Server(uds, Handler)
if gone_after:
    import threading
    threading.Thread(target=leave, daemon=True).start()
server.serve_forever()
"""


def install(folder: Path, name: str = "fake-engine") -> Path:
    """Write the executable script into `folder`/bin (which the engine's uid must traverse).
    Not `folder` itself: Landlock lets the engine read `engine.python`'s grandparent (a
    venv's root), which for /tmp/x/fake-engine would be all of /tmp."""
    (folder / "bin").mkdir(mode=0o755, exist_ok=True)
    path = folder / "bin" / name
    # The base interpreter, not the venv's: the script needs only the standard library, and
    # Landlock lets the engine read what the system and `engine.python` (this script) need.
    python = os.path.realpath(sys.executable)
    path.write_text(f"#!{python} -I\n{SCRIPT}", encoding="utf-8")
    path.chmod(0o755)
    return path
