"""A CUDA stand-in for vLLM's OpenAI server, built on torch, for the tests in tests/gpu.

vLLM's CUDA build cannot be installed on every GPU machine the tests run on; the driver and
torch can. This program is what harness starts as `engine.python`, through the real stage 2
(network namespace, no_new_privs, Landlock with the /dev/nvidia* rules, privilege drop,
seccomp), and it does to the kernel what vLLM's CUDA processes do:
- two processes, as vLLM's API server and EngineCore: the API process answers HTTP on the
  `--uds` socket and tokenizes (no CUDA); the core, started with multiprocessing's spawn as
  vLLM starts its EngineCore, owns the GPU;
- the core loads the model's safetensors onto the device and generates greedily with the
  tiny Llama's real forward pass (embedding, RMSNorm, rotary attention, SiLU MLP, LM head:
  cuBLAS and CUDA kernels), and copies results back through pinned host memory on a stream;
- driver ioctls, device mmaps, the driver's own threads, a CUDA context per process.

It answers `/health`, `/v1/models`, `/v1/completions` and `/v1/chat/completions` (streamed or
not, `n`, prompt lists), and refuses an unknown model (404) and a prompt over the context
(400), as vLLM does. The core reports what it saw (uid, device, each /dev/nvidia* open,
errors) as one line `cuda-engine {json}` on stderr, which harness writes to its log. Where
CUDA cannot start (no device, or the sandbox refuses it) the core says so and runs on the CPU,
so that a test can still read the report from an engine that became ready.

`install()` writes it as an executable script for `engine.python`, with its SETTINGS: the GPU
memory the core holds on top (for the memory-cap test), and the device files to try to open
as harness saw them (Landlock hides the listing of /dev from the engine).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MARKER = "cuda-engine "
# install() rewrites the next line.
SETTINGS: dict[str, Any] = {"hold_mb": 0, "devices": []}


# --- the core: owns the GPU ------------------------------------------------------------------


class TinyLlama:
    """The demo model's forward pass (Llama: pre-norm, rotary attention, gated SiLU MLP)."""

    def __init__(self, model_dir: Path, device: str) -> None:
        import torch
        from safetensors.torch import load_file

        self.torch = torch
        self.device = torch.device(device)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.head_dim = cfg["hidden_size"] // self.heads
        self.eps = cfg["rms_norm_eps"]
        self.eos = cfg.get("eos_token_id")
        self.max_len = cfg["max_position_embeddings"]
        files = sorted(model_dir.glob("*.safetensors"))
        self.w: dict[str, Any] = {}
        for path in files:
            self.w.update(load_file(str(path), device=str(self.device)))
        half = torch.arange(0, self.head_dim, 2, device=self.device, dtype=torch.float32)
        inv_freq = 1.0 / (cfg.get("rope_theta", 10000.0) ** (half / self.head_dim))
        angles = torch.outer(torch.arange(self.max_len, device=self.device), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()
        # Results come back through pinned (page-locked) host memory, as vLLM copies them.
        self.out = torch.empty(self.max_len, dtype=torch.int64, pin_memory=self.on_gpu)
        self.stream = torch.cuda.Stream() if self.on_gpu else None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def _norm(self, x: Any, weight: Any) -> Any:
        torch = self.torch
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x: Any) -> Any:
        torch = self.torch
        n = x.shape[1]
        first, second = x.chunk(2, dim=-1)
        return x * self.cos[:n] + torch.cat([-second, first], dim=-1) * self.sin[:n]

    def logits(self, ids: Any) -> Any:
        torch, w, n = self.torch, self.w, ids.shape[0]
        x = w["model.embed_tokens.weight"][ids]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])

            def split(name: str, h: Any = h, p: Any = p) -> Any:
                y = h @ w[p + f"self_attn.{name}.weight"].T
                return y.view(n, self.heads, self.head_dim).transpose(0, 1)

            q, k, v = self._rope(split("q_proj")), self._rope(split("k_proj")), split("v_proj")
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + att.transpose(0, 1).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        return self._norm(x[-1], w["model.norm.weight"]) @ w["lm_head.weight"].T

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        torch = self.torch
        on_stream = torch.cuda.stream(self.stream) if self.on_gpu else contextlib.nullcontext()
        with torch.inference_mode(), on_stream:
            ids = torch.tensor(prompt, device=self.device)
            made = []
            for _ in range(min(max_tokens, self.max_len - len(prompt))):
                token = self.logits(ids).argmax().reshape(1)
                made.append(token)
                ids = torch.cat([ids, token])
                if self.eos is not None and int(token) == self.eos:
                    break
            if not made:
                return []
            tokens = torch.cat(made)
            self.out[: len(made)].copy_(tokens, non_blocking=True)
            if self.stream is not None:
                self.stream.synchronize()
            return self.out[: len(made)].tolist()


