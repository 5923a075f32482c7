"""A child process for the sandbox tests: applies a real stage-2 plan (runtime.sandbox.exec),
hands the seccomp listener to the test over a Unix socket, then tries what it is told to and
prints one JSON line per probe. Run as a script by tests/integration/test_sandbox.py.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from runtime.sandbox import _linux, stage_plan
from runtime.sandbox import exec as stage2
from runtime.sandbox.seccomp import bpf, oci

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _raw(name: str, *args: int | None) -> int:
    number = bpf.syscall_number(name)
    assert number is not None, name
    result = _libc.syscall(number, *args)
    return 0 if result >= 0 else -ctypes.get_errno()


def _sock(domain: int, kind: int, protocol: int = 0) -> int:
    try:
        socket.socket(domain, kind, protocol).close()
    except OSError as exc:
        return -(exc.errno or 0)
    return 0


def _thread() -> int:
    box: list[int] = []
    worker = threading.Thread(target=lambda: box.append(1))
    worker.start()
    worker.join()
    return 0 if box == [1] else -errno.EIO


def _clone(flags: int) -> int:
    """Raw clone(2) like fork (SIGCHLD, no new stack); the child leaves at once."""
    number = bpf.syscall_number("clone")
    result = _libc.syscall(number, flags | signal.SIGCHLD, None, None, None, None)
    if result == 0:
        os._exit(0)
    if result < 0:
        return -ctypes.get_errno()
    os.waitpid(result, 0)
    return 0


def _call(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as exc:
        return -(exc.errno or 0)
    return 0


def _at_child(call: Callable[[int], object]) -> int:
    """`call` aimed at a child of this process: same uid, so only seccomp can refuse it."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    try:
        return _call(lambda: call(pid))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _at_thread(call: Callable[[int], object]) -> int:
    """`call` aimed at another thread of this process, by its thread id."""
    ready, done, tids = threading.Event(), threading.Event(), []

    def wait() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait()

    worker = threading.Thread(target=wait)
    worker.start()
    ready.wait()
    try:
        return _call(lambda: call(tids[0]))
    finally:
        done.set()
        worker.join()


def _parent_death_signal() -> int:
    """The signal this process gets when its parent dies (prctl PR_GET_PDEATHSIG)."""
    signo = ctypes.c_int(0)
    if _libc.prctl(2, ctypes.byref(signo), 0, 0, 0) != 0:
        return -ctypes.get_errno()
    return signo.value


_NOFILE = resource.RLIMIT_NOFILE
_IPPROTO_MPTCP = 262


def _open(path: str, mode: str) -> int:
    try:
        with open(path, mode) as handle:
            handle.write("x") if "w" in mode else handle.read()
    except OSError as exc:
        return -(exc.errno or 0)
    return 0


def _connect(port: str) -> int:
    with socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", int(port)))
        except OSError as exc:
            return -(exc.errno or 0)
    return 0


def _fork_many(count: int) -> int:
    """Up to `count` children that wait; how many were made before fork failed."""
    read_end, write_end = os.pipe()
    children = []
    for _ in range(count):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    for pid in children:
        os.waitpid(pid, 0)
    return len(children)


def _flood(numbers: list[int]) -> int:
    """Each number once, with zero arguments; the first result that is not EPERM, else EPERM."""
    for nr in numbers:
        result = _libc.syscall(nr, 0, 0, 0, 0, 0, 0)
        err = 0 if result >= 0 else ctypes.get_errno()
        if err != errno.EPERM:
            return -err
    return -errno.EPERM


def _socket_flood(domains: range) -> int:
    results = {_sock(domain, socket.SOCK_STREAM) for domain in domains}
    return results.pop() if len(results) == 1 else -errno.EIO


