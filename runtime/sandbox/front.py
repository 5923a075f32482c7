"""The front's own seccomp filter, installed on harness itself once the engine is ready.

From then on harness only serves: it never starts another program, mounts, traces, loads BPF,
enters a new namespace or opens raw sockets. A filter on every thread (TSYNC) refuses exactly
that, with EPERM, and allows the rest: a deny list, not a profile, because the front's rarer
paths (certificate rotation, OTLP export, drain) must not fail on a syscall a recording
missed. The engine already runs and is not affected. Landlock is not applied to the front: it
binds only the calling thread, and the front's threads are already running by then.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pyseccomp

from runtime.sandbox import _linux, seccomp

# Nothing the front does after startup needs a new program.
NO_EXEC = ("execve", "execveat")
_AF_PACKET = 17


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
