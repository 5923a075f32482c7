"""Exit codes of the CLI contract, through the real `harness` entry point."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runtime.demo import assets
from tests.support import REPO, clean_environ, client_context, fake_engine, free_port, run_cli
from tests.support.harness import Harness


def _harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout)


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    config = tmp_path / assets.CONFIG_NAME
    config.write_text(config.read_text().replace("[limits]", "[limits]\nmax_tokenz = 3"))
    result = _harness("serve", "--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'limits.max_tokenz'" in result.stderr and "fix:" in result.stderr
    [event] = _events(result.stdout)
    assert event["event_type"] == "shutdown" and event["exit_code"] == 2


def test_busy_port_exits_2_before_the_engine_starts(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = _harness(
            "serve",
            "--config",
            str(tmp_path / assets.CONFIG_NAME),
            "--set",
            f'front.listen="127.0.0.1:{port}"',
        )
    assert result.returncode == 2
    assert f"front.listen 127.0.0.1:{port}: cannot bind" in result.stderr
    assert "engine_start" not in {e["event_type"] for e in _events(result.stdout)}
    assert time.monotonic() - started < 30


def test_engine_that_dies_during_startup_exits_6(open_tmp: Path) -> None:
    tmp_path = open_tmp
    assets.ensure(tmp_path)
    result = _harness(
        "serve",
        "--config",
        str(tmp_path / assets.CONFIG_NAME),
        "--set",
        f'front.listen="127.0.0.1:{free_port()}"',
        "--set",
        'engine.python="/bin/false"',
    )
    assert result.returncode == 6
    assert "the engine exited with code 1 before it was ready" in result.stderr
    events = _events(result.stdout)
    assert events[-1]["event_type"] == "shutdown" and events[-1]["exit_code"] == 6
    # The private runtime dir is removed on the way out.
    [start] = [e for e in events if e["event_type"] == "engine_start"]
    assert not Path(start["socket"]).parent.exists()


def test_check_json_reports_controls(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    result = _harness("check", "--config", str(tmp_path / assets.CONFIG_NAME), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    controls = report["controls"]
    assert controls["front_tls"]["minimum_version"] == "TLSv1.3"
    assert controls["token_cap"]["max_tokens"] == 64
    assert controls["engine_environment"]["mode"] == "allowlist"
    weights = controls["weight_integrity"]
    assert weights["status"] == weights["sha256_manifest"] == "enforced"
    assert weights["files"] == 4 and weights["method"] == "key"
    assert weights["signer"].startswith("key:sha256:") and len(weights["root_digest"]) == 64
    assert controls["landlock"]["devices"] == [
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
    ]
    assert controls["landlock"]["write_existing_files"] == []  # /proc only for device cuda
    assert controls["seccomp"]["clone_namespace_flags_refused"] == "0x7e020000"
    # harness's own filter: on this host it starts under no seccomp filter, so a deny list.
    front_filter = controls["front_seccomp"]
    assert front_filter["mode"] == "deny_list" and "execve" in front_filter["denied"]
    assert front_filter["container_profile_unknown"] == "harness started under no seccomp filter"
    # Function calling is off unless configured, and so is the engine's tool-call parser.
    assert controls["request_model"]["tools"] is False
    assert controls["request_model"]["tool_call_parser"] is None


def test_check_with_unreadable_tls_file_exits_2(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    (assets.secrets_dir(tmp_path) / "server-key.pem").write_text("not a key")
    result = _harness("check", "--config", str(tmp_path / assets.CONFIG_NAME))
    assert result.returncode == 2 and "front.tls.key" in result.stderr


def _python(*args: str, open_files: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    """`python ARGS` started with RLIMIT_NOFILE (soft, hard)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=clean_environ(),
        text=True,
        capture_output=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files),
    )


def test_an_open_files_limit_below_max_connections_exits_2(tmp_path: Path) -> None:
    """Past RLIMIT_NOFILE, connections would be dropped at accept, below front.max_connections
    and without an event: a hard limit that cannot hold the cap is refused before the engine
    starts, naming the setting and the largest cap that fits."""
    assets.ensure(tmp_path)
    config = str(tmp_path / assets.CONFIG_NAME)
    listen = f'front.listen="127.0.0.1:{free_port()}"'
    for command in (["check", "--config", config], ["serve", "--config", config, "--set", listen]):
        result = _python("-m", "runtime", *command, open_files=(1024, 1024))
        assert result.returncode == 2, result.stderr
        assert "front.max_connections 1024: the front needs 1552 open files" in result.stderr
        assert "lower front.max_connections to at most 496" in result.stderr
        assert "engine_start" not in {e["event_type"] for e in _events(result.stdout)}


