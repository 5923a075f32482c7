"""The front's overhead: the same load through the front (mTLS) and straight to the engine's
Unix socket, against the same real vLLM CPU engine, in one run.

    .venv/bin/python benchmarks/front_bench.py [--requests N] [--rounds 160] [--concurrency 1 4 8]
                                               [--kinds plain stream] [--max-tokens 16|8-24]
                                               [--pin] [--keep-awake] [--engine vllm|stand-in]
                                               [--stand-in-delay-ms MS]
                                               [--baselines relay httptools uvicorn vllm-tls]

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
`--baselines vllm-tls` adds what a user would run instead of harness: vLLM serving mTLS itself
(`--ssl-certfile --ssl-keyfile --ssl-ca-certs --ssl-cert-reqs 2`) on a loopback TCP port, a
second engine with harness's engine's exact argv and environment but for where it listens
(checked against harness's `engine_start` event) and its clients' keep-alive (the front's),
and the bench's PKI; the load generator presents the same client certificate. Its row adds
the front's throughput ratio and added p50/p99 over it (goals: ratio >= 1.0, added p50 <=
0.5 ms), and the concurrencies default to 1, 8 and 32. Both engines are loaded at once, and
every run starts once both have gone to sleep (see quiet()), so that neither spins beside
the other.
Every row also has each path's CPU per request in the engine's API-server process (the
process that parses HTTP, and for vllm-tls terminates TLS), next to the front's own.
"""

from __future__ import annotations

import argparse
import asyncio
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

from runtime import config as config_mod
from runtime.demo import assets
from runtime.engine.command import RuntimePaths, build_plan

BODY = {"model": "demo", "prompt": "hello world", "ignore_eos": True}
# The baseline of vLLM serving mTLS itself (--baselines vllm-tls).
VLLM_TLS = "vllm-tls"
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
    api_servers: dict[str, psutil.Process] | None = None,
    settle: list[psutil.Process] | None = None,
) -> dict:
    """`targets`: "direct", "front" and any baselines; `processes`: whose CPU time each path
    but the direct one costs; `api_servers`: the engine's API-server process each path ends
    in (vLLM's HTTP side: with vllm-tls it also terminates TLS), counted apart; `settle`:
    processes that must be quiet before each path's run (see quiet())."""
    api_servers = api_servers or {}
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
            api_spent = dict.fromkeys(api_servers, 0.0)
            me, own_cpu = psutil.Process(), 0.0  # the load generator, during the runs only
            names = list(targets)
            for round_ in range(args.rounds):
                # Rotate which path goes first: the engine's own speed drifts.
                shift = round_ % len(names)
                order = names[shift:] + names[:shift]
                this = Round()
                for name in order:
                    if settle:
                        await quiet(settle)
                    proc, api = processes.get(name), api_servers.get(name)
                    cpu = _cpu_seconds(proc) if proc else 0.0
                    api_cpu = _cpu_seconds(api) if api else 0.0
                    mine = _cpu_seconds(me)
                    rps, lat = await clients[name].run(prepared, requests, concurrency)
                    own_cpu += _cpu_seconds(me) - mine
                    if proc:
                        cpu_spent[name] += _cpu_seconds(proc) - cpu
                    if api:
                        api_spent[name] += _cpu_seconds(api) - api_cpu
                    this.elapsed[name] = requests / rps
                    this.latencies[name] = lat
                rounds.append(this)
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
                "api_server_cpu_ms_per_request": {
                    name: round(spent / total * 1000, 3) for name, spent in api_spent.items()
                },
            }
            for name in names[2:]:  # the baselines, against the same direct path
                (low, high), (p50_low, p50_high) = bootstrap(rounds, other=name)
                row[name] = {
                    "rps": round(total / sum(r.elapsed[name] for r in rounds), 1),
                    "throughput_ratio": round(pooled_ratio(rounds, other=name), 3),
                    "throughput_ratio_ci95": f"{low:.3f} to {high:.3f}",
                    "added_p50_ms": round(added(rounds, 50, other=name) * 1000, 3),
                    "added_p50_ms_ci95": f"{p50_low * 1000:.2f} to {p50_high * 1000:.2f}",
                }
                if name in cpu_spent:
                    row[name]["cpu_ms_per_request"] = round(cpu_spent[name] / total * 1000, 3)
                if name == VLLM_TLS:  # what a user would run instead: the front against it
                    row[name].update(front_over(rounds, name))
    return results


