"""The front's overhead: the same load through the front (mTLS) and straight to the engine's
Unix socket, against the same real vLLM CPU engine, in one run.

    .venv/bin/python benchmarks/front_bench.py [--requests N] [--rounds 160] [--concurrency 1 4 8]
                                               [--kinds plain stream] [--max-tokens 16|8-24]
                                               [--pin] [--keep-awake] [--engine vllm|stand-in]
                                               [--stand-in-delay-ms MS]
                                               [--baselines relay httptools uvicorn]

Non-streamed and streamed completions (16 tokens each, ignore_eos; `--max-tokens 8-24` varies
the length per request, the same sequence in both paths) at several concurrencies;
direct and front runs alternate in short rounds (which goes first alternates too), and each
path's requests and time are pooled over the rounds. The load generator is
benchmarks/load_client.py (keep-alive connections, 0.1-0.7 ms of CPU per request). `--pin`
gives the engine's compute threads a CPU of their own (engine.cpus) and keeps the front and
the load generator on the others, as a deployment should. `--keep-awake` keeps idle virtual
CPUs from halting (see keep_awake()).
Reports throughput ratio (front / direct), the added p50/p99 latency, 95 % intervals of the
ratio and the added p50 (a bootstrap over whole rounds), and the CPU time harness (the front)
and the load generator spent per request. Goals: ratio >= 0.97, added p50 <= 1 ms for
non-streamed requests.
`--engine stand-in` replaces vLLM with an engine that answers at once
(benchmarks/stand_in_engine.py), so that what remains is the front's own cost.
`--baselines` adds fronts that do less (benchmarks/baseline_fronts.py) to the same rounds:
a bare mTLS byte relay (`relay`), HTTP on httptools without ASGI (`httptools`) and uvicorn
forwarding through harness's engine client with no controls (`uvicorn`). Each gets its own
added p50 and ratio against the direct path, so the front's cost splits into the floor, the
HTTP server and harness's controls.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import stand_in_engine  # next to this script
import uvloop
from load_client import Client, Target, completion

from runtime.demo import assets

BODY = {"model": "demo", "prompt": "hello world", "ignore_eos": True}
# Requests per client through each path before a load shape is timed.
WARM_UP = 10


def token_counts(text: str) -> list[int]:
    """`16` -> [16]; `8-24` -> 8..24 in a fixed shuffled order."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    counts = list(range(int(match[1]), int(match[2] or match[1]) + 1)) if match else []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text}: want N or LOW-HIGH, 1 <= LOW <= HIGH")
    random.Random(0).shuffle(counts)
    return counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def bench(
    targets: dict[str, Target],
    processes: dict[str, psutil.Process],
    args: argparse.Namespace,
) -> dict:
    """`targets`: "direct", "front" and any baselines; `processes`: whose CPU time each path
    but the direct one costs."""
    results = {}
    for stream in [s == "stream" for s in args.kinds]:
        prepared = [
            completion({**BODY, "max_tokens": tokens, "stream": stream})
            for tokens in args.max_tokens
        ]
        for concurrency in args.concurrency:
            # Fresh connections per load shape: the front closes idle ones after 5 s.
            clients = {name: Client(target, concurrency) for name, target in targets.items()}
            # Warm both paths: the engine's first batches of a new size are slow.
            for client in clients.values():
                await client.run(prepared, WARM_UP * concurrency, concurrency)
            rounds: list[Round] = []
            requests = args.requests or max(10, 3 * concurrency)
            cpu_spent = dict.fromkeys(processes, 0.0)
            own_cpu = _cpu_seconds(psutil.Process())
            names = list(targets)
            for round_ in range(args.rounds):
                # Rotate which path goes first: the engine's own speed drifts.
                shift = round_ % len(names)
                order = names[shift:] + names[:shift]
                this = Round()
                for name in order:
                    proc = processes.get(name)
                    cpu = _cpu_seconds(proc) if proc else 0.0
                    rps, lat = await clients[name].run(prepared, requests, concurrency)
                    if proc:
                        cpu_spent[name] += _cpu_seconds(proc) - cpu
                    this.elapsed[name] = requests / rps
                    this.latencies[name] = lat
                rounds.append(this)
            own_cpu = _cpu_seconds(psutil.Process()) - own_cpu
            for client in clients.values():
                client.close()
            total = requests * args.rounds
            ratios = [r.elapsed["direct"] / r.elapsed["front"] for r in rounds]
            ratio_ci, p50_ci = bootstrap(rounds)
            row = results[f"{'stream' if stream else 'plain'}_c{concurrency}"] = {
                "direct_rps": round(total / sum(r.elapsed["direct"] for r in rounds), 1),
                "front_rps": round(total / sum(r.elapsed["front"] for r in rounds), 1),
                "throughput_ratio": round(pooled_ratio(rounds), 3),
                "throughput_ratio_ci95": "{:.3f} to {:.3f}".format(*ratio_ci),
                "round_ratios": f"{min(ratios):.2f}-{max(ratios):.2f}",
                "added_p50_ms": round(added(rounds, 50) * 1000, 3),
                "added_p50_ms_ci95": "{:.2f} to {:.2f}".format(*(x * 1000 for x in p50_ci)),
                "added_p99_ms": round(added(rounds, 99) * 1000, 3),
                "front_cpu_ms_per_request": round(cpu_spent["front"] / total * 1000, 3),
                "load_generator_cpu_ms_per_request": round(
                    own_cpu / (len(names) * total) * 1000, 3
                ),
            }
            for name in names[2:]:  # the baselines, against the same direct path
                (low, high), (p50_low, p50_high) = bootstrap(rounds, other=name)
                row[name] = {
                    "throughput_ratio": round(pooled_ratio(rounds, other=name), 3),
                    "throughput_ratio_ci95": f"{low:.3f} to {high:.3f}",
                    "added_p50_ms": round(added(rounds, 50, other=name) * 1000, 3),
                    "added_p50_ms_ci95": f"{p50_low * 1000:.2f} to {p50_high * 1000:.2f}",
                    "cpu_ms_per_request": round(cpu_spent[name] / total * 1000, 3),
                }
    return results