def test_the_soft_open_files_limit_is_raised_to_what_the_front_needs(tmp_path: Path) -> None:
    """A soft limit below the need (1024 is common) is raised within the hard limit; `check`
    reports the need and the limit in force without changing it."""
    assets.ensure(tmp_path)
    config = str(tmp_path / assets.CONFIG_NAME)
    code = f"""
import resource
from runtime import config
from runtime.front import server
front = config.load({config!r}).front
print(server.open_files(front, apply=False))
print(server.open_files(front, apply=True), resource.getrlimit(resource.RLIMIT_NOFILE))
"""
    for args in (["-c", code], ["-m", "runtime", "check", "--config", config, "--json"]):
        result = _python(*args, open_files=(300, 5000))
        assert result.returncode == 0, result.stderr
        if args[0] == "-c":
            before, after = result.stdout.splitlines()
            assert before == "{'open_files_needed': 1552, 'open_files_limit': 300}"
            assert after == "{'open_files_needed': 1552, 'open_files_limit': 1552} (1552, 5000)"
        else:
            connections = json.loads(result.stdout)["controls"]["connections"]
            assert connections["open_files_limit"] == 300  # check changes nothing
            assert connections["open_files_needed"] == 1552


def test_hostile_model_exits_3_before_the_engine_starts(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    (tmp_path / "model" / "modeling_evil.py").write_text("import os\n")
    result = _harness("serve", "--config", str(tmp_path / assets.CONFIG_NAME))
    assert result.returncode == 3
    assert "modeling_evil.py: refused: Python code" in result.stderr and "fix:" in result.stderr
    events = _events(result.stdout)
    assert [e["event_type"] for e in events] == [
        "config_loaded",
        "landlock",  # harness confines itself before it reads the weights
        "weight_integrity_check",
        "shutdown",
    ]
    assert events[2]["outcome"] == "blocked" and events[3]["exit_code"] == 3


def test_writable_model_dir_is_refused_unless_explicitly_allowed(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    result = _harness(
        "check",
        "--config",
        str(tmp_path / assets.CONFIG_NAME),
        "--set",
        "model.unsafe_allow_writable=false",
    )
    assert result.returncode == 3
    assert "not on a read-only mount" in result.stderr
    assert "model.unsafe_allow_writable" in result.stderr  # the fix names the switch
    allowed = _harness("check", "--config", str(tmp_path / assets.CONFIG_NAME))
    assert allowed.returncode == 0
    unsafe = [e for e in _events(allowed.stderr) if e["event_type"] == "unsafe_setting"]
    assert unsafe and unsafe[0]["setting"] == "model.unsafe_allow_writable"


@pytest.mark.skipif(os.geteuid() != 0, reason="the engine changes uid only when harness is root")
def test_model_the_engine_uid_cannot_reach_exits_5(tmp_path: Path) -> None:
    """pytest's own temporary folders are 0700: the engine's uid 65534 cannot traverse them,
    and harness says so before starting anything."""
    assets.ensure(tmp_path)
    result = _harness(
        "serve",
        "--config",
        str(tmp_path / assets.CONFIG_NAME),
        "--set",
        f'front.listen="127.0.0.1:{free_port()}"',
    )
    assert result.returncode == 5
    assert "the engine runs as uid 65534" in result.stderr
    assert "is not traversable by uid 65534" in result.stderr and "fix:" in result.stderr


def test_demo_serve_from_nothing_serves_with_harness_confined(open_tmp: Path) -> None:
    """`make demo`'s command on an empty folder: the assets are made (in a child, whose
    threads stay there), then harness confines itself with Landlock before its first thread
    and serves. The stand-in engine (tests/support/fake_engine.py) keeps it fast; the engine tier
    serves the same config with vLLM."""
    engine = fake_engine.install(open_tmp)
    harness = Harness(
        open_tmp / assets.CONFIG_NAME,
        open_tmp,
        [f'engine.python="{engine}"'],
        command=["demo", "serve", "--dir", str(open_tmp)],
    )
    try:
        harness.wait_ready()
        [confined] = [e for e in harness.events("landlock") if e.get("scope") == "front"]
        assert confined["outcome"] == "ok" and confined["enforced"] is True
        pki = open_tmp / "pki"
        ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
        with httpx.Client(verify=ctx, base_url=harness.url, timeout=30) as client:
            assert client.get("/v1/models").json()["data"][0]["id"] == "demo"
        assert "curl" in harness.log()  # the ready-to-paste command
        assert harness.terminate() == 0
    finally:
        harness.kill()
