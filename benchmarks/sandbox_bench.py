"""The sandbox's cost: two real vLLM CPU engines from the same config, one with the sandbox
(Landlock + the profiled seccomp filter in `enforce` mode) and one without (both off), running
at once, the same load straight to each engine's Unix socket in short alternating rounds.

    .venv/bin/python benchmarks/sandbox_bench.py [--requests N] [--rounds 40]
                                                 [--concurrency 1 4] [--pin] [--keep-awake]

Both engines keep the network namespace and the privilege drop, which cost nothing per
request. Reports throughput ratio (sandboxed / unsandboxed) and the added p50, each with a
95 % interval (bootstrap over rounds, as front_bench.py), and the same ratio for a loop of
syscalls in one process before and after it applies Landlock and the engine's filter (the
cost without the engine's noise). Goal: >= 0.99.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from front_bench import BODY, WARM_UP, Round, added, bootstrap, keep_awake, pooled_ratio
from load_client import Client, Target, completion

from runtime import config as config_mod
from runtime import telemetry
from runtime.demo import assets
from runtime.engine.process import Engine


async def compare(socks: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    """Every load shape against both engines, alternating in short rounds (which engine goes
    first alternates too), pooled, with 95 % intervals from a bootstrap over rounds."""
    results: dict[str, object] = {}
    for stream in (False, True):
        request = completion({**BODY, "stream": True} if stream else BODY)
        for concurrency in args.concurrency:
            clients = {name: Client(Target(uds=sock), concurrency) for name, sock in socks.items()}
            for client in clients.values():  # warm up
                await client.run(request, WARM_UP * concurrency, concurrency)
            requests = args.requests or max(10, 3 * concurrency)
            rounds: list[Round] = []
            for i in range(args.rounds):
                this = Round()
                for name in list(socks)[:: 1 if i % 2 == 0 else -1]:
                    rps, lat = await clients[name].run(request, requests, concurrency)
                    this.elapsed[name] = requests / rps
                    this.latencies[name] = lat
                rounds.append(this)
            for client in clients.values():
                client.close()
            total = requests * args.rounds
            ratio_ci, p50_ci = bootstrap(rounds, "no_sandbox", "sandbox")
            results[f"{'stream' if stream else 'plain'}_c{concurrency}"] = {
                "sandbox_rps": round(total / sum(r.elapsed["sandbox"] for r in rounds), 1),
                "no_sandbox_rps": round(total / sum(r.elapsed["no_sandbox"] for r in rounds), 1),
                "throughput_ratio": round(pooled_ratio(rounds, "no_sandbox", "sandbox"), 3),
                "throughput_ratio_ci95": "{:.3f} to {:.3f}".format(*ratio_ci),
                "added_p50_ms": round(added(rounds, 50, "no_sandbox", "sandbox") * 1000, 2),
                "added_p50_ms_ci95": "{:.2f} to {:.2f}".format(*(x * 1000 for x in p50_ci)),
            }
    return results


# The per-syscall cost, without the engine's noise: the same loop of file and socket syscalls
# in a fresh process, with or without Landlock and the engine's filter (enforce), alternated.
_SYSCALL_LOOP = r"""
import json, os, sys, time
from runtime.sandbox import _linux, landlock
from runtime.sandbox.seccomp import bpf
from runtime.sandbox.stage_plan import LandlockPlan

def loop(n=100_000):
    started = time.perf_counter()
    for _ in range(n):
        os.stat("/usr/lib")
        os.getppid()
        os.close(os.dup(1))
    return n / (time.perf_counter() - started)

if sys.argv[2] == "sandbox":
    plan = bpf.compile_plan("enforce", json.load(open(sys.argv[1])), sys.argv[1])
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    landlock.apply(LandlockPlan(mode="required", read=["/"], devices=["/dev/null"]))
    # The listener stays open: allowed calls never reach it.
    listener = _linux.seccomp_filter(plan.bpf, listener=plan.notify)
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
    parser.add_argument(
        "--requests", type=int, help="per engine and round (default: 3 per client, at least 10)"
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--keep-awake",
        action="store_true",
        help="a lowest-priority busy loop on every CPU (see front_bench.keep_awake)",
    )
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
        spinners: list[subprocess.Popen[bytes]] = []
        try:
            with contextlib.ExitStack() as stack:
                # Both engines at once: an idle vLLM CPU engine sleeps, so the load can switch
                # between them every few requests, and the engine's drift falls on both alike.
                engines = {}
                for name, cfg in variants.items():
                    engines[name] = stack.enter_context(Engine.create(cfg))
                    os.sched_setaffinity(0, set(cores))  # the engine inherits this
                    engines[name].start()
                for engine in engines.values():
                    engine.wait_ready()
                if args.keep_awake:
                    spinners = keep_awake(cores)
                if args.pin:
                    os.sched_setaffinity(0, set(cores[:-1]))
                results = uvloop.run(
                    compare({name: str(e.socket) for name, e in engines.items()}, args)
                )
                for engine in engines.values():
                    if engine.supervisor is not None:
                        for syscall, count in engine.supervisor.violations.items():
                            violations[syscall] = violations.get(syscall, 0) + count
        finally:
            for spinner in spinners:
                spinner.kill()
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)
    os.sched_setaffinity(0, set(cores))
    summary = {
        "cores": len(cores),
        "pinned": args.pin,
        "kept_awake": args.keep_awake,
        "without": args.without,
        "syscalls": syscall_cost(),
        "seccomp_violations": violations,
    }
    print(json.dumps({**summary, **results}, indent=2))


if __name__ == "__main__":
    main()
