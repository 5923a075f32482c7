"""The seccomp supervisor: answers the engine's filtered syscalls from harness.

The engine's filter sends every syscall the kernel's allowlist does not cover to a listener fd
(SECCOMP_RET_USER_NOTIF). Stage 2 passes that fd to harness over a Unix socket (SCM_RIGHTS:
works where pidfd_getfd would need CAP_SYS_PTRACE), and a thread here answers:
- enforce: EPERM, plus a `seccomp_violation` event naming the syscall and the thread id;
- complain: let it run (SECCOMP_USER_NOTIF_FLAG_CONTINUE) and report it, except the fixed deny
  list, which is refused even then;
- record (`harness profile`): let everything but the fixed deny list run, and remember what
  was called.
Only the syscall number and its register arguments are read; the engine's memory never is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import select
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from runtime.sandbox.seccomp import bpf, policy

# linux/seccomp.h: the ioctls on the listener fd, _IOWR('!', n, struct).
_NOTIF_RECV = 0xC0502100  # struct seccomp_notif (80 bytes)
_NOTIF_SEND = 0xC0182101  # struct seccomp_notif_resp (24 bytes)
_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
_FLAG_CONTINUE = 1
_SOCKET = "socket"


class _Data(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_int32),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


class _Notif(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data", _Data),
    ]


class _Resp(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("val", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    ]


Reporter = Callable[[dict[str, Any]], None]

# The engine controls every argument and number it sends here: what the supervisor keeps and
# says is bounded whatever it sends.
# Events for all syscalls together, per second; the rest are counted into one summary event
# (on top of the one-per-syscall-per-second limit).
EVENTS_PER_SECOND = 20
# Numbers this libseccomp cannot name share one name for counting and events (each carries
# the number it was): otherwise every number would be a name of its own.
UNKNOWN = "unknown"
# socket(2) domains above this are no family Linux has (AF_MAX is 46): not recorded.
_MAX_DOMAIN = 64


@functools.lru_cache(maxsize=1024)
def _name(nr: int) -> str:
    name = bpf.syscall_name(nr)
    return UNKNOWN if name.startswith("syscall_") else name


class Supervisor(threading.Thread):
    """Answers notifications until every process using the filter has exited (POLLHUP) or
    `stop()` is called. Events are limited to one per syscall name per second, with a count."""

    def __init__(
        self,
        fd: int,
        mode: str,
        *,
        errno_ret: int = errno.EPERM,
        report: Reporter | None = None,
        phase: str = "startup",
    ) -> None:
        super().__init__(name=f"seccomp-supervisor-{mode}", daemon=True)
        if mode not in ("enforce", "complain", "record"):
            raise ValueError(f"no supervisor for seccomp mode {mode!r}")
        self.fd = fd
        self.mode = mode
        self.errno_ret = errno_ret
        self.report = report
        self.deny = bpf.profile_numbers(policy.FIXED_DENY)
        self.seen: Counter[int] = Counter()
        self.sockets: set[tuple[int, int]] = set()  # (domain, type) of socket() calls
        self.violations: Counter[str] = Counter()
        self.unknown = 0  # notifications for numbers libseccomp cannot name
        self._window = (0.0, 0)  # (start, events) of the global budget's current second
        self._over_budget: Counter[str] = Counter()  # held back by it, by phase
        self._last_event: dict[str, float] = {}
        self._pending: Counter[str] = Counter()
        self._pending_phase: dict[str, str] = {}
        self._refused: set[str] = set()  # names refused so far, for the held-back counts
        self._socket_nr = bpf.syscall_number(_SOCKET)
        self._stopping = threading.Event()
        # "startup" until the engine is ready: vLLM probes a few things while it starts
        # (io_uring, UDP sockets) that the profile refuses; counted here, not alerted
        # (policy.startup_probe), and alerts again once the phase is "serving".
        self.phase = phase
        self.probes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def end_startup(self) -> dict[str, int]:
        """The engine is ready: from now on every filtered call is an alert. Returns the
        startup probes seen, by label."""
        with self._lock:
            self.phase = "serving"
            return dict(self.probes)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        try:
            while not self._stopping.is_set():
                events = poller.poll(250)
                if not events:
                    self._flush()
                    continue
                _fd, mask = events[0]
                if mask & select.POLLIN:
                    self._answer_one()
                    if time.monotonic() - self._window[0] >= 1.0:
                        self._flush()  # a steady flood never lets poll time out
                elif mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    break  # no process uses the filter any more
        finally:
            self._flush(force=True)
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def _answer_one(self) -> None:
        notif = _Notif()  # the kernel requires a zeroed buffer
        try:
            fcntl.ioctl(self.fd, _NOTIF_RECV, notif)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the caller was killed or interrupted before we looked
            raise
        nr = notif.data.nr
        if _name(nr) == UNKNOWN:
            self.unknown += 1
        else:
            self.seen[nr] += 1
        if nr == self._socket_nr and self.mode == "record":  # only a recording needs them
            domain = int(notif.data.args[0])
            if 0 <= domain < _MAX_DOMAIN:
                self.sockets.add((domain, int(notif.data.args[1]) & 0xF))
        # The fixed deny list is refused in every mode, so that a recording behaves as
        # enforcement will.
        fixed = nr in self.deny or bpf.creates_namespace(nr, notif.data.args)
        refuse = self.mode == "enforce" or fixed
        if self._own_thread(nr, notif):
            self._answer(_Resp(id=notif.id, flags=_FLAG_CONTINUE))
            return
        # Counted before the answer lets the caller go on: whatever the caller does next (end
        # the startup phase, say) comes after this call in the supervisor's books too.
        if self.mode != "record":
            self._violation(nr, notif, refused=refuse, fixed=fixed)
        resp = _Resp(id=notif.id)
        if refuse:
            resp.error = -(errno.EPERM if fixed else self.errno_ret)
        else:
            resp.flags = _FLAG_CONTINUE
        self._answer(resp)

    def _answer(self, resp: _Resp) -> None:
        try:
            fcntl.ioctl(self.fd, _NOTIF_SEND, resp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller is gone
                raise

    def _own_thread(self, nr: int, notif: _Notif) -> bool:
        """sched_setaffinity and the like aimed at a thread of the caller's own process: let
        through, no event (see policy.SELF_ONLY). Only if the caller still waits after /proc
        was read: otherwise its thread id may already be another process's. (The target may
        exit and its id be reused within that microsecond window: then another process of the
        same uid gets the engine's own scheduling request, no more.)"""
        if self.mode == "record" or not policy.own_thread(_name(nr), notif.data.args, notif.pid):
            return False
        try:
            fcntl.ioctl(self.fd, _NOTIF_ID_VALID, ctypes.c_uint64(notif.id))
        except OSError:
            return False
        return True

    def _violation(self, nr: int, notif: _Notif, *, refused: bool, fixed: bool) -> None:
        name = _name(nr)
        with self._lock:
            probe = self.phase == "startup" and policy.startup_probe(name, notif.data.args)
            if probe:
                self.probes[probe] += 1
                return
        self.violations[name] += 1
        now = time.monotonic()
        if now - self._last_event.get(name, -10.0) < 1.0:
            self._pending[name] += 1  # reported with the next event for this syscall
            self._pending_phase[name] = self.phase
            return
        start, sent = self._window
        if now - start >= 1.0:
            start, sent = now, 0
        if sent >= EVENTS_PER_SECOND:
            self._over_budget[self.phase] += 1  # in the summary event, not in the per-name one
            self._window = (start, sent)
            return
        self._window = (start, sent + 1)
        self._last_event[name] = now
        record: dict[str, Any] = {
            "syscall": name,
            "nr": nr,
            "pid": int(notif.pid),
            "mode": self.mode,
            "phase": self.phase,
            "action": "refused_eperm" if refused else "allowed",
            "fixed_deny_list": fixed,
            "suppressed_since_last": self._pending.pop(name, 0),
        }
        if nr == self._socket_nr:
            record["socket_domain"] = int(notif.data.args[0])
            record["socket_type"] = int(notif.data.args[1]) & 0xF
            record["socket_protocol"] = int(notif.data.args[2])
        elif name in policy.SELF_ONLY:  # aimed at another process (or a group, a user)
            record["target"] = int(notif.data.args[policy.SELF_ONLY[name][-1][0]])
        elif fixed and nr not in self.deny:  # clone asking for a namespace
            record["clone_namespace_flags"] = hex(notif.data.args[0] & policy.CLONE_NAMESPACES)
        if refused:
            self._refused.add(name)
        if self.report is not None:
            self.report(record)

    def _flush(self, force: bool = False) -> None:
        """Report counts that were held back by the one-per-second limits."""
        now = time.monotonic()
        if self._over_budget and (force or now - self._window[0] >= 1.0):
            for phase, count in sorted(self._over_budget.items()):
                if self.report is not None:
                    self.report(
                        {
                            "syscall": "*",
                            "mode": self.mode,
                            "action": "refused_eperm" if self.mode == "enforce" else "allowed",
                            "phase": phase,
                            "repeated": count,
                            "over_event_budget": EVENTS_PER_SECOND,
                        }
                    )
            self._over_budget.clear()
        for name, count in list(self._pending.items()):
            if force or now - self._last_event.get(name, 0.0) >= 1.0:
                del self._pending[name]
                self._last_event[name] = now
                if self.report is not None:
                    self.report(
                        {
                            "syscall": name,
                            "mode": self.mode,
                            "action": "refused_eperm" if name in self._refused else "allowed",
                            "phase": self._pending_phase.pop(name, self.phase),
                            "repeated": count,
                        }
                    )

    def recorded_names(self) -> set[str]:
        return {bpf.syscall_name(nr) for nr in self.seen}
