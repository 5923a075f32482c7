"""The front benchmark still runs and measures what it says: `front_bench.py --engine stand-in`
starts the real `harness serve` (stage 2, sandbox, mTLS front) with the stand-in engine, and
a few short rounds of each load shape go through both paths and the three baseline fronts.
benchmarks/README.md's numbers come from this script with the real vLLM engine; this keeps it
from rotting between runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from front_bench import (  # noqa: E402
    Round,
    added,
    bootstrap,
    front_over,
    pooled_ratio,
    token_counts,
    vllm_tls_argv,
)
from load_client import Client, Target, completion  # noqa: E402


def test_front_bench_with_the_stand_in_engine() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "front_bench.py"),
            "--engine",
            "stand-in",
            "--rounds",
            "3",
            "--requests",
            "30",
            "--concurrency",
            "1",
            "3",
            "--max-tokens",
            "8-24",
            "--stand-in-delay-ms",
            "2",
            "--baselines",
            "relay",
            "httptools",
            "uvicorn",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = json.loads(out.stdout)
    assert results["engine"] == "stand-in"
    assert results["max_tokens"] == "8-24" and results["stand_in_delay_ms"] == 2
    # The stand-in held each completion 2 ms: one at a time, no path beats 500 per second.
    assert results["plain_c1"]["direct_rps"] < 500 and results["plain_c1"]["front_rps"] < 500
    shapes = [results[name] for name in ("plain_c1", "plain_c3", "stream_c1", "stream_c3")]
    for row in shapes:
        assert row["direct_rps"] > 0 and row["front_rps"] > 0, row
        low, high = (float(x) for x in row["throughput_ratio_ci95"].split(" to "))
        assert low <= row["throughput_ratio"] <= high, row
    # The front path went through harness: its process spent CPU on every shape's requests.
    assert all(row["front_cpu_ms_per_request"] > 0 for row in shapes), shapes
    # And the engine's own process (found inside its PID namespace) served both paths.
    for row in shapes:
        api = row["api_server_cpu_ms_per_request"]
        assert api["direct"] > 0 and api["front"] > 0, row
    # The baselines ran in the same rounds, each through its own process.
    for name in ("relay", "httptools", "uvicorn"):
        for row in shapes:
            low, high = (float(x) for x in row[name]["throughput_ratio_ci95"].split(" to "))
            assert low <= row[name]["throughput_ratio"] <= high, row
        assert all(row[name]["cpu_ms_per_request"] > 0 for row in shapes), shapes


def _round(direct: float, front: float, lat_direct: float, lat_front: float) -> Round:
    return Round(
        elapsed={"direct": direct, "front": front},
        latencies={"direct": [lat_direct] * 5, "front": [lat_front] * 5},
    )


def test_ratio_pools_time_and_the_interval_covers_paired_rounds() -> None:
    # The engine's speed drifts between rounds (1 s, then 3 s); the front costs 10 % in each.
    rounds = [_round(1.0, 1.1, 0.010, 0.012), _round(3.0, 3.3, 0.030, 0.032)] * 10
    assert abs(pooled_ratio(rounds) - 1 / 1.1) < 1e-9
    assert abs(added(rounds, 50) - 0.002) < 1e-9
    (low, high), (p50_low, p50_high) = bootstrap(rounds, n=200)
    # Whole rounds are resampled, so the drift stays paired and the ratio stays 1/1.1.
    assert abs(low - 1 / 1.1) < 1e-9 and abs(high - 1 / 1.1) < 1e-9
    assert abs(p50_low - 0.002) < 1e-9 and abs(p50_high - 0.002) < 1e-9


def test_the_front_against_vllm_tls_comes_from_the_same_paired_rounds() -> None:
    # vLLM's own TLS costs 5 % and 1 ms in each round; the front 10 % and 2 ms over direct.
    rounds = [
        Round(
            elapsed={"direct": t, "front": t * 1.10, "vllm-tls": t * 1.05},
            latencies={
                "direct": [t / 100] * 5,
                "front": [t / 100 + 0.002] * 5,
                "vllm-tls": [t / 100 + 0.001] * 5,
            },
        )
        for t in (1.0, 3.0) * 10
    ]
    row = front_over(rounds, "vllm-tls")
    assert row["front_ratio"] == round(1.05 / 1.10, 3)
    assert row["front_added_p50_ms"] == 1.0 and row["front_added_p99_ms"] == 1.0
    assert row["front_ratio_ci95"] == f"{1.05 / 1.10:.3f} to {1.05 / 1.10:.3f}"


def test_vllm_tls_serves_harness_engine_argv_with_its_own_mtls() -> None:
    argv = ["-I", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--uds", "/s"]
    argv += ["--max-num-seqs", "16", "--enforce-eager"]
    tls = vllm_tls_argv(argv, 8443, "cert.pem", "key.pem", "ca.pem")
    # The engine's own options stay as harness gave them; only where it listens changes.
    assert tls[:7] == [*argv[:5], "--max-num-seqs", "16"] and "--enforce-eager" in tls
    assert "--uds" not in tls and "/s" not in tls
    flags = dict(zip(tls[8::2], tls[9::2], strict=True))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "8443",
        "--ssl-certfile": "cert.pem",
        "--ssl-keyfile": "key.pem",
        "--ssl-ca-certs": "ca.pem",
        "--ssl-cert-reqs": "2",  # ssl.CERT_REQUIRED: the client must present a certificate
    }


def test_token_counts_are_a_fixed_shuffle_of_the_range() -> None:
    assert token_counts("16") == [16]
    counts = token_counts("8-24")
    assert sorted(counts) == list(range(8, 25))
    assert counts != sorted(counts)  # lengths mixed, not a ramp
    assert token_counts("8-24") == counts  # the same order in every run
    for bad in ("0", "24-8", "x", "8-", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            token_counts(bad)


def test_load_client_sends_a_list_of_requests_in_turn() -> None:
    """Each run of n requests sends the first n of the list's cycle, whatever the
    concurrency: both paths of a round do the same work."""
    received: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                received.append(json.loads(await reader.readexactly(length))["max_tokens"])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()  # the client closed its keep-alive connection

    async def main(path: str) -> list[list[int]]:
        server = await asyncio.start_unix_server(handle, path)
        requests = [completion({"max_tokens": n}) for n in (5, 6, 7, 8, 9)]
        client = Client(Target(uds=path), 3)
        runs = []
        for _ in range(2):
            received.clear()
            _rps, latencies = await client.run(requests, 12, 3)
            assert len(latencies) == 12
            runs.append(sorted(received))
        client.close()
        server.close()
        return runs

    with tempfile.TemporaryDirectory() as tmp:
        runs = asyncio.run(main(str(Path(tmp) / "engine.sock")))
    assert runs[0] == runs[1] == sorted([5, 6, 7, 8, 9] * 2 + [5, 6])
