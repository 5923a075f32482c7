"""The front's overhead: the same load through the front (mTLS) and straight to the engine's
Unix socket, against the same real vLLM CPU engine, in one run.

    .venv/bin/python benchmarks/front_bench.py [--requests 50] [--rounds 8] [--concurrency 1 4 8]
                                               [--pin] [--engine vllm|stand-in]

Non-streamed and streamed completions (fixed 16 tokens, ignore_eos) at several concurrencies;
direct and front runs alternate, round by round (which goes first alternates too), and each
path's requests and time are pooled over the rounds. `--pin` gives the engine's compute
threads a CPU of their own (engine.cpus) and keeps the front and the load generator on the
others, as a deployment should.
Reports throughput ratio (front / direct), the added p50/p99 latency, and the CPU time harness
(the front) spent per request. Goals: ratio >= 0.97, added p50 <= 1 ms for non-streamed
requests. `--engine stand-in` replaces vLLM with an engine that answers at once
(benchmarks/stand_in_engine.py), so that what remains is the front's own cost.
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
import psutil
import stand_in_engine  # next to this script

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


async def bench(
    front_url: str,
    sock: str,
    ctx: ssl.SSLContext,
    harness: psutil.Process,
    args: argparse.Namespace,
) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    direct = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=sock, limits=limits),
        base_url="http://engine",
        timeout=120,
    )
    front = httpx.AsyncClient(verify=ctx, base_url=front_url, timeout=120, limits=limits)
    results = {}
    clients = {"direct": direct, "front": front}
    async with direct, front:
        for client in (direct, front):  # warm both paths
            await run_load(client, "/v1/completions", 10, 2, False)
        for stream in (False, True):
            for concurrency in args.concurrency:
                elapsed = {"direct": 0.0, "front": 0.0}
                latencies: dict[str, list[float]] = {"direct": [], "front": []}
                ratios: list[float] = []
                front_cpu = 0.0
                for round_ in range(args.rounds):
                    # Alternate which path goes first: the engine's own speed drifts.
                    order = ["direct", "front"] if round_ % 2 == 0 else ["front", "direct"]
                    rps: dict[str, float] = {}
                    for name in order:
                        cpu = _cpu_seconds(harness)
                        rps[name], lat = await run_load(
                            clients[name], "/v1/completions", args.requests, concurrency, stream
                        )
                        if name == "front":
                            front_cpu += _cpu_seconds(harness) - cpu
                        elapsed[name] += args.requests / rps[name]
                        latencies[name] += lat
                    ratios.append(rps["front"] / rps["direct"])
                total = args.requests * args.rounds
                d_lat, f_lat = latencies["direct"], latencies["front"]
                results[f"{'stream' if stream else 'plain'}_c{concurrency}"] = {
                    "direct_rps": round(total / elapsed["direct"], 1),
                    "front_rps": round(total / elapsed["front"], 1),
                    "throughput_ratio": round(elapsed["direct"] / elapsed["front"], 3),
                    "round_ratios": f"{min(ratios):.2f}-{max(ratios):.2f}",
                    "added_p50_ms": round((pct(f_lat, 50) - pct(d_lat, 50)) * 1000, 3),
                    "added_p99_ms": round((pct(f_lat, 99) - pct(d_lat, 99)) * 1000, 3),
                    "front_cpu_ms_per_request": round(front_cpu / total * 1000, 3),
                }
    return results


def _cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time of harness (the front, all its threads); the engine is its own
    process group and not counted."""
    times = proc.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50, help="per path and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the engine's compute threads the last CPU (engine.cpus); harness and this "
        "load generator keep to the others",
    )
    parser.add_argument(
        "--engine",
        choices=("vllm", "stand-in"),
        default="vllm",
        help="stand-in: an engine that answers at once, to measure the front's own cost",
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    serve_args: list[str] = []
    if args.pin:  # the engine's compute threads on the last CPU, harness on the others
        serve_args = ["--set", f'engine.cpus="{cores[-1]}"']
    with tempfile.TemporaryDirectory(prefix="front-bench-") as tmp:
        demo = Path(tmp)
        demo.chmod(0o755)  # the engine's non-root uid reads the model from here
        assets.ensure(demo)
        port = free_port()
        events = demo / "events.jsonl"
        if args.engine == "stand-in":
            engine = stand_in_engine.install(demo)
            serve_args += ["--set", f'engine.python="{engine}"']
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
                *serve_args,
            ],
            stdout=events.open("wb"),
            stderr=subprocess.DEVNULL,
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
            if args.pin:  # this load generator shares the front's CPUs, not the engine's
                os.sched_setaffinity(0, set(cores[:-1]))
            ctx = ssl.create_default_context(cafile=str(demo / "pki" / "ca.pem"))
            ctx.load_cert_chain(
                str(demo / "pki" / "client.pem"), str(demo / "pki" / "client-key.pem")
            )
            results = asyncio.run(
                bench(f"https://127.0.0.1:{port}", sock, ctx, psutil.Process(proc.pid), args)
            )
            print(
                json.dumps(
                    {"cores": len(cores), "pinned": args.pin, "engine": args.engine, **results},
                    indent=2,
                )
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)


if __name__ == "__main__":
    main()