@dataclasses.dataclass
class Round:
    """One round: each path's wall time for the same requests, and their latencies."""

    elapsed: dict[str, float] = dataclasses.field(default_factory=dict)
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def pooled_ratio(rounds: list[Round], base: str = "direct", other: str = "front") -> float:
    """Throughput of `other` (the front) over that of `base` (direct), requests and time
    pooled."""
    return sum(r.elapsed[base] for r in rounds) / sum(r.elapsed[other] for r in rounds)


def added(rounds: list[Round], q: int, base: str = "direct", other: str = "front") -> float:
    """`other`'s percentile latency minus `base`'s, over the pooled requests."""
    return pct([x for r in rounds for x in r.latencies[other]], q) - pct(
        [x for r in rounds for x in r.latencies[base]], q
    )


def bootstrap(
    rounds: list[Round], base: str = "direct", other: str = "front", n: int = 2000
) -> tuple[tuple[float, float], ...]:
    """95 % intervals of the pooled ratio and the added p50, resampling whole rounds (each
    holds both paths under the same engine conditions, so the engine's drift stays paired)."""
    draws = random.Random(0)
    ratios, p50s = [], []
    for _ in range(n):
        sample = draws.choices(rounds, k=len(rounds))
        ratios.append(pooled_ratio(sample, base, other))
        p50s.append(added(sample, 50, base, other))

    def interval(values: list[float]) -> tuple[float, float]:
        values.sort()
        return values[int(0.025 * n)], values[int(0.975 * n) - 1]

    return interval(ratios), interval(p50s)


def _cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time of harness (the front, all its threads); the engine is its own
    process group and not counted."""
    times = proc.cpu_times()
    return times.user + times.system


def start_baseline(kind: str, port: int, engine_socket: str, demo: Path) -> subprocess.Popen:
    """A baseline front on `port`, with the demo's server certificate and client CA."""
    pki = demo / "pki"
    child = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("baseline_fronts.py")),
            kind,
            str(port),
            engine_socket,
            str(pki / "server.pem"),
            str(assets.secrets_dir(demo) / assets.SERVER_KEY),
            str(pki / "ca.pem"),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert child.poll() is None, f"the {kind} baseline exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return child
        time.sleep(0.1)
    child.kill()
    raise AssertionError(f"the {kind} baseline did not listen within 30 s")


