"""`harness profile`: record the syscalls the real engine makes and write an OCI profile.

The engine starts exactly as `harness serve` starts it (same stage 2, same Landlock and
privilege drop), but with a filter that sends every syscall to the supervisor, which lets it
run and counts it (no strace, no ptrace). A workload then drives startup, completions,
streamed chat, requests the engine rejects and concurrent requests, and the engine is shut
down with SIGTERM, so that the profile covers the whole life of an engine.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from runtime.config import Config
from runtime.engine.process import Engine, spawn_stage2
from runtime.errors import ConfigError, EngineError, SandboxError
from runtime.sandbox.seccomp import bpf, oci, policy
from runtime.sandbox.seccomp.notify import Supervisor
from runtime.sandbox.stage_plan import StagePlan

_SOCKET_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 5: "SOCK_SEQPACKET"}
# socket() domains a profile may allow. Raw, packet and INET datagram sockets are refused even
# if recorded: the engine has no business with them (vLLM's "UDP connect to learn my IP" is
# disabled through VLLM_HOST_IP).
_DOMAINS_ALLOWED = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK"}
_INET = {2, 10}

# tini, PID 1 in the images, runs under the container's profile too (traced from Debian's
# tini 0.19 with `strace -f tini -s -- true`): it forwards signals and reaps orphans.
TINI = frozenset(
    {
        "getpgrp", "getpid", "ioctl", "kill", "prctl", "rt_sigaction", "rt_sigprocmask",
        "rt_sigtimedwait", "setpgid", "wait4",
    }
)  # fmt: skip


# runc runs under the container's profile from the moment it loads it until it execs tini:
# traced from Debian 12's runc 1.1.5 (`strace -f podman run`), with no-new-privileges (the
# filter goes in last: fstatfs is runc's check that /proc/self/fd is procfs, CVE-2024-21626)
# and without it (the filter goes in before the uid and capability changes). A recording
# from inside the container cannot see them.
RUNC = frozenset(
    {
        "capget", "capset", "chdir", "close", "epoll_ctl", "execve", "faccessat2", "fcntl",
        "fstat", "fstatfs", "futex", "getcwd", "getdents64", "getpid", "getppid", "newfstatat",
        "openat", "prctl", "read", "setgid", "setgroups", "setuid", "write",
    }
)  # fmt: skip
# The engine's namespaces and root, made under the container's profile by the helper
# (runtime.sandbox.namespaces) and entered by stage 2 before the engine's own filter, which
# refuses them, is loaded; a recording never makes them.
STAGE2 = frozenset(
    {"mount", "mount_setattr", "pivot_root", "setns", "symlink", "umount2", "unshare"}
)
# harness's own calls that a recording's short workload may miss: the memory watchdog's scan
# of the engine's process group (watchdog.engine_pids), once a second. (Inside the image,
# harness's filter reports any call of its own the container's profile lacks.)
HARNESS = frozenset({"getpgid"})
# What a container profile holds beyond what harness serve itself calls: tini, runc, stage 2's
# namespaces, harness's rarer calls, and the engine's own filter, which `serve` loads with
# seccomp(2).
CONTAINER = TINI | RUNC | STAGE2 | HARNESS | {"seccomp"}


@dataclass
class Recording:
    names: set[str] = field(default_factory=set)
    sockets: set[tuple[int, int]] = field(default_factory=set)
    denied_seen: set[str] = field(default_factory=set)


def default_workload(model: str) -> list[dict[str, Any]]:
    prompt = "The quick brown fox"
    return [
        {"method": "GET", "path": "/v1/models"},
        {"path": "/v1/completions", "body": {"model": model, "prompt": prompt, "max_tokens": 8}},
        {
            "path": "/v1/completions",
            "body": {"model": model, "prompt": [prompt, "Hello"], "max_tokens": 4, "n": 2},
        },
        {
            "path": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
                "stream": True,
            },
        },
        {
            "path": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": 4, "stream": True},
        },
        # Rejected by the engine: unknown model, a prompt longer than the context.
        {"path": "/v1/completions", "body": {"model": "nope", "prompt": "x", "max_tokens": 1}},
        {"path": "/v1/completions", "body": {"model": model, "prompt": "x " * 5000}},
        {"method": "GET", "path": "/health"},
    ]


def load_workload(path: Path | None, model: str) -> list[dict[str, Any]]:
    if path is None:
        return default_workload(model)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"workload {path}: {exc}",
            fix='give a JSON list of {"path": ..., "body": {...}} requests',
        ) from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) and "path" in r for r in data):
        raise ConfigError(
            f"workload {path}: must be a JSON list of objects with a 'path'",
            fix='e.g. [{"path": "/v1/completions", "body": {"model": "m", "prompt": "hi"}}]',
        )
    return data


def run_workload(client: httpx.Client, requests: list[dict[str, Any]], concurrency: int) -> None:
    """Each request once, then all of them again `concurrency` at a time; any status will do
    (rejections are part of the workload)."""

    def one(req: dict[str, Any]) -> int:
        with client.stream(req.get("method", "POST"), req["path"], json=req.get("body")) as r:
            for _chunk in r.iter_bytes():
                pass
            return r.status_code

    for req in requests:
        one(req)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests * 2))


def _recording(supervisor: Supervisor, also: frozenset[str] = frozenset()) -> Recording:
    names = supervisor.recorded_names() | also
    deny = set(policy.FIXED_DENY)
    return Recording(names - deny, set(supervisor.sockets), names & deny)


def record(
    cfg: Config,
    workload: list[dict[str, Any]],
    concurrency: int = 4,
    wrapper: list[str] | None = None,
) -> Recording:
    with Engine.create(cfg, seccomp_mode="record") as engine:
        engine.stage2_wrapper = list(wrapper or [])
        engine.start()
        engine.wait_ready()
        transport = httpx.HTTPTransport(uds=str(engine.socket))
        with httpx.Client(transport=transport, base_url="http://engine", timeout=120) as client:
            run_workload(client, workload, concurrency)
        engine.stop()
        supervisor = engine.supervisor
        if supervisor is None:
            raise EngineError("the recording supervisor never started")
        deadline = time.monotonic() + 10
        while supervisor.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)  # it ends when the last engine process is gone
        supervisor.stop()
        return _recording(supervisor)


def record_container(
    config_path: Path,
    overrides: list[str],
    listen: str,
    workload: list[dict[str, Any]],
    client: tuple[Path, Path, Path],
    events_path: Path,
    concurrency: int = 4,
) -> Recording:
    """Record `harness serve` itself, front and engine together: the profile the kubelet
    applies to the whole container. harness runs under a recording filter (with only
    no_new_privs, as in a pod), and the workload goes through the front over mTLS."""
    argv = [sys.executable, "-m", "runtime", "serve", "--config", str(config_path)]
    # Only one filter in a process tree may notify: the engine runs unfiltered under the
    # recording, which therefore also sees what the engine's own profile would refuse.
    for item in [*overrides, 'sandbox.seccomp="off"']:
        argv += ["--set", item]
    plan = StagePlan(argv=argv, env=dict(os.environ), cwd=os.getcwd(), seccomp=bpf.recording_plan())
    supervisors: list[Supervisor] = []

    def supervise(fd: int) -> None:
        supervisors.append(Supervisor(fd, "record"))
        supervisors[-1].start()

    ca, cert, key = client
    with open(events_path, "w+b") as events:  # harness's own events, kept for the record
        proc, report = spawn_stage2(plan, on_listener=supervise, stdout=events)
        try:
            if report.error is not None:
                raise SandboxError(
                    f"cannot install the recording filter: {report.error}",
                    fix="run `harness profile --container` where harness itself may load a "
                    "seccomp filter (no_new_privs is set for it)",
                )
            _wait_for_front(proc, events)
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.load_cert_chain(str(cert), str(key))
            with httpx.Client(verify=ctx, base_url=f"https://{listen}", timeout=120) as client:
                run_workload(client, workload, concurrency)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=180)
    if not supervisors:
        raise EngineError("the recording supervisor never started")
    supervisor = supervisors[0]
    supervisor.join(timeout=30)
    supervisor.stop()
    # The engine's own filter was off for the recording; `serve` loads it with seccomp(2).
    return _recording(supervisor, CONTAINER)


def _wait_for_front(proc: subprocess.Popen[bytes], events: IO[bytes]) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(
                f"harness exited with code {proc.returncode} while recording",
                fix="its events are in the recording's .events.jsonl and its log above; the "
                "same config must start with `harness serve`",
            )
        events.seek(0)
        if b'"event_type":"front_listen"' in events.read():
            return
        time.sleep(0.5)
    raise EngineError("harness was not serving after 900 s")


def merge(recordings: list[Recording]) -> Recording:
    out = Recording()
    for rec in recordings:
        out.names |= rec.names
        out.sockets |= rec.sockets
        out.denied_seen |= rec.denied_seen
    return out


def from_profile(path: Path) -> Recording:
    """Read back a profile this module wrote, so that `--merge` can union recordings."""
    profile = oci.load_profile(path)
    rec = Recording()
    for rule in profile.rules:
        if rule.action != "SCMP_ACT_ALLOW":
            continue
        if rule.names == ("socket",) and len(rule.args) in (2, 3):  # 3: with the protocol
            rec.sockets.add((rule.args[0].value, rule.args[1].value_two))
            continue
        rec.names |= set(rule.names)
    return rec


# A container profile refuses what it does not list with SCMP_ACT_TRACE, not ERRNO. Stacked
# filters take the highest-precedence action (KILL > TRAP > ERRNO > USER_NOTIF > TRACE > LOG >
# ALLOW): an ERRNO default would silence the engine filter's notifications, and harness would
# never hear of the engine's refused calls. With no tracer attached TRACE refuses with ENOSYS,
# and no process in the container can become one: ptrace is not listed, so it is refused too.
CONTAINER_DEFAULT = "SCMP_ACT_TRACE"


def to_profile(rec: Recording, comment: str, container: bool = False) -> dict[str, Any]:
    """An engine profile (default ERRNO/EPERM), or with `container` the container's profile
    (default TRACE, see CONTAINER_DEFAULT), which keeps what the engine's namespaces need
    (STAGE2: the engine's own filter refuses those calls)."""
    deny = set(policy.FIXED_DENY) - (STAGE2 if container else set())
    names = sorted(
        (rec.names - {"socket"} - deny - set(policy.ENOSYS_ALWAYS))
        | set(policy.ALWAYS_ALLOW)
        | set(policy.HANDOFF_ALLOW)
    )
    rules: list[dict[str, Any]] = [{"names": names, "action": "SCMP_ACT_ALLOW"}]
    for domain, kind in sorted(rec.sockets):
        if domain not in _DOMAINS_ALLOWED or (domain in _INET and kind != 1):
            continue  # see _DOMAINS_ALLOWED
        args: list[dict[str, Any]] = [
            {"index": 0, "value": domain, "op": "SCMP_CMP_EQ"},
            {
                "index": 1,
                "value": policy.SOCK_TYPE_MASK,
                "valueTwo": kind,
                "op": "SCMP_CMP_MASKED_EQ",
            },
        ]
        pair = f"{_DOMAINS_ALLOWED[domain]}, {_SOCKET_TYPES.get(kind, kind)}"
        # An INET stream socket is TCP only: its protocol picks others (IPPROTO_MPTCP connects
        # past Landlock's TCP rules, IPPROTO_SCTP is stream-capable too).
        protocols = [("0", 0), ("IPPROTO_TCP", 6)] if domain in _INET else [("", None)]
        for label, protocol in protocols:
            rule = {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "comment": pair}
            rule["args"] = list(args)
            if protocol is not None:
                rule["comment"] = f"{pair}, protocol {label}"
                rule["args"].append({"index": 2, "value": protocol, "op": "SCMP_CMP_EQ"})
            rules.append(rule)
    rules.append(
        {
            "names": list(policy.ENOSYS_ALWAYS),
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 38,
            "comment": "ENOSYS, so that glibc falls back to clone",
        }
    )
    default: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1}
    if container:
        default = {"defaultAction": CONTAINER_DEFAULT}
    return {
        "comment": comment,
        **default,
        "architectures": [oci.native_arch()],
        "syscalls": rules,
    }
