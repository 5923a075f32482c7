"""An engine that answers at once, for `front_bench.py --engine stand-in`: with the engine's
time taken out, what is left of a request through the front is the front's own cost. With a
delay it answers each completion that much later, as a real engine would, but without a real
engine's CPU use and noise: requests then reach the front spaced out, not back to back.

`harness serve` runs it as `engine.python` through the real stage 2 (namespace, Landlock,
privilege drop, seccomp). It answers `/health`, `/v1/models` and `/v1/completions` on the
`--uds` socket with HTTP/1.1 keep-alive: a completion of 16 tokens, or with `"stream": true`
16 server-sent events and `[DONE]`, in chunked encoding as vLLM sends them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPT = r"""
import asyncio, json, signal, sys

argv = sys.argv
uds = argv[argv.index("--uds") + 1]
served = argv[argv.index("--served-model-name") + 1]
TOKENS = 16
DELAY_S = 0.0  # install(delay_s=...)
COMPLETION = json.dumps({
    "id": "cmpl-stand-in", "object": "text_completion", "created": 0, "model": served,
    "choices": [{"index": 0, "text": " tok" * TOKENS, "logprobs": None,
                 "finish_reason": "length", "stop_reason": None}],
    "usage": {"prompt_tokens": 2, "completion_tokens": TOKENS, "total_tokens": TOKENS + 2},
}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": served, "object": "model"}]}).encode()
EVENT = json.dumps({
    "id": "cmpl-stand-in", "object": "text_completion", "created": 0, "model": served,
    "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": None}],
}).encode()


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def whole(body):
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body))


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            if target == b"/v1/completions" and DELAY_S:
                await asyncio.sleep(DELAY_S)  # the engine's time, before the first byte
            if target == b"/v1/completions" and json.loads(body).get("stream"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for _ in range(TOKENS):  # one write per token, as a generating engine does
                    writer.write(chunk(b"data: " + EVENT + b"\n\n"))
                    await writer.drain()
                    await asyncio.sleep(0)
                writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            elif target == b"/v1/completions":
                writer.write(whole(COMPLETION))
            elif target == b"/v1/models":
                writer.write(whole(MODELS))
            else:
                writer.write(whole(b"{}"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main():
    server = await asyncio.start_unix_server(handle, uds)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


asyncio.run(main())
"""


def install(folder: Path, delay_s: float = 0.0) -> Path:
    """Write the executable script into `folder` (which the engine's uid must traverse);
    it answers each completion after `delay_s`."""
    path = folder / "stand-in-engine"
    # The base interpreter, not the venv's: the script needs only the standard library, and
    # Landlock lets the engine read only the system and `engine.python` (this script).
    python = os.path.realpath(sys.executable)
    script = SCRIPT.replace("DELAY_S = 0.0", f"DELAY_S = {float(delay_s)!r}", 1)
    path.write_text(f"#!{python} -I\n{script}", encoding="utf-8")
    path.chmod(0o755)
    return path