def keep_awake(cores: list[int]) -> list[subprocess.Popen[bytes]]:
    """One SCHED_IDLE busy loop per CPU. A virtual CPU with nothing to run halts, and waking it
    takes the host's scheduling latency (milliseconds on a busy host, when the guest does not
    poll first: haltpoll.guest_halt_poll_ns=0); the front's extra hop pays that wake-up where
    the direct path does not. A SCHED_IDLE task runs only when nothing else wants the CPU and
    is preempted at once: the bare-metal analogue is disabling deep C-states for a latency
    benchmark. Under concurrency it slowed vLLM's CPU engine here (README): use it for the
    one-at-a-time latency."""
    spinners = []
    for cpu in cores:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(spinner.pid, {cpu})
        os.sched_setscheduler(spinner.pid, os.SCHED_IDLE, os.sched_param(0))
        spinners.append(spinner)
    return spinners


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--requests",
        type=int,
        help="per path and round (default: 3 per client, at least 10: short rounds keep the "
        "engine's drift out of the comparison)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=160)
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("plain", "stream"),
        default=["plain", "stream"],
        help="non-streamed (plain) and/or streamed completions",
    )
    parser.add_argument(
        "--max-tokens",
        type=token_counts,
        default=[16],
        metavar="N|LOW-HIGH",
        help="tokens per completion (ignore_eos, so exactly that many). A range sends every "
        "length in it in a fixed shuffled order, the same in both paths: requests then finish "
        "in different engine steps, as real completions do, instead of all in the same one",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the engine's compute threads the last CPU (engine.cpus); harness and this "
        "load generator keep to the others",
    )
    parser.add_argument(
        "--keep-awake",
        action="store_true",
        help="a lowest-priority busy loop on every CPU, so that no virtual CPU halts between "
        "requests (see keep_awake)",
    )
    parser.add_argument(
        "--engine",
        choices=("vllm", "stand-in"),
        default="vllm",
        help="stand-in: an engine that answers at once, to measure the front's own cost",
    )
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=("relay", "httptools", "uvicorn"),
        default=[],
        help="also measure fronts that do less, in the same rounds (benchmarks/baseline_fronts"
        ".py): a bare mTLS byte relay, HTTP on httptools without ASGI, and uvicorn with "
        "harness's engine client and no controls",
    )
    parser.add_argument(
        "--stand-in-delay-ms",
        type=float,
        default=0.0,
        help="the stand-in answers each completion this much later: requests reach the front "
        "spaced out, as with a real engine, without a real engine's CPU use",
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
            engine = stand_in_engine.install(demo, args.stand_in_delay_ms / 1000)
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
        spinners: list[subprocess.Popen[bytes]] = []
        baselines: list[subprocess.Popen[bytes]] = []
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
            if args.keep_awake:
                spinners = keep_awake(cores)
            if args.pin:  # this load generator shares the front's CPUs, not the engine's
                os.sched_setaffinity(0, set(cores[:-1]))
            ctx = ssl.create_default_context(cafile=str(demo / "pki" / "ca.pem"))
            ctx.load_cert_chain(
                str(demo / "pki" / "client.pem"), str(demo / "pki" / "client-key.pem")
            )
            targets = {"direct": Target(uds=sock), "front": Target(port=port, ssl=ctx)}
            processes = {"front": psutil.Process(proc.pid)}
            for kind in args.baselines:  # started after the pinning: they share its CPUs
                baseline_port = free_port()
                baseline = start_baseline(kind, baseline_port, sock, demo)
                baselines.append(baseline)
                targets[kind] = Target(port=baseline_port, ssl=ctx)
                processes[kind] = psutil.Process(baseline.pid)
            results = uvloop.run(bench(targets, processes, args))
            print(
                json.dumps(
                    {
                        "cores": len(cores),
                        "pinned": args.pin,
                        "kept_awake": args.keep_awake,
                        "engine": args.engine,
                        "stand_in_delay_ms": args.stand_in_delay_ms,
                        "max_tokens": f"{min(args.max_tokens)}-{max(args.max_tokens)}",
                        **results,
                    },
                    indent=2,
                )
            )
        finally:
            for child in spinners + baselines:
                child.kill()
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)


if __name__ == "__main__":
    main()
