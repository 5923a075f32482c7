"""Supervision with the real engine. Most of these tests end the server they use: those that
take the session's shared one (`own_target`, or marked `ends_server`) run after every test
that shares it (tests/conftest.py), so that the engine is not started again for those."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from runtime.demo import assets
from tests.conftest import Servers
from tests.support import client_context, process_group
from tests.support.container import Container
from tests.support.harness import Harness, list_models, openai_client, stand_in_harness

pytestmark = pytest.mark.engine


def _engine_counters(harness: Harness) -> dict[str, float]:
    """vLLM's own token counters and running requests, from its socket (not the front's)."""
    path = harness.events("engine_start")[0]["socket"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=10) as client:
        text = client.get("http://engine/metrics").text
    names = (
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_requests_running",
    )
    return {
        name: sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(f"{name}{{")
        )
        for name in names
    }


def test_a_client_that_leaves_makes_the_engine_stop_generating(
    servers: Servers, demo_dir: Path
) -> None:
    """A completion that is not streamed sends nothing until it is whole. When its client
    leaves, the front closes the engine connection and vLLM aborts the generation: the engine
    took the prompt but generated fewer than the 64 tokens asked (ignore_eos). Tried again if
    the engine finished first, or the front had not forwarded it yet: the tiny model makes
    64 tokens in a few milliseconds, so the client leaves after a different delay on each
    try, sweeping the window between forwarded and finished. It reads the engine's
    /metrics through its socket, which puts a route outside the allowlist into the engine's
    access log, so it runs here, on the server that the next test ends."""
    harness = servers.shared()
    pki = demo_dir / "pki"
    ctx = client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    body = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 64, "ignore_eos": True})
    request = (
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    outcomes = []
    # The window is a few milliseconds wide and moves with the machine's load: sweep it
    # twice, in an order that mixes short and long delays, then the longer ones.
    for delay_ms in [*(20, 10, 5, 2, 15, 8, 4, 1, 12, 6, 3, 0)] * 2 + [*range(25, 40, 2)]:
        before = _engine_counters(harness)
        seen = len(harness.events("request"))
        with (
            socket.create_connection(("127.0.0.1", harness.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # Or Nagle holds the request behind the handshake's last flight until the close.
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls.sendall(request)
            time.sleep(delay_ms / 1000)
        deadline = time.monotonic() + 10
        while len(harness.events("request")) == seen:
            assert time.monotonic() < deadline, "no request event"
            time.sleep(0.05)
        while (after := _engine_counters(harness))["vllm:num_requests_running"]:
            assert time.monotonic() < deadline, "the engine is still generating"
            time.sleep(0.05)
        status = harness.events("request")[seen]["status"]
        prompt = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
        generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        outcomes.append((status, prompt, generated))
        if status == 499 and prompt > 0 and generated < 64:
            return
    raise AssertionError(f"(status, prompt tokens, generated tokens) per try: {outcomes}")


def _exits(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True  # exited, waiting for its parent (init, harness being gone)
        time.sleep(0.1)
    return False


def test_sigterm_during_a_stream_lets_it_finish_then_exits_0(
    own_target: Harness | Container, demo_dir: Path
) -> None:
    """SIGTERM as the kubelet sends it (in the image: `podman kill --signal TERM`, to tini)."""
    harness = own_target
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
    harness.send_stop()
    rest = list(chunks)  # must not be cut
    finishes = [c.choices[0].finish_reason for c in rest if c.choices]
    assert finishes[-1] == "length"
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 64
    assert harness.proc.wait(timeout=120) == 0
    shutdown = harness.events("shutdown")[-1]
    assert shutdown["outcome"] == "ok" and shutdown["exit_code"] == 0
    # After draining, the engine and all of vLLM's children are gone, and the port is closed.
    assert harness.gone()
    if isinstance(harness, Harness):  # the front filter's supervisor leaves with harness
        [front] = [e for e in harness.events("seccomp_install") if e.get("scope") == "front"]
        assert _exits(front["supervisor_pid"], timeout=5)
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=ctx) as client:
        client.get(f"{harness.url}/healthz")


def test_harness_killed_takes_the_engine_with_it(
    demo_dir: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL leaves harness no chance to stop the engine: the parent-death signal stage 2
    sets does (the stand-in engine, with a child it forks, as vLLM's engine core; stage 2's
    own process waits beside them, outside the engine's PID namespace)."""
    monkeypatch.setenv("HARNESS_FAKE_ENGINE_MB", "1")
    harness = stand_in_harness(demo_dir, open_tmp)
    try:
        harness.wait_ready()
        list_models(harness, demo_dir)  # it forks its child
        assert harness.events("namespaces")[0]["pid_in_namespace"] == 2
        assert len(process_group(harness.engine_pid)) == 3
        [dropped] = harness.events("privilege_drop")
        assert dropped["parent_death_signal"] == "SIGKILL"
        engine = harness.engine_pid
        assert process_group(engine)
        harness.proc.kill()
        harness.proc.wait(timeout=10)
        assert _group_ends(engine, timeout=10), "the engine outlived harness"
    finally:
        harness.kill()


