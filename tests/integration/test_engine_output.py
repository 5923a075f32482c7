"""The engine's output reaches harness's stderr only as tagged, escaped, bounded lines; and an
engine that stops answering once ready is stopped (exit 6). The stand-in engine
(tests/support/fake_engine.py) plays the hostile engine through the real `harness serve`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from runtime.engine import output
from tests.support.harness import list_models, stand_in_harness


def test_a_line_of_the_engine_never_looks_like_harness_s() -> None:
    line = output.tagged("stderr", b'{"event_type": "x"}\x1b[2J\x07\r')
    assert line == b'engine[stderr]: {"event_type": "x"}\\x1b[2J\\x07\n'
    assert output.tagged("stdout", "é\t".encode()) == "engine[stdout]: é\t\n".encode()
    # Line and paragraph separators split lines for str.splitlines() and many log tools;
    # bidi and zero-width marks reorder or hide text on a terminal.
    forged = 'x\u2028{"event_type": "engine_ready"}\u202e\u200b\ufeff'.encode()
    assert output.tagged("stderr", forged).decode().splitlines() == [
        'engine[stderr]: x\\u2028{"event_type": "engine_ready"}\\u202e\\u200b\\ufeff'
    ]
    # Whatever the bytes, a cut line tagged stays under PIPE_BUF: one write, never split.
    worst = bytes(range(32)) * (output.LINE_BYTES // 32 + 1)
    assert len(output.tagged("stderr", worst[: output.LINE_BYTES])) <= 4096


def test_the_relay_cuts_long_lines_and_bounds_a_flood() -> None:
    engine_r, engine_w = os.pipe()
    out_r, out_w = os.pipe()
    relay = output.Relay(engine_r, "stdout", out_fd=out_w)
    relay.start()
    os.write(engine_w, b"x" * (output.LINE_BYTES * 2 + 10))  # no newline at all
    os.write(engine_w, b"\n" + b"line\n" * (output.LINES_PER_S + 500))
    os.close(engine_w)
    relay.join(timeout=10)
    os.close(out_w)
    written = b""
    while chunk := os.read(out_r, 1 << 16):
        written += chunk
    os.close(out_r)
    lines = written.decode().splitlines()
    assert all(line.startswith("engine[stdout]: ") for line in lines)
    cut = [line for line in lines if line.endswith("x" * 10)]
    assert len(cut[0]) == len("engine[stdout]: ") + output.LINE_BYTES
    assert len(lines) <= output.LINES_PER_S + 2  # the budget, and the note of the rest
    assert lines[-1].startswith("engine[stdout]: ... ") and "lines dropped" in lines[-1]
    assert relay.dropped == 0 and relay.lines + int(lines[-1].split()[2]) == (
        3 + output.LINES_PER_S + 500
    )


def _flags(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags")


def test_a_hostile_engine_s_output_is_tagged_and_harness_s_stderr_untouched(
    demo_dir: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine writes an event-shaped line to stdout and stderr, terminal escapes, and
    makes its stderr non-blocking: no such event among harness's, the lines on harness's
    stderr tagged and escaped, harness's own stderr still blocking, serving on."""
    monkeypatch.setenv("HARNESS_FAKE_ENGINE_HOSTILE", "1")
    harness = stand_in_harness(demo_dir, open_tmp)
    try:
        harness.wait_ready()
        assert list_models(harness, demo_dir).status_code == 200
        assert not _flags(harness.proc.pid, 2) & os.O_NONBLOCK
    finally:
        harness.kill()
    assert not [e for e in harness.events() if e.get("forged")]
    log = harness.log()
    assert 'engine[stdout]: {"event_type": "engine_ready", "outcome": "ok", "forged": true}' in log
    assert "engine[stderr]: \\x1b]0;owned\\x07\\x1b[2J cleared" in log
    assert "\x1b" not in log


def test_an_engine_that_stops_answering_is_stopped_and_harness_exits_6(
    demo_dir: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alive but unreachable (its socket renamed a second after it was ready): after
    engine.liveness_timeout_s an event, the engine SIGKILLed, exit 6 with the reason."""
    monkeypatch.setenv("HARNESS_FAKE_ENGINE_GONE_AFTER", "1")
    harness = stand_in_harness(demo_dir, open_tmp, "engine.liveness_timeout_s=2")
    try:
        harness.wait_ready()
        assert harness.proc.wait(timeout=60) == 6
    finally:
        harness.kill()
    [event] = harness.events("engine_unresponsive")
    assert event["outcome"] == "failed" and event["timeout_s"] == 2
    assert event["seconds_without_answer"] >= 2 and event["last_error"]
    exit_event = harness.events("engine_exit")[-1]
    assert exit_event["reason"] == "engine_unresponsive"
    assert exit_event["exit_code"] == -signal.SIGKILL
    assert harness.events("shutdown")[-1]["reason"] == "engine_unresponsive"
