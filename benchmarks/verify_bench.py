"""Weight verification speed: `harness verify` vs `model_signing verify key` vs single-core
hashlib SHA-256 of the same bytes, in one run on one generated model (warm page cache).

    .venv/bin/python benchmarks/verify_bench.py [--files 4] [--mb 256]

Goals: harness throughput >= 0.9 x (cores x single-core SHA-256 rate) when there are at least
as many files as cores, and >= 1.5x faster than model_signing. Also one file of the same total
size, signed with the files and with the shards serialization. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.numpy import save_file

from runtime.demo.pki import write_private_key
from runtime.integrity import signature

BIN = Path(sys.executable).parent


def make_model(root: Path, files: int, mb: int) -> None:
    root.mkdir()
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    rng = np.random.default_rng(0)
    for i in range(files):
        tensor = rng.integers(0, 255, size=(mb, 1 << 20), dtype=np.uint8)
        save_file({"weight": tensor}, str(root / f"model-{i:05d}.safetensors"))


def best_of(runs: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def single_core_sha256(root: Path) -> None:
    for path in sorted(root.iterdir()):
        hasher = hashlib.sha256()
        with path.open("rb", buffering=0) as handle:
            while chunk := handle.read(8 << 20):
                hasher.update(chunk)


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mb", type=int, default=256, help="size of each safetensors file")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=64, help="shard size for the shards run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="verify-bench-") as tmp:
        root = Path(tmp) / "model"
        make_model(root, args.files, args.mb)
        key = ec.generate_private_key(ec.SECP256R1())
        private, public, sig = Path(tmp) / "k.pem", Path(tmp) / "k.pub", Path(tmp) / "model.sig"
        write_private_key(key, private)
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        signature.sign_model(root, private, sig)
        total = sum(p.stat().st_size for p in root.iterdir())
        single_core_sha256(root)  # warm the page cache

        t_hash = best_of(args.runs, lambda: single_core_sha256(root))
        t_lib = best_of(
            args.runs, lambda: signature.verify_model(root, sig, signature.KeyTrust(public))
        )
        t_cli = best_of(
            args.runs,
            lambda: run(
                [
                    str(BIN / "harness"),
                    "verify",
                    str(root),
                    "--signature",
                    str(sig),
                    "--public-key",
                    str(public),
                ]
            ),
        )
        t_ms = best_of(
            args.runs,
            lambda: run(
                [
                    str(BIN / "model_signing"),
                    "verify",
                    "key",
                    str(root),
                    "--signature",
                    str(sig),
                    "--public_key",
                    str(public),
                ]
            ),
        )
        from model_signing import verifying

        ms_config = verifying.Config().use_elliptic_key_verifier(public_key=public)
        t_ms_lib = best_of(args.runs, lambda: ms_config.verify(root, sig))
        # One large file: whole-file SHA-256 is sequential; the shards serialization is not.
        big = Path(tmp) / "big"
        make_model(big, 1, args.files * args.mb)
        big_sig = Path(tmp) / "big.sig"
        big_shards = Path(tmp) / "big-shards.sig"
        signature.sign_model(big, private, big_sig)
        signature.sign_model(big, private, big_shards, shard_size=args.shard_mb << 20)
        single_core_sha256(big)
        t_big_files = best_of(
            args.runs, lambda: signature.verify_model(big, big_sig, signature.KeyTrust(public))
        )
        t_big_shards = best_of(
            args.runs, lambda: signature.verify_model(big, big_shards, signature.KeyTrust(public))
        )
        big_total = sum(p.stat().st_size for p in big.iterdir())
        cores = len(os.sched_getaffinity(0))
        usable = min(cores, args.files)
        single_rate = total / t_hash
        print(
            json.dumps(
                {
                    "bytes": total,
                    "files": args.files,
                    "cores": cores,
                    "single_core_sha256_MBps": round(single_rate / 1e6, 1),
                    "harness_verify_inprocess_MBps": round(total / t_lib / 1e6, 1),
                    "harness_verify_cli_s": round(t_cli, 3),
                    "model_signing_verify_cli_s": round(t_ms, 3),
                    "ratio_vs_parallel_sha256": round((total / t_lib) / (usable * single_rate), 3),
                    "model_signing_verify_inprocess_MBps": round(total / t_ms_lib / 1e6, 1),
                    "speedup_vs_model_signing_cli": round(t_ms / t_cli, 2),
                    "speedup_vs_model_signing_inprocess": round(t_ms_lib / t_lib, 2),
                    "one_file_files_method_MBps": round(big_total / t_big_files / 1e6, 1),
                    "one_file_shards_method_MBps": round(big_total / t_big_shards / 1e6, 1),
                    "one_file_shards_ratio_vs_parallel_sha256": round(
                        (big_total / t_big_shards) / (cores * single_rate), 3
                    ),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
