"""The front's overhead: the same load through the front (mTLS) and straight to the engine's
Unix socket, against the same real vLLM CPU engine, in one run.

    .venv/bin/python benchmarks/front_bench.py [--requests 200] [--concurrency 1 4 8] [--pin]

Non-streamed and streamed completions (fixed 16 tokens, ignore_eos) at several concurrencies;
direct and front runs are interleaved. `--pin` gives the engine's compute threads a core of
their own and keeps the front and the load generator on the others, as a deployment should.
Reports throughput ratio (front / direct) and the added p50/p99 latency. Goals: ratio >= 0.97,
added p50 <= 1 ms for non-streamed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from runtime.demo import assets

BODY = {"model": "demo", "prompt": "hello world", "max_tokens": 16, "ignore_eos": True}


async def run_load(
    client: httpx.AsyncClient,
    url: str,
    n: int,
    concurrency: int,
    stream: bool,
    jitter_ms: float = 0.0,
) -> tuple[float, list[float]]:
    """`concurrency` clients, each sending its next request when the last one finished,
    after a pause drawn uniformly from [0, jitter_ms] (the same seeded draws every run)."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    pauses = random.Random(n * 1000 + concurrency)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            if jitter_ms:
                await asyncio.sleep(pauses.uniform(0, jitter_ms) / 1000)
            started = time.perf_counter()
            if stream:
                async with client.stream("POST", url, json={**BODY, "stream": True}) as resp:
                    async for _ in resp.aiter_raw():
                        pass
                    assert resp.status_code == 200
            else:
                resp = await client.post(url, json=BODY)
                assert resp.status_code == 200, resp.text
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started), latencies


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def bench(front_url: str, sock: str, ctx: ssl.SSLContext, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    direct = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=sock, limits=limits),
        base_url="http://engine",
        timeout=120,
    )
    front = httpx.AsyncClient(verify=ctx, base_url=front_url, timeout=120, limits=limits)
    results = {}
    async with direct, front:
        for client in (direct, front):  # warm both paths
            await run_load(client, "/v1/completions", 10, 2, False)
        for stream in (False, True):
            for concurrency in args.concurrency:
                runs: dict[str, list[tuple[float, list[float]]]] = {"direct": [], "front": []}
                for _ in range(args.rounds):
                    for name, client in (("direct", direct), ("front", front)):
                        runs[name].append(
                            await run_load(
                                client, "/v1/completions", args.requests, concurrency, stream
                            )
                        )
                best = {k: max(v, key=lambda r: r[0]) for k, v in runs.items()}
                (d_rps, d_lat), (f_rps, f_lat) = best["direct"], best["front"]
                results[f"{'stream' if stream else 'plain'}_c{concurrency}"] = {
                    "direct_rps": round(d_rps, 1),
                    "front_rps": round(f_rps, 1),
                    "throughput_ratio": round(f_rps / d_rps, 3),
                    "added_p50_ms": round((pct(f_lat, 50) - pct(d_lat, 50)) * 1000, 3),
                    "added_p99_ms": round((pct(f_lat, 99) - pct(d_lat, 99)) * 1000, 3),
                }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the engine's compute threads the last core (VLLM_CPU_OMP_THREADS_BIND) and "
        "keep the front and this load generator on the others",
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    pin_args: list[str] = []
    env = dict(os.environ)
    if args.pin:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[-1])
        pin_args = ["--set", 'engine.env_passthrough=["VLLM_CPU_OMP_THREADS_BIND"]']
    with tempfile.TemporaryDirectory(prefix="front-bench-") as tmp:
        demo = Path(tmp)
        demo.chmod(0o755)  # the engine's non-root uid reads the model from here
        assets.ensure(demo)
        port = free_port()
        events = demo / "events.jsonl"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime",
                "serve",
                "--config",
                str(demo / assets.CONFIG_NAME),
                "--set",
                f'front.listen="127.0.0.1:{port}"',
                "--set",
                "front.max_concurrency=64",
                *pin_args,
            ],
            stdout=events.open("wb"),
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            sock = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                lines = [json.loads(x) for x in events.read_text().splitlines() if x]
                starts = [e for e in lines if e["event_type"] == "engine_start"]
                if any(e["event_type"] == "front_listen" for e in lines):
                    sock = starts[0]["socket"]
                    break
                time.sleep(0.5)
            assert sock, "harness did not become ready"
            if args.pin:  # after the engine started: it keeps every core for its API server
                others = set(cores[:-1])
                for thread in os.listdir(f"/proc/{proc.pid}/task"):
                    os.sched_setaffinity(int(thread), others)
                os.sched_setaffinity(0, others)
            ctx = ssl.create_default_context(cafile=str(demo / "pki" / "ca.pem"))
            ctx.load_cert_chain(
                str(demo / "pki" / "client.pem"), str(demo / "pki" / "client-key.pem")
            )
            results = asyncio.run(bench(f"https://127.0.0.1:{port}", sock, ctx, args))
            print(json.dumps({"cores": len(cores), "pinned": args.pin, **results}, indent=2))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)


if __name__ == "__main__":
    main()