async def quiet(procs: list[psutil.Process], window_s: float = 0.2, limit_s: float = 5) -> None:
    """Until `procs` together use under a tenth of a CPU over `window_s` (at most `limit_s`).
    vLLM's engine core and CPU worker spin on their shared-memory queues (sched_yield) for
    1 s after their last message (shm_broadcast's busy_loop_s). With two engines on the same
    compute CPU, the one that served last would spin beside the one now measured, and that
    penalises whichever path follows the other engine's (always vllm-tls, in this
    rotation). So every run, of every path, starts with both engines asleep."""
    deadline = time.monotonic() + limit_s
    before = sum(_cpu_seconds(p) for p in procs)
    while time.monotonic() < deadline:
        await asyncio.sleep(window_s)
        now = sum(_cpu_seconds(p) for p in procs)
        if now - before < 0.1 * window_s:
            return
        before = now


def engine_tree(pid: int) -> list[psutil.Process]:
    """An engine's API server and everything under it (engine core, CPU worker)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def front_over(rounds: list[Round], base: str) -> dict[str, object]:
    """The front against `base`: its throughput ratio and added p50/p99, with 95 % intervals
    from the same bootstrap over rounds."""
    (low, high), (p50_low, p50_high) = bootstrap(rounds, base=base)
    ratios = [r.elapsed[base] / r.elapsed["front"] for r in rounds]
    return {
        "front_ratio": round(pooled_ratio(rounds, base=base), 3),
        "front_ratio_ci95": f"{low:.3f} to {high:.3f}",
        "front_round_ratios": f"{min(ratios):.2f}-{max(ratios):.2f}",
        "front_added_p50_ms": round(added(rounds, 50, base=base) * 1000, 3),
        "front_added_p50_ms_ci95": f"{p50_low * 1000:.2f} to {p50_high * 1000:.2f}",
        "front_added_p99_ms": round(added(rounds, 99, base=base) * 1000, 3),
    }


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
    """CPU time of one process (for the front: harness, all its threads; the engine is its own
    process group and not counted). Read from each thread's schedstat, in nanoseconds: the
    user + system times of /proc/PID/stat come in 10 ms ticks, coarser than a short run costs
    a small relay. Threads do not come and go during a run, so the deltas are whole."""
    try:
        total = 0
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except FileNotFoundError:  # a kernel without CONFIG_SCHED_INFO
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


def without_uds(argv: list[str]) -> list[str]:
    """An engine argv less its `--uds PATH`: where it listens, and nothing else."""
    at = argv.index("--uds")
    return argv[:at] + argv[at + 2 :]


def vllm_tls_argv(argv: list[str], port: int, cert: str, key: str, client_ca: str) -> list[str]:
    """harness's engine argv, listening on a loopback TCP port with vLLM's own mTLS instead
    of the Unix socket: what a user would run without harness. Pure."""
    return [
        *without_uds(argv),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ssl-certfile",
        cert,
        "--ssl-keyfile",
        key,
        "--ssl-ca-certs",
        client_ca,
        "--ssl-cert-reqs",
        str(int(ssl.CERT_REQUIRED)),  # 2: a client certificate, checked against client_ca
    ]


def start_vllm_tls(
    demo: Path, overrides: list[str], started: dict, port: int
) -> subprocess.Popen[bytes]:
    """A second vLLM engine from the same config, serving mTLS on `port` itself; no sandbox,
    no privilege drop (as a user would run it; the sandbox costs nothing measurable per
    request, benchmarks/README.md). `started`: harness's `engine_start` event, whose argv and
    environment names this one must match, so that both engines run with the same options."""
    cfg = config_mod.load(demo / assets.CONFIG_NAME, overrides)
    keepalive_s = cfg.front.keepalive_timeout_s
    paths = RuntimePaths(demo / VLLM_TLS)
    for folder in (paths.root, *paths.dirs()):
        folder.mkdir(mode=0o700)
    plan = build_plan(cfg, paths, rendezvous_port=free_port())
    argv = list(plan.argv)
    # argv[0] (the interpreter) is not in the event.
    assert without_uds(argv[1:]) == without_uds(started["argv"]), (argv, started["argv"])
    assert sorted(plan.env) == sorted(started["env_names"]), (plan.env, started["env_names"])
    pki = demo / "pki"
    key = assets.secrets_dir(demo) / assets.SERVER_KEY
    argv = vllm_tls_argv(argv, port, str(pki / "server.pem"), str(key), str(pki / "ca.pem"))
    # Its clients' idle connections close after the front's keep-alive (5 s, vLLM's default
    # too), not after the 30 s harness gives its engine for the front's own connections: both
    # paths then reopen (and pay for) the same connections between runs.
    env = {**plan.env, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(int(keepalive_s))}
    with (demo / f"{VLLM_TLS}.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            argv,
            env=env,
            cwd=plan.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: vLLM's engine core goes with it
        )


def wait_listening(child: subprocess.Popen[bytes], port: int, what: str, log: Path) -> None:
    """Until `child` accepts connections on `port` (uvicorn listens once vLLM is ready)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{what} exited ({child.returncode}):\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not listen within 600 s")


def stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's process group, SIGKILL after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)