PROBES = {
    "ptrace": lambda: _raw("ptrace", 0, 0, None, None),  # PTRACE_TRACEME
    "unshare": lambda: _raw("unshare", 0x10000000),  # CLONE_NEWUSER
    "mount": lambda: _raw("mount", None, None, None, 0, None),
    "io_uring_setup": lambda: _raw(
        "io_uring_setup", 1, ctypes.addressof(ctypes.create_string_buffer(128))
    ),
    "bpf": lambda: _raw("bpf", 0, None, 0),
    "getpgid": lambda: _raw("getpgid", 0),  # harmless, and not in the engine's profile
    "udp": lambda: _sock(socket.AF_INET, socket.SOCK_DGRAM),
    "packet": lambda: _sock(17, socket.SOCK_RAW),  # AF_PACKET
    "unix": lambda: _sock(socket.AF_UNIX, socket.SOCK_STREAM),
    "clone3": lambda: _raw("clone3", None, 0),
    "thread": _thread,
    "fork": lambda: _clone(0),
    "clone_newuser": lambda: _clone(0x10000000),  # CLONE_NEWUSER
    "clone_newnet": lambda: _clone(0x40000000),  # CLONE_NEWNET
    "parent_death_signal": _parent_death_signal,
    "interfaces": lambda: len(socket.if_nameindex()),
    "ipc_namespace": lambda: os.stat("/proc/self/ns/ipc").st_ino,
    "net_namespace": lambda: os.stat("/proc/self/ns/net").st_ino,
    "user_namespace": lambda: os.stat("/proc/self/ns/user").st_ino,
    "uid": os.getuid,
    # What of the processes it can see: its own pid, and how many /proc lists.
    "getpid": os.getpid,
    "proc_processes": lambda: sum(name.isdigit() for name in os.listdir("/proc")),
    "tcp": lambda: _sock(socket.AF_INET, socket.SOCK_STREAM),
    "tcp_by_number": lambda: _sock(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "mptcp": lambda: _sock(socket.AF_INET, socket.SOCK_STREAM, _IPPROTO_MPTCP),
    "sctp": lambda: _sock(socket.AF_INET, socket.SOCK_STREAM, 132),  # IPPROTO_SCTP
    # What a hostile engine did to the front (same uid in a pod): its limits.
    "prlimit_self": lambda: _call(
        lambda: resource.prlimit(0, _NOFILE, resource.getrlimit(_NOFILE))
    ),
    "prlimit_child": lambda: _at_child(
        lambda pid: resource.prlimit(pid, _NOFILE, resource.getrlimit(_NOFILE))
    ),
    "affinity_child": lambda: _at_child(
        lambda pid: os.sched_setaffinity(pid, os.sched_getaffinity(0))
    ),
    "idle_child": lambda: _at_child(
        lambda pid: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    ),
    # What libzmq and OpenMP do: set a thread of their own by its id.
    "affinity_thread": lambda: _at_thread(
        lambda tid: os.sched_setaffinity(tid, os.sched_getaffinity(0))
    ),
    "idle_thread": lambda: _at_thread(
        lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    ),
    "affinity_self": lambda: _call(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
}


def main() -> int:
    channel_fd, plan_path, *probes = sys.argv[1:]
    with open(plan_path, "rb") as handle:
        plan = stage_plan.from_json(handle.read())
    channel = socket.socket(fileno=int(channel_fd))
    outer_path = os.environ.get("HARNESS_TEST_OUTER_PROFILE")
    if outer_path:  # the container's profile, loaded first as runc loads it
        with open(outer_path) as handle:
            outer = oci.parse_profile(json.load(handle), "outer")
        _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)  # as runc does with no-new-privileges
        bpf.compile_profile(outer, "as_written").filter.load()
    report = stage_plan.StageReport()
    try:
        report = replace(stage2.apply(plan), seccomp=plan.seccomp.report)
        listener = stage2.load_filter(plan)
    except (stage2.StageError, OSError) as exc:  # as stage 2 does: nothing runs after
        partial = exc.report if isinstance(exc, stage2.StageError) else report
        channel.sendall(stage_plan.report_to_json(replace(partial, error=str(exc))))
        return 5
    message = stage_plan.report_to_json(report)
    if listener is not None:
        socket.send_fds(channel, [message], [listener])
        os.close(listener)
    else:
        channel.sendall(message)
    channel.close()
    for probe in probes:
        name, _, arg = probe.partition(":")
        if name == "read":
            result = _open(arg, "r")
        elif name == "write":
            result = _open(arg, "w")
        elif name == "connect":
            result = _connect(arg)
        elif name == "fork_many":
            result = _fork_many(int(arg))
        elif name == "flood":  # flood:1000-3999 or flood:12,34,56
            first, dash, last = arg.partition("-")
            numbers = range(int(first), int(last) + 1) if dash else map(int, arg.split(","))
            result = _flood(list(numbers))
        elif name == "socket_flood":  # socket_flood:100-2099 (domains)
            first, _, last = arg.partition("-")
            result = _socket_flood(range(int(first), int(last) + 1))
        else:
            result = PROBES[name]()
        print(json.dumps({"probe": probe, "result": result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