def test_the_engine_s_pid_namespace_init_gone_ends_the_engine_and_harness_says_so(
    demo_dir: Path, open_tmp: Path
) -> None:
    """The PID namespace's init is outside harness's process group; if it dies (OOM, say),
    the kernel kills the engine with it: harness exits 6 and its engine_exit event names the
    init, not an unexplained SIGKILL. engine_start names vLLM's own pid (pid 2 inside)."""
    harness = stand_in_harness(demo_dir, open_tmp)
    try:
        harness.wait_ready()
        event = harness.events("namespaces")[0]
        start = harness.events("engine_start")[0]
        status = Path(f"/proc/{start['engine_pid']}/status").read_text()
        assert [line.split()[-1] for line in status.splitlines() if line.startswith("NSpid")] == [
            "2"
        ]
        os.kill(event["pid_init"], signal.SIGKILL)
        assert harness.proc.wait(timeout=60) == 6
        [exited] = harness.events("engine_exit")
        assert exited["exit_code"] == -signal.SIGKILL
        assert "PID namespace's init ended first" in exited["reason"]
    finally:
        harness.kill()


def _group_ends(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not process_group(pgid)


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


def test_engine_death_makes_harness_exit_6(own_target: Harness | Container) -> None:
    """In the image the engine is killed from a process started in the container (same uid)."""
    harness = own_target
    harness.signal_engine(signal.SIGKILL)
    started = time.monotonic()
    assert harness.proc.wait(timeout=120) == 6
    assert time.monotonic() - started < 60
    exit_event = harness.events("engine_exit")[-1]
    assert exit_event["outcome"] == "failed" and exit_event["exit_code"] == -signal.SIGKILL
    shutdown = harness.events("shutdown")[-1]
    assert shutdown["outcome"] == "failed" and shutdown["exit_code"] == 6
    assert harness.gone()


@pytest.mark.ends_server
def test_harness_killed_takes_vllm_with_it(servers: Servers) -> None:
    """The same with vLLM, whose engine core is a child of its API server: before the reaper
    it ran on for good. Last in the session: it ends the shared server."""
    harness = servers.take()
    engine = harness.engine_pid
    assert len(process_group(engine)) >= 2
    harness.proc.kill()
    harness.proc.wait(timeout=10)
    assert _group_ends(engine, timeout=10), process_group(engine)


def test_real_engine_over_a_tiny_cap_is_stopped_with_exit_6(demo_dir: Path, open_tmp: Path) -> None:
    """The real vLLM engine passes 200 MB while it imports torch: stopped before ready."""
    harness = Harness(
        demo_dir / assets.CONFIG_NAME, open_tmp, [f"engine.max_rss_bytes={200 * 1000 * 1000}"]
    )
    try:
        assert harness.proc.wait(timeout=300) == 6
    finally:
        harness.kill()
    [event] = harness.events("memory_cap_exceeded")
    assert event["resource"] == "cpu_memory" and event["observed_bytes"] > 200 * 1000 * 1000
    assert harness.engine_pid in event["pids"]
    shutdown = harness.events("shutdown")[-1]
    assert shutdown["exit_code"] == 6 and "(memory_cap_exceeded)" in shutdown["message"]
    assert "engine_ready" not in {e["event_type"] for e in harness.events()}
    assert not process_group(harness.engine_pid)