def _open_devices(devices: list[str]) -> dict[str, str]:
    opened = {}
    for path in devices:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            opened[path] = "ok"
        except OSError as exc:
            opened[path] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return opened


def _start_core(model_dir: Path, hold_mb: int) -> tuple[dict[str, Any], TinyLlama, Any]:
    """The model on the GPU, or on the CPU with the reason; and the memory held on top."""
    import torch

    report: dict[str, Any] = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "torch": torch.__version__,
        "open": _open_devices(SETTINGS["devices"]),
        "ok": False,
    }
    held = None
    try:
        torch.cuda.init()  # raises with the driver's reason, where is_available() says False
        report["device"] = torch.cuda.get_device_name(0)
        report["cuda"] = torch.version.cuda
        model = TinyLlama(model_dir, "cuda")
        size = 64 << 20
        probe = torch.full((size,), 0xA5, dtype=torch.uint8, device="cuda")
        back = torch.empty(4096, dtype=torch.uint8, pin_memory=True)
        back.copy_(probe[-4096:], non_blocking=True)
        torch.cuda.synchronize()
        report["readback"] = bool((back == 0xA5).all())
        del probe
        if hold_mb:
            held = torch.ones(hold_mb << 20, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
        report["held_mb"] = hold_mb
        report["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
        report["ok"] = report["readback"]
    except Exception as exc:  # reported, then served from the CPU (see the module docstring)
        report["error"] = f"{type(exc).__name__}: {exc}"
        model = TinyLlama(model_dir, "cpu")
    report["model_device"] = str(model.device)
    return report, model, held


def core(conn: Any, model_dir: str, hold_mb: int) -> None:
    """The engine-core process: one request at a time from the API process."""
    report, model, _held = _start_core(Path(model_dir), hold_mb)
    report["check"] = model.generate([1, 5, 9], 4)  # one full generation before ready
    conn.send(report)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        started = time.monotonic()
        tokens = model.generate(*request)
        conn.send((tokens, time.monotonic() - started))


# --- the API process: HTTP on the Unix socket, no CUDA ---------------------------------------


class Api:
    def __init__(self, argv: list[str]) -> None:
        import multiprocessing

        from tokenizers import Tokenizer

        def arg(name: str, default: str | None = None) -> str:
            return argv[argv.index(name) + 1] if name in argv else str(default)

        self.uds = arg("--uds")
        self.served = arg("--served-model-name")
        self.model_dir = Path(arg("--model"))
        self.max_model_len = int(arg("--max-model-len", "256"))
        override = json.loads(arg("--override-generation-config", "{}"))
        self.max_new = int(override.get("max_new_tokens", 16))
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        ctx = multiprocessing.get_context("spawn")  # vLLM's choice once CUDA is involved
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=core, args=(child, str(self.model_dir), SETTINGS["hold_mb"]), name="EngineCore"
        )
        self.proc.start()
        child.close()
        self.report = self.conn.recv()
        self.lock = threading.Lock()

    def generate(self, prompt: str, max_tokens: int) -> tuple[list[int], str]:
        ids = self.tokenizer.encode(prompt).ids or [1]
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {len(ids) + max_tokens} tokens."
            )
        with self.lock:
            self.conn.send((ids, max_tokens))
            tokens, _seconds = self.conn.recv()
        return tokens, self.tokenizer.decode(tokens)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(timeout=10)