def keep_awake(cores: list[int]) -> list[subprocess.Popen[bytes]]:
    """One SCHED_IDLE busy loop per CPU. A virtual CPU with nothing to run halts, and waking it
    takes the host's scheduling latency (milliseconds on a busy host, when the guest does not
    poll first: haltpoll.guest_halt_poll_ns=0); the front's extra hop pays that wake-up where
    the direct path does not. A SCHED_IDLE task runs only when nothing else wants the CPU and
    is preempted at once: the bare-metal analogue is disabling deep C-states for a latency
    benchmark. Under concurrency it slowed vLLM's CPU engine here (benchmarks/README.md): use
    it for the one-at-a-time latency."""
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
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="clients at once (default: 1 4 8; 1 8 32 with --baselines vllm-tls)",
    )
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
        choices=("relay", "httptools", "uvicorn", VLLM_TLS),
        default=[],
        help="also measure fronts that do less, in the same rounds (benchmarks/baseline_fronts"
        ".py): a bare mTLS byte relay, HTTP on httptools without ASGI, and uvicorn with "
        "harness's engine client and no controls; and vllm-tls, a second vLLM engine with the "
        "same options serving mTLS itself (what a user would run instead of harness)",
    )
    parser.add_argument(
        "--stand-in-delay-ms",
        type=float,
        default=0.0,
        help="the stand-in answers each completion this much later: requests reach the front "
        "spaced out, as with a real engine, without a real engine's CPU use",
    )
    args = parser.parse_args()
    if VLLM_TLS in args.baselines and args.engine != "vllm":
        parser.error("--baselines vllm-tls compares against vLLM: use it with --engine vllm")
    if not args.concurrency:
        args.concurrency = [1, 8, 32] if VLLM_TLS in args.baselines else [1, 4, 8]
    cores = sorted(os.sched_getaffinity(0))
    # The config overrides harness runs with; the vllm-tls engine is built from the same.
    overrides: list[str] = []
    if args.pin:  # the engine's compute threads on the last CPU, harness on the others
        overrides = [f'engine.cpus="{cores[-1]}"']
    with tempfile.TemporaryDirectory(prefix="front-bench-") as tmp:
        demo = Path(tmp)
        demo.chmod(0o755)  # the engine's non-root uid reads the model from here
        assets.ensure(demo)
        port = free_port()
        events = demo / "events.jsonl"
        if args.engine == "stand-in":
            engine = stand_in_engine.install(demo, args.stand_in_delay_ms / 1000)
            overrides.append(f'engine.python="{engine}"')
        serve_args = [arg for value in overrides for arg in ("--set", value)]
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
        vllm_tls: subprocess.Popen[bytes] | None = None
        tls_port = free_port()
        try:
            sock = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                lines = [json.loads(x) for x in events.read_text().splitlines() if x]
                starts = [e for e in lines if e["event_type"] == "engine_start"]
                if starts and VLLM_TLS in args.baselines and vllm_tls is None:
                    # Started while harness's engine loads: both load at once, in half the
                    # time, and with the bench's full CPU set, as harness's engine was.
                    vllm_tls = start_vllm_tls(demo, overrides, starts[0], tls_port)
                if any(e["event_type"] == "front_listen" for e in lines):
                    sock = starts[0]["socket"]
                    break
                time.sleep(0.5)
            assert sock, "harness did not become ready:\n" + events.read_text()[-3000:]
            if vllm_tls is not None:
                wait_listening(vllm_tls, tls_port, "vLLM with TLS", demo / f"{VLLM_TLS}.log")
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
            # vLLM's API server (or the stand-in): stage 2 execs it, or, in a PID namespace,
            # forks it and waits outside (engine_start's `pid`; then `engine_pid` is vLLM's).
            engine_api = psutil.Process(starts[0].get("engine_pid") or starts[0]["pid"])
            api_servers = {"direct": engine_api, "front": engine_api}
            if vllm_tls is not None:
                targets[VLLM_TLS] = Target(port=tls_port, ssl=ctx)
                api_servers[VLLM_TLS] = psutil.Process(vllm_tls.pid)
            for kind in args.baselines:  # started after the pinning: they share its CPUs
                if kind == VLLM_TLS:
                    continue
                baseline_port = free_port()
                baseline = start_baseline(kind, baseline_port, sock, demo)
                baselines.append(baseline)
                targets[kind] = Target(port=baseline_port, ssl=ctx)
                processes[kind] = psutil.Process(baseline.pid)
            # Two engines share the compute CPU: each run waits for both to be asleep.
            settle = [*engine_tree(engine_api.pid), *engine_tree(vllm_tls.pid)] if vllm_tls else []
            results = uvloop.run(bench(targets, processes, args, api_servers, settle))
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
            if vllm_tls is not None:
                stop_group(vllm_tls)
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            shutil.rmtree(assets.secrets_dir(demo), ignore_errors=True)


if __name__ == "__main__":
    main()
