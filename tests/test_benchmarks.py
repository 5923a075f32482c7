"""The front benchmark still runs and measures what it says: `front_bench.py --engine stand-in`
starts the real `harness serve` (stage 2, sandbox, mTLS front) with the stand-in engine, and
a few short rounds of each load shape go through both paths. The README's numbers come from
this script with the real vLLM engine; this keeps it from rotting between runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from front_bench import Round, added, bootstrap, pooled_ratio  # noqa: E402


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
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = json.loads(out.stdout)
    assert results["engine"] == "stand-in"
    shapes = [results[name] for name in ("plain_c1", "plain_c3", "stream_c1", "stream_c3")]
    for row in shapes:
        assert row["direct_rps"] > 0 and row["front_rps"] > 0, row
        low, high = (float(x) for x in row["throughput_ratio_ci95"].split(" to "))
        assert low <= row["throughput_ratio"] <= high, row
    # The front path went through harness: its process spent CPU on those requests (summed
    # over the shapes: the kernel counts CPU time in 10 ms ticks).
    assert sum(row["front_cpu_ms_per_request"] for row in shapes) > 0, shapes


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
