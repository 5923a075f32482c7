"""The sandbox's cost: two real vLLM CPU engines from the same config, one with the sandbox
(Landlock + the profiled seccomp filter in `enforce` mode) and one without (both off), same
run, the same load straight to each engine's Unix socket, rounds interleaved.

    .venv/bin/python benchmarks/sandbox_bench.py [--requests 100] [--concurrency 1 4]

Both engines keep the network namespace and the privilege drop, which cost nothing per
request. Reports throughput ratio (sandboxed / unsandboxed) and p50 latencies, and the same
ratio for a loop of syscalls in one process before and after it applies Landlock and the
engine's filter (the cost without the engine's run-to-run noise). Goal: >= 0.99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
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


async def load(sock: str, args: argparse.Namespace) -> dict[str, tuple[float, list[float]]]:
    """One pass of every load shape against one engine."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    transport = httpx.AsyncHTTPTransport(uds=sock, limits=limits)
    out: dict[str, tuple[float, list[float]]] = {}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://engine", timeout=120
    ) as client:
        await run_load(client, "/v1/completions", 10, 2, False)  # warm up
        for stream in (False, True):
            for concurrency in args.concurrency:
                key = f"{'stream' if stream else 'plain'}_c{concurrency}"
                out[key] = await run_load(
                    client, "/v1/completions", args.requests, concurrency, stream
                )
    return out


# The per-syscall cost, without the engine's noise: the same loop of file and socket syscalls
# in a fresh process, with or without Landlock and the engine's filter (enforce), alternated.
_SYSCALL_LOOP = r"""
import json, os, sys, time
from runtime.sandbox import landlock, seccomp

def loop(n=100_000):
    started = time.perf_counter()
    for _ in range(n):
        os.stat("/usr/lib")
        os.getppid()
        os.close(os.dup(1))
    return n / (time.perf_counter() - started)

if sys.argv[2] == "sandbox":
    landlock.apply({"mode": "required", "read": ["/"], "write": [], "devices": ["/dev/null"],
                    "tcp_ports": []})
    plan = {"mode": "enforce", "profile": json.load(open(sys.argv[1])),
            "profile_path": sys.argv[1]}
    _report, compiled = seccomp.prepare(plan)
    listener = seccomp.load(compiled)  # kept open: allowed calls never reach it
print(max(loop() for _ in range(3)))
"""


def syscall_cost(cycles: int = 5) -> dict[str, object]:
    profile = Path(__file__).resolve().parents[1] / "seccomp" / "engine-cpu.json"
    best = {"sandbox": 0.0, "plain": 0.0}
    for _ in range(cycles):
        for variant in best:
            out = subprocess.run(
                [sys.executable, "-c", _SYSCALL_LOOP, str(profile), variant],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            best[variant] = max(best[variant], float(out.stdout))
    return {
        "loops_per_s_sandbox": round(best["sandbox"]),
        "loops_per_s_plain": round(best["plain"]),
        "throughput_ratio": round(best["sandbox"] / best["plain"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cycles", type=int, default=2, help="A/B engine starts, alternated")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the engine's compute threads on the last core, this load generator on the others "
        "(steadier numbers: vLLM's CPU threads spin and suffer from any other work)",
    )
    parser.add_argument(
        "--without",
        choices=["both", "seccomp", "landlock"],
        default="both",
        help="what the unsandboxed engine goes without (default both)",
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    pinning: list[str] = []
    if args.pin:  # the engine's compute threads on the last CPU (engine.cpus)
        pinning = [f'engine.cpus="{cores[-1]}"']
    telemetry.set_stream(open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    runs: dict[str, dict[str, list[tuple[float, list[float]]]]] = {}
    violations: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        demo = Path(tmp)
        demo.chmod(0o755)  # the engine's non-root uid reads the model from here
        assets.ensure(demo)
        config = demo / assets.CONFIG_NAME
        variants = {
            "sandbox": config_mod.load(config, pinning),
            "no_sandbox": config_mod.load(
                config,
                [
                    *pinning,
                    *(['sandbox.seccomp="off"'] if args.without != "landlock" else []),
                    *(['sandbox.landlock="off"'] if args.without != "seccomp" else []),
                ],
            ),
        }
        try:
            # One engine at a time, so that neither takes CPU from the other (2 cores here).
            for _ in range(args.cycles):
                for name, cfg in variants.items():
                    with Engine.create(cfg) as engine:
                        os.sched_setaffinity(0, set(cores))  # the engine inherits this
                        engine.start()
                        engine.wait_ready()
                        if args.pin:
                            os.sched_setaffinity(0, set(cores[:-1]))
                        for key, run in asyncio.run(load(str(engine.socket), args)).items():
                            runs.setdefault(key, {}).setdefault(name, []).append(run)
                        if engine.supervisor is not None:
                            for syscall, count in engine.supervisor.violations.items():
                                violations[syscall] = violations.get(syscall, 0) + count
        finally:
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)
    results: dict[str, object] = {}
    for key, by_variant in runs.items():
        best = {k: max(v, key=lambda r: r[0]) for k, v in by_variant.items()}
        (on_rps, on_lat), (off_rps, off_lat) = best["sandbox"], best["no_sandbox"]
        results[key] = {
            "sandbox_rps": round(on_rps, 1),
            "no_sandbox_rps": round(off_rps, 1),
            "throughput_ratio": round(on_rps / off_rps, 3),
            "sandbox_p50_ms": round(pct(on_lat, 50) * 1000, 2),
            "no_sandbox_p50_ms": round(pct(off_lat, 50) * 1000, 2),
        }
    os.sched_setaffinity(0, set(cores))
    summary = {
        "cores": len(cores),
        "pinned": args.pin,
        "without": args.without,
        "syscalls": syscall_cost(),
        "seccomp_violations": violations,
    }
    print(json.dumps({**summary, **results}, indent=2))


if __name__ == "__main__":
    main()