def _error(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, bodies framed by length or chunks
    api: Api

    def address_string(self) -> str:
        return "engine"

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream(self, events: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in [*(json.dumps(e) for e in events), "[DONE]"]:
            data = f"data: {event}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            model = {"id": self.api.served, "object": "model", "max_model_len": 256}
            self.reply(200, {"object": "list", "data": [model]})
        elif self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.reply(404, _error(404, "NotFoundError", "Not Found"))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self.reply(404, _error(404, "NotFoundError", "Not Found"))
            return
        if body.get("model") != self.api.served:
            message = f"The model `{body.get('model')}` does not exist."
            self.reply(404, _error(404, "NotFoundError", message))
            return
        chat = self.path == "/v1/chat/completions"
        if chat:
            prompts = ["\n".join(str(m.get("content", "")) for m in body.get("messages", []))]
        else:
            prompt = body.get("prompt", "")
            prompts = prompt if isinstance(prompt, list) else [prompt]
        n = int(body.get("n") or 1)
        max_tokens = min(int(body.get("max_tokens") or self.api.max_new), self.api.max_new)
        try:
            results = [self.api.generate(str(p), max_tokens) for p in prompts]
        except ValueError as exc:
            self.reply(400, _error(400, "BadRequestError", str(exc)))
            return
        self.answer(body, chat, [r for r in results for _ in range(n)], max_tokens)

    def answer(
        self, body: dict[str, Any], chat: bool, results: list[tuple[list[int], str]], cap: int
    ) -> None:
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": f"cmpl-{os.urandom(8).hex()}", "created": int(time.time())}
        base["model"] = self.api.served
        finish = ["length" if len(t) >= cap else "stop" for t, _ in results]
        if body.get("stream"):
            events = []
            for index, (_tokens, text) in enumerate(results):
                part = {"delta": {"content": text}} if chat else {"text": text}
                events.append({**base, "object": f"{kind}.chunk", "choices": [
                    {"index": index, **part, "finish_reason": finish[index]}
                ]})  # fmt: skip
            self.stream(events)
            return
        choices = []
        for index, (_tokens, text) in enumerate(results):
            part = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": index, **part, "finish_reason": finish[index]})
        made = sum(len(t) for t, _ in results)
        usage = {"prompt_tokens": 1, "completion_tokens": made, "total_tokens": made + 1}
        self.reply(200, {**base, "object": kind, "choices": choices, "usage": usage})


class Server(ThreadingHTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "engine", 0


def main(argv: list[str]) -> int:
    import signal

    api = Api(argv)
    print(MARKER + json.dumps(api.report), file=sys.stderr, flush=True)
    Handler.api = api
    server = Server(api.uds, Handler)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    server.server_close()
    api.close()
    return 0


def device_files() -> list[str]:
    """The NVIDIA device files as harness sees them (not the folder /dev/nvidia-caps)."""
    import glob

    return sorted(p for p in glob.glob("/dev/nvidia*") if not os.path.isdir(p))


def install(folder: Path, name: str = "cuda-engine", hold_mb: int = 0) -> Path:
    """Write this program as an executable script into `folder` (which the engine's uid must
    traverse), for `engine.python`. It runs on this interpreter (the environment torch is in),
    in isolated mode as harness runs vLLM."""
    devices = device_files()
    source = Path(__file__).read_text(encoding="utf-8")
    line = 'SETTINGS: dict[str, Any] = {"hold_mb": 0, "devices": []}\n'
    assert source.count(line) == 1
    settings = {"hold_mb": hold_mb, "devices": devices}
    source = source.replace(line, f"SETTINGS: dict[str, Any] = {settings!r}\n")
    path = folder / name
    path.write_text(f"#!{sys.executable} -I\n{source}", encoding="utf-8")
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
