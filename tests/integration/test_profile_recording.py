"""`harness profile`'s recorder against strace: one run, recorded by the seccomp supervisor
and traced by strace at the same time, must yield the same syscalls.

The run is the stand-in engine (tests/support/fake_engine.py) through the real stage 2 and the real
recorder: real vLLM under strace -f and the recorder together takes over ten minutes on two
cores. The real engine's recording is what seccomp/engine-cpu.json is, and the engine tier
serves with it in `enforce` mode."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from runtime import config as config_mod
from runtime import recorder
from runtime.sandbox.seccomp import policy
from tests.support import fake_engine

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is not installed (make test installs it)"
)

_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")


def _after_filter(trace: str) -> set[str]:
    """Syscalls strace saw once the filter was in place: those of the process that loaded it
    (stage 2, or the engine stage 2 forked into its PID namespace) after its
    seccomp(SECCOMP_SET_MODE_FILTER) call, and those of every process started after that.
    Processes that ran before (ctypes looking for libseccomp, stage 2's own waiting process)
    are not filtered."""
    before: set[str] = set()
    loader = None
    names: set[str] = set()
    for line in trace.splitlines():
        match = _LINE.match(line)
        if not match or "resumed>" in line:
            continue
        pid, name = match.groups()
        if loader is None:
            before.add(pid)
            # libseccomp probes the kernel with NULL filters first; the load is the one that
            # carries a filter and succeeds.
            if "SECCOMP_SET_MODE_FILTER" in line and "= -1" not in line:
                loader = pid
            continue
        if pid == loader or pid not in before:
            names.add(name)
    assert loader is not None, "strace never saw the filter being loaded"
    return names


def test_recording_matches_strace_of_the_same_run(demo_dir: Path, open_tmp: Path) -> None:
    trace = open_tmp / "strace.log"
    engine = fake_engine.install(open_tmp)
    cfg = config_mod.load(demo_dir / "demo.toml", [f'engine.python="{engine}"'])
    workload = recorder.default_workload(cfg.model.served_name)
    rec = recorder.record(
        cfg, workload, concurrency=2, wrapper=["strace", "-f", "-qq", "-o", str(trace)]
    )
    traced = _after_filter(trace.read_text())
    # The kernel answers these itself: the supervisor never sees them.
    kernel = {*policy.ALWAYS_ALLOW, *policy.HANDOFF_ALLOW, *policy.ENOSYS_ALWAYS}
    recorded = rec.names | rec.denied_seen
    assert recorded, "nothing was recorded"
    assert traced - kernel == recorded - kernel, (
        f"only strace: {sorted(traced - kernel - recorded)}; "
        f"only the recorder: {sorted(recorded - kernel - traced)}"
    )


def test_container_recording_covers_front_and_engine(demo_dir: Path, open_tmp: Path) -> None:
    """`harness profile --container`: harness serve itself under the recording filter, the
    workload through the mTLS front (here with the stand-in engine)."""
    import json
    import subprocess
    import sys

    from tests.support import free_port

    engine = fake_engine.install(open_tmp)
    out = open_tmp / "container.json"
    pki = demo_dir / "pki"
    result = subprocess.run(
        [
            sys.executable, "-m", "runtime", "profile", "--container",
            "--config", str(demo_dir / "demo.toml"),
            "--set", f'engine.python="{engine}"',
            "--set", f'front.listen="127.0.0.1:{free_port()}"',
            "--out", str(out),
            "--ca", str(pki / "ca.pem"),
            "--client-cert", str(pki / "client.pem"),
            "--client-key", str(pki / "client-key.pem"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rec = recorder.from_profile(out)
    # The front's TLS listener, the sandbox it sets up for the engine, and the engine's work.
    assert {"accept4", "landlock_restrict_self", "seccomp", "execve"} <= rec.names
    if os.geteuid() == 0:
        assert "setresuid" in rec.names  # the engine's uid change
    assert (2, 1) in rec.sockets  # AF_INET stream: the front's listener
    events = [json.loads(x) for x in Path(f"{out}.events.jsonl").read_text().splitlines()]
    served = [e for e in events if e["event_type"] == "request" and e["status"] == 200]
    assert served, "the workload never went through the front"
