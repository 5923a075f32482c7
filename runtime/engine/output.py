"""The engine's stdout and stderr: pipes that harness reads and writes to its own stderr as
tagged lines.

Never the engine's bytes on harness's own descriptors: a shared file description let a hostile
engine set O_NONBLOCK on harness's stderr (its next write then fails), write lines shaped like
harness's events, or write terminal escapes into an operator's terminal. Each line here starts
with `engine[stderr]: ` (never `{`, so no line of it parses as an event); every character that
is not printable is escaped (control characters, but also U+2028/U+2029, which line splitters
treat as line ends, and bidi and zero-width marks); lines are cut at LINE_BYTES, so that each
written line stays under PIPE_BUF and reaches a shared pipe in one piece; at most LINES_PER_S
lines and BYTES_PER_S bytes a second pass per stream, the rest are counted in one line.
"""

from __future__ import annotations

import os
import threading
import time

# Escaping at most quadruples a byte (\\xNN): 1000 bytes stay under PIPE_BUF (4096) tagged.
LINE_BYTES = 1000
LINES_PER_S = 1000
BYTES_PER_S = 256 << 10
_write_lock = threading.Lock()  # whole lines, whichever stream they come from


def _escape(char: str) -> str:
    if char.isprintable() or char == "\t":
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def tagged(stream: str, raw: bytes) -> bytes:
    """One line of the engine's output as harness writes it. Pure."""
    text = raw.rstrip(b"\r").decode("utf-8", errors="replace")
    return f"engine[{stream}]: {''.join(map(_escape, text))}\n".encode()


class Relay(threading.Thread):
    """Reads one pipe until the engine and all its children have closed it (EOF)."""

    def __init__(self, fd: int, stream: str, out_fd: int = 2) -> None:
        super().__init__(name=f"engine-{stream}", daemon=True)
        self.fd = fd
        self.stream = stream
        self.out_fd = out_fd
        self.lines = 0
        self.dropped = 0
        self._window = (0.0, 0, 0)  # (start, lines and bytes written in it)

    def run(self) -> None:
        pending = b""
        try:
            while chunk := os.read(self.fd, 1 << 16):
                if self._exhausted():  # a flood: counted in C, not split line by line
                    self.dropped += chunk.count(b"\n")
                    pending = b""
                    continue
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

    def _exhausted(self) -> bool:
        start, lines, size = self._window
        within = time.monotonic() - start < 1.0
        return within and (lines >= LINES_PER_S or size >= BYTES_PER_S)

    def _emit(self, line: bytes) -> None:
        now = time.monotonic()
        start, lines, size = self._window
        if now - start >= 1.0:
            self._flush_dropped()
            start, lines, size = now, 0, 0
        if lines >= LINES_PER_S or size >= BYTES_PER_S:
            self.dropped += 1
            self._window = (start, lines, size)
            return
        self._window = (start, lines + 1, size + len(line))
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
