"""Harness's own sandbox: Landlock from the start, a seccomp filter once the engine is ready.

`confine`: Landlock binds the calling thread and what it starts later, so it is applied right
after the configuration is read, before harness starts any thread or the engine: every
thread, the engine's stage 2 and the engine itself inherit it (the engine's own, narrower
domain is nested in it). From then on harness reads only the system, its code, the model and
signature, its secrets and TLS files; it writes only the engine's private runtime dir and
/dev/shm (both for the engine's sake). Not the rest of the filesystem: a front taken over
through its TLS or HTTP handling cannot plant files or read other mounted secrets.

`apply`: once the engine is ready harness only serves: it never starts another program,
mounts, traces, loads BPF, enters a new namespace or opens raw sockets. A filter on every
thread (TSYNC) refuses exactly that, with EPERM, and allows the rest: a deny list, not a
profile, because the front's rarer paths (certificate rotation, OTLP export, drain) must not
fail on a syscall a recording missed. The engine already runs and is not affected.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pyseccomp

from runtime.config import Config
from runtime.errors import SandboxError
from runtime.sandbox import _linux, landlock, seccomp

# Nothing the front does after startup needs a new program.
NO_EXEC = ("execve", "execveat")
_AF_PACKET = 17


def confine(cfg: Config, runtime_root: Path) -> dict[str, Any]:
    """Landlock on harness itself (sandbox.landlock decides, as for the engine). Returns the
    report; raises SandboxError (exit 5) when `required` cannot be met."""
    mode = cfg.sandbox.landlock
    threads = len(os.listdir("/proc/self/task"))
    try:
        if threads != 1 and mode != "off":  # the others would stay outside the domain
            raise OSError(
                errno.EBUSY, f"{threads} threads already run: Landlock would bind only this one"
            )
        if mode != "off":  # no_new_privs: Landlock's condition without CAP_SYS_ADMIN
            _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
        report = landlock.apply(landlock.build_front(cfg, runtime_root).to_json())
    except OSError as exc:
        if mode == "required":
            raise SandboxError(
                f"sandbox.landlock = required: harness cannot confine itself: {exc.strerror}",
                fix="run on a kernel with Landlock enabled (lsm=landlock), or set "
                "sandbox.landlock = best_effort",
            ) from exc
        report = {"mode": mode, "enforced": False, "reason": exc.strerror}
    return {"scope": "front", **report}


def apply() -> dict[str, Any]:
    """Install the filter on every thread of this process. Returns the report."""
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)  # every thread, not just this one
    eperm = pyseccomp.ERRNO(errno.EPERM)
    denied = []
    for name in (*seccomp.FIXED_DENY, *NO_EXEC):
        if seccomp.syscall_number(name) is not None:
            flt.add_rule(eperm, name)
            denied.append(name)
    # New namespaces through clone(2) (unshare is on the deny list already).
    for bit in range(64):
        if seccomp.CLONE_NAMESPACES & (1 << bit):
            flt.add_rule(eperm, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 1 << bit, 1 << bit))
    # Raw and packet sockets: the front speaks TCP and Unix sockets only.
    flt.add_rule(eperm, "socket", pyseccomp.Arg(0, pyseccomp.EQ, _AF_PACKET))
    flt.add_rule(
        eperm,
        "socket",
        pyseccomp.Arg(1, pyseccomp.MASKED_EQ, seccomp.SOCK_TYPE_MASK, socket.SOCK_RAW),
    )
    flt.load()
    return {
        "scope": "front",
        "mode": "deny_list",
        "installed": True,
        "threads": "all (TSYNC)",
        "denied": denied,
        "denied_sockets": ["AF_PACKET", "SOCK_RAW"],
        "denied_clone_flags": hex(seccomp.CLONE_NAMESPACES),
        "no_new_privs": True,
    }
