"""The sandbox's cost: two real vLLM CPU engines from the same config, one with the sandbox
(Landlock + the profiled seccomp filter in `enforce` mode) and one without (both off), same
run, the same load straight to each engine's Unix socket, rounds interleaved.

    .venv/bin/python benchmarks/sandbox_bench.py [--requests 100] [--concurrency 1 4]

Both engines keep the network namespace and the privilege drop, which cost nothing per
request. Reports throughput ratio (sandboxed / unsandboxed) and p50 latencies. Goal: >= 0.99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from front_bench import pct, run_load

from runtime import config as config_mod
from runtime import telemetry
from runtime.demo import assets
from runtime.engine.process import Engine


async def bench(sockets: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    clients = {
        name: httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=sock, limits=limits),
            base_url="http://engine",
            timeout=120,
        )
        for name, sock in sockets.items()
    }
    results: dict[str, object] = {}
    try:
        for client in clients.values():
            await run_load(client, "/v1/completions", 10, 2, False)  # warm up
        for stream in (False, True):
            for concurrency in args.concurrency:
                runs: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in clients}
                for _ in range(args.rounds):
                    for name, client in clients.items():
                        runs[name].append(
                            await run_load(
                                client, "/v1/completions", args.requests, concurrency, stream
                            )
                        )
                best = {k: max(v, key=lambda r: r[0]) for k, v in runs.items()}
                (on_rps, on_lat), (off_rps, off_lat) = best["sandbox"], best["no_sandbox"]
                results[f"{'stream' if stream else 'plain'}_c{concurrency}"] = {
                    "sandbox_rps": round(on_rps, 1),
                    "no_sandbox_rps": round(off_rps, 1),
                    "throughput_ratio": round(on_rps / off_rps, 3),
                    "sandbox_p50_ms": round(pct(on_lat, 50) * 1000, 2),
                    "no_sandbox_p50_ms": round(pct(off_lat, 50) * 1000, 2),
                }
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    telemetry.set_stream(open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        demo = Path(tmp)
        demo.chmod(0o755)  # the engine's non-root uid reads the model from here
        assets.ensure(demo)
        config = demo / assets.CONFIG_NAME
        variants = {
            "sandbox": config_mod.load(config),
            "no_sandbox": config_mod.load(
                config, ['sandbox.seccomp="off"', 'sandbox.landlock="off"']
            ),
        }
        engines = {name: Engine.create(cfg) for name, cfg in variants.items()}
        try:
            for engine in engines.values():
                engine.start()
            for engine in engines.values():
                engine.wait_ready()
            sockets = {name: str(engine.socket) for name, engine in engines.items()}
            results = asyncio.run(bench(sockets, args))
            violations = engines["sandbox"].supervisor
            print(
                json.dumps(
                    {
                        "cores": len(os.sched_getaffinity(0)),
                        "seccomp_violations": dict(violations.violations) if violations else {},
                        **results,
                    },
                    indent=2,
                )
            )
        finally:
            for engine in engines.values():
                engine.close()
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)


if __name__ == "__main__":
    main()
