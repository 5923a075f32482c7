"""The engine's stdout and stderr: pipes that harness reads and writes to its own stderr as
tagged lines.

Never the engine's bytes on harness's own descriptors: a shared file description let a hostile
engine set O_NONBLOCK on harness's stderr (its next write then fails), write lines shaped like
harness's events, or write terminal escapes into an operator's terminal. Each line here starts
with `engine[stderr]: ` (never `{`, so no line of it parses as an event), control characters
are escaped, lines are cut at LINE_BYTES and at most LINES_PER_S lines a second pass per
stream; the rest are counted in one line.
"""

from __future__ import annotations

import os
import re
import threading
import time

LINE_BYTES = 8192
LINES_PER_S = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_write_lock = threading.Lock()  # whole lines, whichever stream they come from


def tagged(stream: str, raw: bytes) -> bytes:
    """One line of the engine's output as harness writes it. Pure."""
    text = raw.rstrip(b"\r").decode("utf-8", errors="replace")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return f"engine[{stream}]: {text}\n".encode()


class Relay(threading.Thread):
    """Reads one pipe until the engine and all its children have closed it (EOF)."""

    def __init__(self, fd: int, stream: str, out_fd: int = 2) -> None:
        super().__init__(name=f"engine-{stream}", daemon=True)
        self.fd = fd
        self.stream = stream
        self.out_fd = out_fd
        self.lines = 0
        self.dropped = 0
        self._window = (0.0, 0)  # (start, lines written in it)

    def run(self) -> None:
        pending = b""
        try:
            while chunk := os.read(self.fd, 1 << 16):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                while len(pending) > LINE_BYTES:  # a line without end: cut, not buffered
                    lines.append(pending[:LINE_BYTES])
                    pending = pending[LINE_BYTES:]
                for line in lines:
                    for start in range(0, max(len(line), 1), LINE_BYTES):
                        self._emit(line[start : start + LINE_BYTES])
            if pending:
                self._emit(pending)
        finally:
            os.close(self.fd)
            self._flush_dropped()

    def _emit(self, line: bytes) -> None:
        now = time.monotonic()
        start, count = self._window
        if now - start >= 1.0:
            self._flush_dropped()
            start, count = now, 0
        if count >= LINES_PER_S:
            self.dropped += 1
            self._window = (start, count)
            return
        self._window = (start, count + 1)
        self.lines += 1
        self._write(tagged(self.stream, line))

    def _flush_dropped(self) -> None:
        if self.dropped:
            note = f"... {self.dropped} lines dropped (over {LINES_PER_S} lines/s)".encode()
            self._write(tagged(self.stream, note))
            self.dropped = 0

    def _write(self, data: bytes) -> None:
        with _write_lock:
            try:
                while data:
                    data = data[os.write(self.out_fd, data) :]
            except BlockingIOError:
                pass  # harness's own stderr is full and non-blocking: drop, never stall
