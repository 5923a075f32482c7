"""Supervision with the real engine. These tests end the server they use, so they run last
(file order) and take the session's shared server; a later test would start a new one."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from runtime.demo import assets
from tests.conftest import Servers
from tests.support import Harness, client_context, openai_client, process_group

pytestmark = pytest.mark.engine


def test_sigterm_during_a_stream_lets_it_finish_then_exits_0(
    servers: Servers, demo_dir: Path
) -> None:
    harness = servers.take()
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    api = openai_client(harness.url, ctx)
    stream = api.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=64,
        stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices
    harness.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)  # must not be cut
    finishes = [c.choices[0].finish_reason for c in rest if c.choices]
    assert finishes[-1] == "length"
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 64
    assert harness.proc.wait(timeout=120) == 0
    shutdown = harness.events("shutdown")[-1]
    assert shutdown["outcome"] == "ok" and shutdown["exit_code"] == 0
    # After draining, the engine and all of vLLM's children are gone, and the port is closed.
    assert not process_group(harness.engine_pid)
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=ctx) as client:
        client.get(f"{harness.url}/healthz")


def test_weights_changed_while_the_engine_loads_exits_3(
    servers: Servers, demo_dir: Path, open_tmp: Path
) -> None:
    """Step 6: the fingerprints taken at verification are checked again once the engine is
    ready; a file touched in between stops everything with exit 3."""
    copy = open_tmp / "demo"
    shutil.copytree(demo_dir, copy)
    harness = Harness(copy / assets.CONFIG_NAME, open_tmp)
    try:
        harness.wait_for_event("engine_start", 60)
        os.utime(copy / "model" / "tokenizer_config.json")
        assert harness.proc.wait(timeout=600) == 3
        assert "tokenizer_config.json changed after verification" in harness.log()
        assert harness.events("shutdown")[-1]["exit_code"] == 3
        assert not process_group(harness.engine_pid)
    finally:
        harness.kill()


def test_engine_death_makes_harness_exit_6(servers: Servers) -> None:
    harness = servers.take()
    os.kill(harness.engine_pid, signal.SIGKILL)
    started = time.monotonic()
    assert harness.proc.wait(timeout=120) == 6
    assert time.monotonic() - started < 60
    exit_event = harness.events("engine_exit")[-1]
    assert exit_event["outcome"] == "failed" and exit_event["exit_code"] == -signal.SIGKILL
    shutdown = harness.events("shutdown")[-1]
    assert shutdown["outcome"] == "failed" and shutdown["exit_code"] == 6
    assert not process_group(harness.engine_pid)
