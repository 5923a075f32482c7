"""The real `harness serve` as a pod runs it: uid 10001 without capabilities (setpriv), on
this host, with the stand-in engine (tests/support/fake_engine.py) through the real stage 2. The
image tier runs the same setting under podman + runc with the real vLLM."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import config
from runtime.demo import assets
from tests.support import LORA, LORA_NAME, POD, process_group
from tests.support.harness import list_models, stand_in_harness

UID = 10001
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to uid 10001 needs root")


@pytest.fixture()
def pod_secrets(demo_dir: Path) -> Iterator[Path]:
    """The server key in a tmpfs folder of uid 10001's, as a pod's Secret volume is."""
    folder = Path("/dev/shm") / f"harness-pod-{os.getpid()}"
    folder.mkdir(mode=0o700)
    key = folder / "server-key.pem"
    shutil.copy(config.load(demo_dir / assets.CONFIG_NAME).front.tls.key, key)
    key.chmod(0o600)
    for path in (folder, key):
        os.chown(path, UID, UID)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_in_a_pod_the_engine_gets_every_namespace_and_serves(
    demo_dir: Path, open_tmp: Path, pod_secrets: Path
) -> None:
    """sandbox.namespaces = required as uid 10001: a user namespace of its own, then mount,
    network and IPC; no capability anywhere; harness not dumpable; a request served. A
    signed LoRA adapter is verified as uid 10001 and readable to the engine through its
    own root and Landlock (the stand-in lists it only once it read its config)."""
    runtime = open_tmp / "run"
    runtime.mkdir()
    os.chown(runtime, UID, UID)
    harness = stand_in_harness(
        demo_dir,
        open_tmp,
        f'front.tls.key="{pod_secrets / "server-key.pem"}"',
        f'secrets.dir="{pod_secrets}"',
        f'engine.runtime_dir="{runtime}"',
        'sandbox.namespaces="required"',
        LORA,
        prefix=POD,
    )
    try:
        harness.wait_ready()
        models = list_models(harness, demo_dir)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["demo", LORA_NAME]
        checks = harness.events("weight_integrity_check")
        assert {e["artifact"] for e in checks} == {"model", f"engine.lora[{LORA_NAME}]"}
        event = harness.events("namespaces")[0]
        assert event["isolated"] is True and event["mode"] == "required"
        assert event["namespaces"] == ["user", "mount", "network", "ipc", "pid"]
        assert harness.events("privilege_drop")[0]["uid"] == UID
        # Its own PID namespace: the engine's first process is pid 2 there (its init is 1),
        # and stage 2's own process, the one harness watches, waits outside it.
        assert event["pid_in_namespace"] == 2
        assert _status(harness.engine_pid)["NSpid"].split() == [str(harness.engine_pid)]
        inside = [p for p in process_group(harness.engine_pid) if p != harness.engine_pid]
        assert "2" in {_status(p)["NSpid"].split()[-1] for p in inside}
        assert all(len(_status(p)["NSpid"].split()) == 2 for p in inside)
        assert harness.events("landlock")[0]["enforced"] is True  # harness itself, as 10001
        own = {k: os.readlink(f"/proc/{harness.proc.pid}/ns/{k}") for k in ("user", "mnt")}
        engine = process_group(harness.engine_pid)
        assert engine
        for pid in engine:
            status = _status(pid)
            assert status["Uid"].split()[0] == str(UID) and status["CapEff"] == "0" * 16
            assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
            for kind, link in own.items():
                assert os.readlink(f"/proc/{pid}/ns/{kind}") != link, (kind, pid)
        # harness is not dumpable: its /proc files are root's, not its uid's.
        assert os.stat(f"/proc/{harness.proc.pid}/environ").st_uid == 0
        assert _status(harness.proc.pid)["Uid"].split()[0] == str(UID)
    finally:
        harness.kill()
