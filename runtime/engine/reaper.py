"""The engine never outlives harness: a small process that kills the engine's process group
when harness dies, however it dies.

Stage 2 sets a parent-death signal on the engine's first process, but the kernel sends it to
that process only: vLLM's engine core and workers, its children, would go on as orphans
(tried: SIGKILL harness, and they were still there 30 s later). So right after the engine
starts, harness starts this reaper with a pipe as its stdin. When harness exits, on any path,
SIGKILL included, the kernel closes harness's end and the reaper, reading EOF, sends SIGKILL
to the engine's process group. After an orderly stop harness first writes `done`: the group
is gone by then, and its id may be reused by an unrelated process.

The reaper is a separate interpreter without site imports (a few MB), in harness's process
group, with harness's uid and Landlock domain, which holds the engine's: it may signal it.
"""

from __future__ import annotations

import subprocess
import sys

# Run with `python -I -S -c`: the standard library only, nothing from the environment.
_SCRIPT = """
import os, signal, sys
if sys.stdin.readline().strip() != "done":
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class Reaper:
    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SCRIPT, str(pgid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )

    def release(self) -> None:
        """The engine has stopped: the reaper leaves without killing anything."""
        if self.proc.stdin is None or self.proc.stdin.closed:
            return
        try:
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it is gone already
        self.proc.wait(timeout=10)
