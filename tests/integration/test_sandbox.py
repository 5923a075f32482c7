"""The engine's sandbox, for real: a child process applies the stage-2 plan (Landlock,
privilege drop, the shipped seccomp profile) exactly as before vLLM, hands its seccomp
listener to a real supervisor here, and then tries things it must not do."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime import recorder
from runtime.sandbox import landlock, namespaces, stage_plan
from runtime.sandbox.seccomp import bpf, configured, oci, policy
from runtime.sandbox.seccomp.notify import EVENTS_PER_SECOND, Supervisor
from runtime.sandbox.stage_plan import LandlockPlan, NamespacesPlan, PrivilegesPlan, StagePlan
from tests.support import POD, REPO, run_cli

PROFILE = REPO / "seccomp" / "engine-cpu.json"
SUPPORT = REPO / "tests" / "support"
PROBE = SUPPORT / "sandbox_probe.py"
UNDER_PROFILE = SUPPORT / "under_profile.py"
# Docker's default seccomp profile (moby/profiles, Apache-2.0), unchanged.
DOCKER_DEFAULT = SUPPORT / "data" / "docker-default-seccomp.json"
AS_ROOT = os.geteuid() == 0
NO_LANDLOCK = LandlockPlan(mode="off")


def _plan(
    mode: str,
    fence: LandlockPlan | None = None,
    pod: bool = False,
    spaces: NamespacesPlan | None = None,
    tasks: int | None = None,
    uid: int = 65534,
) -> StagePlan:
    root = AS_ROOT and not pod
    drop = PrivilegesPlan(uid, uid, tasks) if root else PrivilegesPlan(None, None, tasks)
    profile = json.loads(PROFILE.read_text()) if mode != "off" else {}
    return StagePlan(
        argv=[sys.executable],  # the probe runs the plan itself and never execs
        env={},
        cwd=str(REPO),
        namespaces=spaces or NamespacesPlan("off"),
        privileges=drop,
        landlock=fence or NO_LANDLOCK,
        seccomp=bpf.compile_plan(mode, profile, str(PROFILE)),
    )


def _namespaces(workdir: Path, mode: str, wrapper: list[str], pod: bool) -> namespaces.Prepared:
    """The helper's namespaces for the probe, made by the probe's own uid (the owner of a
    user namespace must be the one entering it): a root with the system, this checkout and
    its interpreter, and the workdir writable."""
    mount_point = workdir / ".root"
    mount_point.mkdir(exist_ok=True)
    if pod and AS_ROOT:
        os.chown(mount_point, 10001, 10001)
    root = namespaces.RootPlan(
        mount_point=str(mount_point),
        read=[*landlock.SYSTEM_READ, str(REPO), sys.prefix, sys.base_prefix],
        write=[str(workdir)],
        devices=list(landlock.DEVICES),
        shm_bytes=64 << 20,
    )
    return namespaces.prepare(mode, root, wrapper)


class Run:
    def __init__(self, report: dict[str, Any], results: dict[str, int], events: list[Any]):
        self.report = report
        self.results = results
        self.events = events
        self.returncode = 0
        self.probes: dict[str, int] = {}
        self.violations: dict[str, int] = {}
        self.unknown = 0
        self.sockets: set[tuple[int, int]] = set()
        self.namespaces: dict[str, Any] = {}

    def named(self, syscall: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["syscall"] == syscall]


def sandboxed(
    workdir: Path,
    mode: str,
    probes: list[str],
    fence: LandlockPlan | None = None,
    phase: str = "serving",
    outer: dict[str, Any] | None = None,
    pod: bool = False,
    spaces: str = "off",
    failing: bool = False,
    tasks: int | None = None,
    uid: int = 65534,
) -> Run:
    """`phase`: the supervisor's (serving: every filtered call is an alert). `outer`: a
    container profile the child loads first, as runc does. `pod`: the child starts as uid
    10001 without capabilities (when the tests run as root). `spaces`: sandbox.namespaces.
    `failing`: stage 2 is expected to stop with an error in its report."""
    wrapper = POD if pod and AS_ROOT else []
    if outer is not None:
        outer_path = workdir / "outer.json"
        outer_path.write_text(json.dumps(outer))
        outer_path.chmod(0o644)
        wrapper = [*wrapper, sys.executable, str(UNDER_PROFILE), str(outer_path)]
    prepared = _namespaces(workdir, spaces, wrapper, pod)
    plan = _plan(mode, fence, pod, prepared.stage2(), tasks, uid)
    plan_path = workdir / "plan.json"
    plan_path.write_bytes(stage_plan.to_json(plan))
    plan_path.chmod(0o644)
    # The probe loads the container's profile first, as runc does.
    outer_env = {"HARNESS_TEST_OUTER_PROFILE": str(outer_path)} if outer is not None else {}
    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [
            *(POD if pod and AS_ROOT else []),
            *[sys.executable, str(PROBE), str(child.fileno()), str(plan_path), *probes],
        ],
        env={**os.environ, **outer_env},
        pass_fds=[child.fileno(), *prepared.fds.values()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    child.close()
    prepared.close()
    events: list[dict[str, Any]] = []
    supervisor = None
    chunks = []
    with parent:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(parent, 1 << 16, 1)
            for fd in fds:
                supervisor = Supervisor(fd, mode, report=events.append, phase=phase)
                supervisor.start()
            if not data:
                break
            chunks.append(data)
    out, err = proc.communicate(timeout=60)
    if supervisor is not None:
        supervisor.join(timeout=10)  # ends when the child is gone (POLLHUP)
        assert not supervisor.is_alive()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    run = Run(json.loads(b"".join(chunks)), {r["probe"]: r["result"] for r in lines}, events)
    run.namespaces = prepared.report
    run.returncode = proc.returncode
    if supervisor is not None:
        run.probes = dict(supervisor.probes)
        run.violations = dict(supervisor.violations)
        run.unknown, run.sockets = supervisor.unknown, set(supervisor.sockets)
    assert ("error" in run.report) == failing, (run.report, err.decode())
    return run


DENIED = ["ptrace", "unshare", "mount", "io_uring_setup", "bpf", "udp", "packet"]


@pytest.mark.parametrize("where", ["root", "pod"])
def test_enforce_refuses_each_forbidden_call_and_names_it_in_an_event(
    open_tmp: Path, where: str
) -> None:
    probes = [*DENIED, "clone_newuser", "unix", "clone3", "thread", "fork", "parent_death_signal"]
    run = sandboxed(open_tmp, "enforce", probes, pod=where == "pod")
    # Set after the uid change (which clears it), as root and as in a pod alike.
    assert run.results["parent_death_signal"] == signal.SIGKILL
    assert run.report["privileges"]["parent_death_signal"] == "SIGKILL"
    for probe in [*DENIED, "clone_newuser"]:
        assert run.results[probe] == -errno.EPERM, probe
    # Positive controls: an allowed socket, threads despite clone3 -> ENOSYS, and clone
    # without a namespace flag.
    assert run.results["unix"] == 0
    assert run.results["clone3"] == -errno.ENOSYS
    assert run.results["thread"] == 0 and run.results["fork"] == 0
    (clone,) = run.named("clone")
    assert clone["fixed_deny_list"] is True and clone["clone_namespace_flags"] == "0x10000000"
    for name in ("ptrace", "unshare", "mount", "io_uring_setup", "bpf"):
        (event,) = run.named(name)
        assert event["action"] == "refused_eperm" and event["fixed_deny_list"] is True
        assert event["mode"] == "enforce" and event["pid"] > 0
    sockets = {(e["socket_domain"], e["socket_type"]) for e in run.named("socket") if "nr" in e}
    assert (socket.AF_INET, socket.SOCK_DGRAM) in sockets
    # Within a second of the first refusal the AF_PACKET one is held back, then counted.
    packet = (17, socket.SOCK_RAW) in sockets or any(e.get("repeated") for e in run.named("socket"))
    assert packet
    assert run.report["seccomp"]["mode"] == "enforce" and run.report["seccomp"]["installed"]


NAMESPACE_PROBES = [
    "interfaces", "net_namespace", "ipc_namespace", "user_namespace", "uid", "getpid",
    "proc_processes",
]  # fmt: skip


def _own_namespace(kind: str) -> int:
    return os.stat(f"/proc/self/ns/{kind}").st_ino


@pytest.mark.parametrize("where", ["root", "pod", "container"])
def test_the_engine_gets_its_own_mount_network_and_ipc_namespaces_without_privilege(
    open_tmp: Path, where: str
) -> None:
    """As root, and as uid 10001 without capabilities (a pod, through a user namespace of its
    own): the engine's network holds only lo, so a listener it opens on 0.0.0.0 is reachable
    by nobody and the services on the host's loopback are out of its reach; System V IPC is
    its own; its root holds only what it was given, read-only but for its own dir, with a
    /dev/shm nobody else sees. The capabilities it held in its user namespace are gone
    before the filter, and the filter refuses any further namespace. `container`: as in a pod,
    under the shipped container profile (the image's setting)."""
    pod = where != "root"
    outer = json.loads(CONTAINER_PROFILE.read_text()) if where == "container" else None
    secret = Path("/dev/shm") / f"harness-test-{os.getpid()}"  # as the demo keeps its TLS key
    secret.write_text("key")
    (open_tmp / "w").mkdir(mode=0o777)
    (open_tmp / "w").chmod(0o777)  # the engine's uid (65534 as root, 10001 in a pod) writes
    try:
        with socket.socket() as outside:
            outside.bind(("127.0.0.1", 0))
            outside.listen()
            port = outside.getsockname()[1]
            probes = [
                *NAMESPACE_PROBES,
                f"connect:{port}",
                f"read:{secret}",
                f"write:{open_tmp}/w/mine",
                "write:/dev/shm/mine",
                f"write:{REPO}/pyproject.toml",
                "read:/root/.bashrc",
                "write:/sys/fs/cgroup/harness-probe",  # a mount below a read-only bind
                "read:/proc/1/environ",  # its PID namespace's init, of its uid in a pod
                "unshare",
                "clone_newuser",
                "tcp",
            ]
            run = sandboxed(open_tmp, "enforce", probes, outer=outer, pod=pod, spaces="required")
    finally:
        secret.unlink()
    expected = ["user", "mount", "network", "ipc"] if pod else ["mount", "network", "ipc"]
    assert run.namespaces["isolated"] is True and run.namespaces["namespaces"] == [*expected, "pid"]
    assert run.report["namespaces"]["entered"] == [*expected, "pid"]
    # Its own PID namespace with its own /proc: it is pid 2 (init is 1) and sees no other.
    assert run.report["namespaces"]["pid_in_namespace"] == 2
    assert run.results["getpid"] == 2 and run.results["proc_processes"] == 2
    # That init is not dumpable: nothing of it to read, even for its own uid (no Landlock here).
    assert run.results["read:/proc/1/environ"] == -errno.EACCES
    assert run.results["interfaces"] == 1
    assert run.results[f"connect:{port}"] == -errno.ECONNREFUSED
    assert run.results["tcp"] >= 0  # TCP itself works, inside
    for kind in ("net", "ipc"):
        assert run.results[f"{kind}_namespace"] != _own_namespace(kind), kind
    assert (run.results["user_namespace"] != _own_namespace("user")) == pod
    assert run.results["uid"] == (10001 if pod else 65534)
    # The host's /dev/shm and /root are not there; its own dir and /dev/shm are writable;
    # the rest is read-only even where the uid could write (root's checkout, as root).
    assert run.results[f"read:{secret}"] == -errno.ENOENT
    assert run.results["read:/root/.bashrc"] == -errno.ENOENT
    assert run.results[f"write:{open_tmp}/w/mine"] == 0 and run.results["write:/dev/shm/mine"] == 0
    assert not Path("/dev/shm/mine").exists()
    assert run.results[f"write:{REPO}/pyproject.toml"] == -errno.EROFS
    assert run.results["write:/sys/fs/cgroup/harness-probe"] == -errno.EROFS
    assert run.results["unshare"] == -errno.EPERM and run.results["clone_newuser"] == -errno.EPERM
    assert run.report["privileges"]["bounding_set"] == "empty"


@pytest.mark.parametrize("where", ["root", "pod"])
def test_the_engine_s_task_cap_stops_a_fork_bomb(open_tmp: Path, where: str) -> None:
    """engine.max_tasks is RLIMIT_NPROC in stage 2: as root it counts every task of the
    engine's uid (a uid of its own here: 65534 runs the other tests' engines), in a pod (its
    own user namespace) only the engine's. 200 forks asked, fewer than 64 made."""
    run = sandboxed(
        open_tmp,
        "enforce",
        ["fork_many:200"],
        pod=where == "pod",
        spaces="auto",
        tasks=64,
        uid=54321,
    )
    assert run.report["privileges"]["rlimits"]["nproc"] == 64
    assert 32 < run.results["fork_many:200"] < 64


def _profile_without(names: set[str]) -> dict[str, Any]:
    profile = json.loads(CONTAINER_PROFILE.read_text())
    for rule in profile["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n not in names]
    return profile


@pytest.mark.parametrize("missing", ["unshare", "mount"])
def test_where_the_node_refuses_namespaces_auto_says_why_and_required_stops(
    open_tmp: Path, missing: str
) -> None:
    """A container profile without unshare, or without mount (as runtimes' default profiles
    are), as in a pod: `auto` runs on in harness's namespaces and the report names the call;
    `required` stops before anything runs."""
    run = sandboxed(
        open_tmp,
        "enforce",
        ["net_namespace"],
        outer=_profile_without({missing}),
        pod=True,
        spaces="auto",
    )
    assert run.namespaces["isolated"] is False and run.namespaces["namespaces"] == []
    assert missing in run.namespaces["reason"]
    assert run.report["namespaces"]["entered"] == []
    assert run.results["net_namespace"] == _own_namespace("net")
    outer = open_tmp / "outer.json"
    wrapper = [*(POD if AS_ROOT else []), sys.executable, str(UNDER_PROFILE), str(outer)]
    with pytest.raises(OSError, match=missing):
        _namespaces(open_tmp, "required", wrapper, pod=True)


def test_known_startup_probes_are_refused_without_an_alert_while_the_engine_starts(
    open_tmp: Path,
) -> None:
    """vLLM's io_uring and UDP-socket probes, made while the engine starts, are refused and
    counted, not alerted; anything else (ptrace, an AF_PACKET socket) still is. The same
    probes once the engine serves are alerts (the test above)."""
    run = sandboxed(
        open_tmp, "enforce", ["io_uring_setup", "udp", "ptrace", "packet"], None, "startup"
    )
    assert all(
        run.results[p] == -errno.EPERM for p in ("io_uring_setup", "udp", "ptrace", "packet")
    )
    assert run.probes == {"io_uring_setup": 1, "socket(AF_INET, SOCK_DGRAM)": 1}
    assert {e["syscall"] for e in run.events} == {"ptrace", "socket"}
    (packet,) = [e for e in run.events if e["syscall"] == "socket"]
    assert packet["socket_domain"] == 17 and packet["phase"] == "startup"


CONTAINER_PROFILE = REPO / "seccomp" / "harness-cpu.json"


def test_a_flooding_engine_gets_bounded_events_and_bounded_supervisor_memory(
    open_tmp: Path,
) -> None:
    """An engine that sends 3,000 numbers no kernel knows, 2,000 socket families that do not
    exist and one call each of every syscall its profile refuses: all refused, all counted,
    but the log gets at most EVENTS_PER_SECOND events a second in all plus summaries, the
    unknown numbers are one name, and nothing of the engine's choosing is kept."""
    compiled = bpf.compile_profile(oci.load_profile(PROFILE), "enforce")
    stub_from = compiled.stub_from
    assert stub_from is not None
    permitted = {*compiled.allowed, *compiled.conditional, *policy.ENOSYS_ALWAYS}
    refused = [
        nr
        for nr in range(stub_from)
        if bpf.syscall_name(nr) not in permitted and not bpf.syscall_name(nr).startswith("syscall_")
    ]
    assert len(refused) > 3 * EVENTS_PER_SECOND
    probes = [
        "flood:1000-3999",
        "socket_flood:100-2099",
        "flood:" + ",".join(map(str, refused)),
        "unix",
    ]
    run = sandboxed(open_tmp, "enforce", probes)
    assert run.results["flood:1000-3999"] == -errno.EPERM
    assert run.results["socket_flood:100-2099"] == -errno.EPERM
    assert run.results["flood:" + ",".join(map(str, refused))] == -errno.EPERM
    assert run.results["unix"] == 0  # the engine still works
    assert run.unknown == 3000 and run.violations["unknown"] == 3000
    assert run.violations["socket"] == 2000
    assert run.sockets == set()  # only a recording keeps socket families, and only real ones
    named = [e for e in run.events if "repeated" not in e]
    assert len(named) <= 2 * EVENTS_PER_SECOND, len(named)  # the flood lasts well under 2 s
    [first_unknown] = [e for e in named if e["syscall"] == "unknown"]
    assert first_unknown["nr"] == 1000
    over = [e for e in run.events if e.get("over_event_budget")]
    assert over and sum(e["repeated"] for e in over) > 0
    counted = sum(e.get("repeated", 1) for e in run.events if e["syscall"] != "*")
    assert counted + sum(e["repeated"] for e in over) == 3000 + 2000 + len(refused)


AIMED_AT_ANOTHER = {
    "prlimit_child": "prlimit64",
    "affinity_child": "sched_setaffinity",
    "idle_child": "sched_setscheduler",
}
ON_ITSELF = [
    "prlimit_self", "affinity_self", "affinity_thread", "idle_thread", "tcp", "tcp_by_number",
    "unix",
]  # fmt: skip


@pytest.mark.parametrize("spaces", ["off", "required"])
@pytest.mark.parametrize("mode", ["enforce", "off"])
@pytest.mark.parametrize("where", ["root", "pod"])
def test_the_engine_tunes_itself_only_and_opens_tcp_only(
    open_tmp: Path, mode: str, where: str, spaces: str
) -> None:
    """In a pod the front runs under the engine's uid: a hostile engine lowered the front's
    open-files limit, pinned it and parked it at SCHED_IDLE, and connected over MPTCP where
    TCP was fenced. Aimed at a child of its own (same uid: only seccomp can refuse), each call
    is refused and reported with its target; on itself and on its own threads by thread id
    (libzmq, OpenMP), and TCP, they still work, with no event. The control: without the filter
    every one of them succeeds. Both as root (the engine drops to 65534) and as in a pod (uid
    10001, no capabilities, no uid change). With the engine's namespaces (`required`) its
    thread ids are those of its own PID namespace, which the supervisor translates."""
    probes = [*AIMED_AT_ANOTHER, "mptcp", "sctp", *ON_ITSELF]
    run = sandboxed(open_tmp, mode, probes, pod=where == "pod", spaces=spaces)
    assert ("pid" in run.namespaces.get("namespaces", [])) == (spaces == "required")
    if where == "pod" and AS_ROOT:
        assert run.report["privileges"]["uid"] == 10001, run.report["privileges"]
    assert all(run.results[p] == 0 for p in ON_ITSELF), run.results
    if mode == "off":
        assert all(run.results[p] == 0 for p in AIMED_AT_ANOTHER), run.results
        return
    for probe in [*AIMED_AT_ANOTHER, "mptcp", "sctp"]:
        assert run.results[probe] == -errno.EPERM, probe
    for name in AIMED_AT_ANOTHER.values():
        (event,) = run.named(name)
        assert event["action"] == "refused_eperm" and event["target"] > 0, event
        assert event["target"] != event["pid"]
    sockets = [e for e in run.named("socket") if "nr" in e]
    assert sockets[0]["socket_protocol"] == 262  # IPPROTO_MPTCP; SCTP's is counted with it
    assert run.violations["socket"] == 2
    # Its own threads by id: let through by the supervisor, not counted as violations.
    assert run.violations["sched_setaffinity"] == run.violations["sched_setscheduler"] == 1


@pytest.mark.parametrize("outer_default", ["shipped", "SCMP_ACT_ERRNO"])
def test_under_the_container_profile_the_engines_refusals_still_reach_harness(
    open_tmp: Path, outer_default: str
) -> None:
    """The shipped container profile (loaded first, as runc loads it) refuses what it does not
    list with TRACE, below the engine filter's notification: every call both refuse is still
    answered by harness's supervisor and reported. The control: with an ERRNO default, as
    container profiles usually have, the kernel takes the container's ERRNO and harness hears
    of none of them."""
    outer = json.loads(CONTAINER_PROFILE.read_text())
    assert outer["defaultAction"] == "SCMP_ACT_TRACE"
    if outer_default != "shipped":
        outer["defaultAction"] = outer_default
    probes = ["ptrace", "bpf", "io_uring_setup", "packet"]
    allowed = bpf.compile_profile(oci.parse_profile(outer, "outer")).allowed
    assert not {"ptrace", "bpf", "io_uring_setup"} & set(allowed)  # both refuse them
    run = sandboxed(open_tmp, "enforce", [*probes, "unix", "thread"], outer=outer)
    assert all(run.results[p] == -errno.EPERM for p in probes), run.results
    assert run.results["unix"] == 0 and run.results["thread"] == 0
    reported = {e["syscall"] for e in run.events}
    if outer_default == "shipped":
        assert reported == {"ptrace", "bpf", "io_uring_setup", "socket"}
    else:
        assert reported == set()


@pytest.mark.parametrize(
    ("name", "args", "label"),
    [
        ("io_uring_setup", [1, 0], "io_uring_setup"),
        ("socket", [2, 2 | 0o2000000, 0], "socket(AF_INET, SOCK_DGRAM)"),  # SOCK_CLOEXEC too
        ("socket", [10, 2, 0], "socket(AF_INET6, SOCK_DGRAM)"),
        ("socket", [2, 1, 0], None),  # TCP
        ("socket", [17, 3, 0], None),  # AF_PACKET
        ("socket", [1, 2, 0], None),  # a Unix datagram socket is no probe
        ("ptrace", [0, 0], None),
    ],
)
def test_startup_probe_labels(name: str, args: list[int], label: str | None) -> None:
    assert policy.startup_probe(name, args) == label


@pytest.mark.parametrize("spaces", ["off", "required"])
def test_kill_mode_kills_the_process_with_sigsys(open_tmp: Path, spaces: str) -> None:
    """With its own PID namespace (`required`) the engine is not stage 2's process but its
    grandchild: stage 2's process ends the same way, by SIGSYS, which is what harness sees."""
    run = sandboxed(open_tmp, "kill", ["unix", "ptrace", "unix"], spaces=spaces)
    assert ("pid" in run.namespaces.get("namespaces", [])) == (spaces == "required")
    assert run.returncode == -signal.SIGSYS
    assert list(run.results) == ["unix"]  # nothing ran after the forbidden call
    assert run.events == []  # no supervisor in kill mode: the kernel acts alone
    event = policy.exit_event(run.returncode, mode="kill")
    assert event is not None and event["signal"] == "SIGSYS"
    assert policy.exit_event(1, mode="kill") is None


def test_complain_mode_lets_calls_through_and_reports_them(open_tmp: Path) -> None:
    run = sandboxed(open_tmp, "complain", ["getpgid", "ptrace"])
    assert run.results["getpgid"] == 0
    (event,) = run.named("getpgid")
    assert event["action"] == "allowed" and event["mode"] == "complain"
    # The fixed deny list is refused even when complaining (a new namespace too: below).
    assert run.results["ptrace"] == -errno.EPERM
    assert run.named("ptrace")[0]["action"] == "refused_eperm"


def test_clone_into_a_new_namespace_is_refused_in_every_mode(open_tmp: Path) -> None:
    """unshare(2) is on the deny list; clone(2) with a namespace flag does the same."""
    control = sandboxed(open_tmp, "off", ["clone_newuser", "fork"])
    if control.results["clone_newuser"] != 0:
        pytest.skip(f"this kernel refuses user namespaces itself ({control.results})")
    for mode in ("enforce", "complain"):
        run = sandboxed(open_tmp, mode, ["clone_newuser", "clone_newnet", "fork"])
        assert run.results["clone_newuser"] == -errno.EPERM, mode
        assert run.results["clone_newnet"] == -errno.EPERM, mode
        assert run.results["fork"] == 0, mode
        assert {e["action"] for e in run.named("clone")} == {"refused_eperm"}
    killed = sandboxed(open_tmp, "kill", ["fork", "clone_newuser", "fork"])
    assert killed.returncode == -signal.SIGSYS and list(killed.results) == ["fork"]


def test_getpgid_is_refused_under_enforce(open_tmp: Path) -> None:
    """The complain test's control: the same call without complain mode."""
    run = sandboxed(open_tmp, "enforce", ["getpgid"])
    assert run.results["getpgid"] == -errno.EPERM


@pytest.mark.skipif(landlock.abi_version() < 4, reason="Landlock TCP rules need ABI 4")
def test_inside_the_sandbox_paths_and_ports_are_fenced(open_tmp: Path) -> None:
    model = open_tmp / "model"
    model.mkdir(mode=0o755)
    (model / "weights").write_text("w")
    (model / "weights").chmod(0o644)
    private = open_tmp / "private"
    private.mkdir(mode=0o755)
    (private / "secret.txt").write_text("s")
    (private / "secret.txt").chmod(0o644)  # only Landlock stands in the way
    runtime_dir = open_tmp / "runtime"
    runtime_dir.mkdir()
    runtime_dir.chmod(0o777)  # the probe runs as uid 65534 when the tests run as root
    with socket.socket() as allowed, socket.socket() as other:
        for listener in (allowed, other):
            listener.bind(("127.0.0.1", 0))
            listener.listen()
        ok_port, other_port = allowed.getsockname()[1], other.getsockname()[1]
        fence = landlock.LandlockPlan(
            mode="required",
            read=[*landlock.SYSTEM_READ, sys.prefix, sys.base_prefix, str(model)],
            write=[str(runtime_dir)],
            devices=list(landlock.DEVICES),
            tcp_ports=[ok_port],
        )
        run = sandboxed(
            open_tmp,
            "enforce",
            [
                f"read:{model / 'weights'}",
                f"write:{model / 'planted'}",
                f"read:{private / 'secret.txt'}",
                f"write:{runtime_dir / 'scratch'}",
                f"connect:{ok_port}",
                f"connect:{other_port}",
                "udp",
            ],
            fence,
        )
    assert run.report["landlock"]["enforced"] is True
    assert run.results[f"read:{model / 'weights'}"] == 0
    assert run.results[f"write:{model / 'planted'}"] == -errno.EACCES
    assert not (model / "planted").exists()
    assert run.results[f"read:{private / 'secret.txt'}"] == -errno.EACCES
    assert run.results[f"write:{runtime_dir / 'scratch'}"] == 0
    assert run.results[f"connect:{ok_port}"] == 0
    assert run.results[f"connect:{other_port}"] == -errno.EACCES
    assert run.results["udp"] == -errno.EPERM
    if AS_ROOT:
        assert run.report["privileges"]["uid"] == 65534


# --- profiles ---------------------------------------------------------------------------------


def test_shipped_profile_compiles_in_every_mode_and_allows_nothing_on_the_deny_list() -> None:
    profile = oci.load_profile(PROFILE)
    for mode in ("enforce", "kill", "complain"):
        compiled = bpf.compile_profile(profile, mode)
        assert not set(policy.FIXED_DENY) & set(compiled.allowed + compiled.conditional)
        assert compiled.stub_from is not None and compiled.stub_from > 400
    names = {n for rule in profile.rules if rule.action == "SCMP_ACT_ALLOW" for n in rule.names}
    assert {"clone", "rseq", "execve", "futex"} <= names
    assert "clone3" not in names and not set(policy.FIXED_DENY) & names


def test_seccomp_check_loads_dockers_default_profile() -> None:
    result = run_cli("seccomp", "check", str(DOCKER_DEFAULT), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["default_action"] == "SCMP_ACT_ERRNO"
    assert summary["allowed"] > 250
    assert "socket" in summary["allowed_with_argument_checks"]
    # Docker allows ptrace on recent kernels; harness's fixed list never does.
    assert "ptrace" in summary["fixed_deny_list_allowed_by_profile"]


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda p: p.update(defaultAction="SCMP_ACT_NOPE"), "defaultAction"),
        (lambda p: p["syscalls"][0].update(names=[]), "syscalls[0].names"),
        (lambda p: p["syscalls"][1]["args"][0].update(op="SCMP_CMP_ALMOST"), "syscalls[1].args[0]"),
        (lambda p: p.update(architectures=["SCMP_ARCH_S390X"]), "architectures"),
    ],
)
def test_seccomp_check_refuses_a_broken_profile_naming_the_field(
    tmp_path: Path, edit: Any, where: str
) -> None:
    profile = json.loads(PROFILE.read_text())
    edit(profile)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(profile))
    result = run_cli("seccomp", "check", str(broken))
    assert result.returncode == 2
    assert where in result.stderr and "fix:" in result.stderr


def test_profile_round_trip_and_merge_keep_the_fixed_rules(tmp_path: Path) -> None:
    first = recorder.Recording({"read", "write", "ptrace"}, {(1, 1), (2, 2), (17, 3)})
    second = recorder.Recording({"read", "mremap"}, {(2, 1), (10, 1)})
    merged = recorder.merge([first, second])
    profile = recorder.to_profile(merged, "test")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    back = recorder.from_profile(path)
    assert {"read", "write", "mremap", "clone", "rseq"} <= back.names
    assert "ptrace" not in back.names  # the fixed deny list wins over any recording
    # UDP and packet sockets never make it into a profile; stream sockets do.
    assert back.sockets == {(1, 1), (2, 1), (10, 1)}
    bpf.compile_profile(oci.load_profile(path), "enforce")
    # An INET stream socket is TCP only: protocol 0 or IPPROTO_TCP, never MPTCP or SCTP.
    assert _inet_stream_protocols(profile) == {2: {0, 6}, 10: {0, 6}}


def _inet_stream_protocols(profile: dict[str, Any]) -> dict[int, set[int | None]]:
    found: dict[int, set[int | None]] = {}
    for rule in profile["syscalls"]:
        args = {a["index"]: a for a in rule.get("args") or []}
        if rule["names"] == ["socket"] and args[0]["value"] in (2, 10):
            protocol = args[2]["value"] if 2 in args else None
            found.setdefault(args[0]["value"], set()).add(protocol)
    return found


@pytest.mark.parametrize("name", ["engine-cpu.json", "engine-cuda.json", "harness-cpu.json"])
def test_shipped_profiles_allow_inet_stream_sockets_for_tcp_only(name: str) -> None:
    profile = json.loads((REPO / "seccomp" / name).read_text())
    assert _inet_stream_protocols(profile) == {2: {0, 6}, 10: {0, 6}}


def _engine_cfg(tmp_path: Path, device: str, tp: int, profile: str | None = None) -> Any:
    from runtime import config

    sandbox = {"seccomp_profile": profile} if profile else {}
    return config.Config.model_validate(
        {
            "model": {"dir": str(tmp_path), "served_name": "m", "unsafe_unsigned": True},
            "front": {
                "allowed_identities": ["spiffe://x/y"],
                "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"},
            },
            "engine": {"device": device, "vllm": {"tensor_parallel_size": tp}},
            "sandbox": sandbox,
        }
    )


_MULTI_GPU_CALLS = r"""
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    result = libc.syscall(*args)
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
pidfd = libc.syscall(434, os.getpid(), 0)  # pidfd_open
try:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()
    dgram = "ok"
except OSError as err:
    dgram = errno.errorcode[err.errno]
print(" ".join([
    "pidfd_open=" + ("ok" if pidfd >= 0 else errno.errorcode[ctypes.get_errno()]),
    "pidfd_getfd=" + call("pidfd_getfd", 438, pidfd, 0, 0),
    "memfd_create=" + call("memfd_create", 319, b"nccl", 0),
    "unix_dgram=" + dgram,
]))
"""


def test_a_multi_gpu_engine_gets_the_prepared_rules_and_the_kernel_applies_them(
    tmp_path: Path,
) -> None:
    """device cuda with two ranks: the shipped engine-cuda.json plus MULTI_GPU_RULES (NCCL's
    handle passing; prepared, not yet run on a GPU); one GPU, the CPU, or a profile of one's
    own: the file as it is. The calls are refused under engine-cuda.json alone and allowed
    with the rules, by this kernel (a child under each profile, as runc loads one)."""
    data, path, multi = configured.engine_profile(_engine_cfg(tmp_path, "cuda", 2))
    assert multi and path.name == "engine-cuda.json"
    assert data["syscalls"][-len(policy.MULTI_GPU_RULES) :] == list(policy.MULTI_GPU_RULES)
    configured.check_config(_engine_cfg(tmp_path, "cuda", 2))  # compiles here
    for cfg in (
        _engine_cfg(tmp_path, "cuda", 1),
        _engine_cfg(tmp_path, "cpu", 2),
        _engine_cfg(tmp_path, "cuda", 2, str(REPO / "seccomp" / "engine-cuda.json")),
    ):
        assert configured.engine_profile(cfg)[2] is False
    outcomes = {}
    for name, profile in (
        ("alone", json.loads(path.read_text())),
        ("with_rules", data),
    ):
        written = tmp_path / f"{name}.json"
        written.write_text(json.dumps(profile))
        result = subprocess.run(
            [sys.executable, str(UNDER_PROFILE), str(written),
             sys.executable, "-c", _MULTI_GPU_CALLS],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outcomes[name] = result.stdout.split()
    assert outcomes["alone"] == [
        "pidfd_open=EPERM", "pidfd_getfd=EPERM", "memfd_create=EPERM", "unix_dgram=EPERM"
    ]  # fmt: skip
    assert outcomes["with_rules"] == [
        "pidfd_open=ok", "pidfd_getfd=ok", "memfd_create=ok", "unix_dgram=ok"
    ]  # fmt: skip


def test_merge_only_cli_unions_two_profiles(tmp_path: Path, demo_dir: Path) -> None:
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    a.write_text(json.dumps(recorder.to_profile(recorder.Recording({"read"}, {(1, 1)}), "a")))
    b.write_text(json.dumps(recorder.to_profile(recorder.Recording({"mremap"}, set()), "b")))
    config = demo_dir / "demo.toml"
    result = run_cli(
        "profile",
        "--config",
        str(config),
        "--out",
        str(out),
        "--merge",
        str(a),
        "--merge",
        str(b),
        "--merge-only",
    )
    assert result.returncode == 0, result.stderr
    assert {"read", "mremap"} <= recorder.from_profile(out).names
    assert json.loads(out.read_text())["defaultAction"] == "SCMP_ACT_ERRNO"


def test_a_refreshed_container_profile_keeps_the_shipped_ones_calls_and_its_trace_default(
    tmp_path: Path, demo_dir: Path
) -> None:
    """`harness profile --container --merge-only` over the shipped profile: the same calls, the
    same TRACE default (an ERRNO one would silence the engine's filter, test above)."""
    out = tmp_path / "harness.json"
    shipped = CONTAINER_PROFILE
    args = ["profile", "--container", "--config", str(demo_dir / "demo.toml"), "--out", str(out)]
    result = run_cli(*args, "--merge", str(shipped), "--merge-only")
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["defaultAction"] == "SCMP_ACT_TRACE" and "defaultErrnoRet" not in written
    assert written["syscalls"] == json.loads(shipped.read_text())["syscalls"]


_FRONT_CHILD = r"""
import errno, json, os, socket, subprocess, threading
from runtime.sandbox import front
from runtime.sandbox.seccomp import bpf, configured, oci, policy
from tests.support.sandbox_probe import PROBES
import ctypes
libc = ctypes.CDLL(None, use_errno=True)

def ptrace():
    nr = bpf.syscall_number("ptrace")
    return 0 if libc.syscall(nr, 0, 0, None, None) >= 0 else -ctypes.get_errno()

def sock(domain, kind):
    try:
        socket.socket(domain, kind).close()
        return 0
    except OSError as exc:
        return -exc.errno

go, done, seen = threading.Event(), threading.Event(), {}
def early():  # started before the filter: TSYNC must cover it too
    go.wait()
    seen["ptrace_in_early_thread"] = ptrace()
    done.set()
threading.Thread(target=early).start()
seen["clone_newuser_before"] = PROBES["clone_newuser"]()
events, gone = [], threading.Event()
report = front.apply(None, events.append, gone.set)
seen["clone_newuser"] = PROBES["clone_newuser"]()
go.set(); done.wait()
try:
    subprocess.run(["/bin/true"], check=True)
    seen["exec"] = 0
except OSError as exc:
    seen["exec"] = -exc.errno
seen["udp"] = sock(socket.AF_INET, socket.SOCK_DGRAM)
seen["tcp"] = sock(socket.AF_INET, socket.SOCK_STREAM)
seen["raw"] = sock(socket.AF_INET, socket.SOCK_RAW)
seen["packet"] = sock(17, socket.SOCK_RAW)
for _ in range(100):  # the supervisor process reports within a second
    if len({e["syscall"] for e in events}) >= 4:
        break
    threading.Event().wait(0.05)
# Its supervisor killed: still refused (ENOSYS, closed not open), and harness hears of it.
os.kill(report["supervisor_pid"], 9)
seen["reporter_gone"] = gone.wait(10)
seen["ptrace_after"] = ptrace()
print(json.dumps({"report": report, "seen": seen, "events": events}))
"""


def test_front_filter_covers_every_thread_and_refuses_exec_and_raw_sockets() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FRONT_CHILD], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    seen = out["seen"]
    assert seen["ptrace_in_early_thread"] == -errno.EPERM
    assert seen["exec"] == -errno.EPERM
    assert seen["clone_newuser_before"] == 0 and seen["clone_newuser"] == -errno.EPERM
    assert seen["packet"] == -errno.EPERM and seen["raw"] == -errno.EPERM
    # What the front does keep working: TCP, and UDP (DNS for an OTLP collector's name).
    assert seen["tcp"] == 0 and seen["udp"] == 0
    assert "execve" in out["report"]["denied"] and "ptrace" in out["report"]["denied"]
    # Each refusal is reported by the filter's supervisor process, which is not harness.
    events = {e["syscall"]: e for e in out["events"]}
    assert set(events) == {"ptrace", "clone", "execve", "socket"}, out["events"]
    assert all(e["scope"] == "front" and e["action"] == "refused_eperm" for e in events.values())
    assert events["clone"]["clone_namespace_flags"] == "0x10000000"
    assert events["socket"]["socket_domain"] in (socket.AF_INET, 17)
    assert out["report"]["violations"].startswith("seccomp_violation events")
    assert seen["reporter_gone"] is True and seen["ptrace_after"] == -errno.ENOSYS


@pytest.mark.skipif(landlock.abi_version() < 1, reason="no Landlock on this kernel")
def test_cuda_engines_may_write_existing_files_under_proc(open_tmp: Path) -> None:
    """cuInit names the driver's threads through /proc/<pid>/task/<tid>/comm, opened with
    O_TRUNC, and fails without it (tests/gpu/test_gpu_sandbox.py). The plan gives a cuda
    engine that rule and a CPU engine none; under real Landlock the rule is what lets the
    write through."""
    from runtime.config import Config

    base: dict[str, Any] = {
        "model": {"dir": "/models/m", "served_name": "demo", "unsafe_unsigned": True},
        "front": {
            "allowed_identities": ["x.example"],
            "tls": {"cert": "/c", "key": "/k", "client_ca": "/ca"},
        },
    }
    cuda = landlock.build(
        Config.model_validate({**base, "engine": {"device": "cuda"}}), Path("/r"), []
    )
    cpu = landlock.build(Config.model_validate(base), Path("/r"), [])
    assert cuda.write_files == ["/proc"] and cpu.write_files == []
    assert "/proc" not in cuda.write

    runtime_dir = open_tmp / "runtime"
    runtime_dir.mkdir()
    runtime_dir.chmod(0o777)
    probes = ["write:/proc/thread-self/comm"]
    results = {}
    for write_files in (["/proc"], []):
        fence = landlock.LandlockPlan(
            mode="required",
            read=[*landlock.SYSTEM_READ, sys.prefix, sys.base_prefix],
            write=[str(runtime_dir)],
            devices=list(landlock.DEVICES),
            write_files=write_files,
        )
        run = sandboxed(open_tmp, "off", probes, fence)
        assert run.report["landlock"]["enforced"] is True
        results[bool(write_files)] = run.results
    assert results[True]["write:/proc/thread-self/comm"] == 0
    assert results[False]["write:/proc/thread-self/comm"] == -errno.EACCES


_CONFINE_CHILD = r"""
import json, os, shutil, signal, subprocess, sys, threading
from pathlib import Path
from runtime import config
from runtime.engine.process import make_runtime_dir
from runtime.errors import SandboxError
from runtime.sandbox import front

CONFIG, OUTSIDE, MODE, THREAD = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
cfg = config.load(CONFIG, [f'sandbox.landlock="{MODE}"'])
paths = make_runtime_dir(cfg)
if THREAD:  # already running when harness confines itself
    threading.Thread(target=threading.Event().wait, daemon=True).start()
try:
    report = front.confine(cfg, paths.root)
except SandboxError as exc:
    shutil.rmtree(paths.root)
    print(json.dumps({"error": exc.message}))
    sys.exit(0)

def attempt(action):
    try:
        action()
        return 0
    except OSError as exc:
        return -exc.errno

seen = {
    "read_model": attempt(lambda: (cfg.model.dir / "config.json").read_bytes()),
    "read_signature": attempt(lambda: cfg.model.signature.path.read_bytes()),
    "read_tls_key": attempt(lambda: Path(cfg.front.tls.key).read_bytes()),
    "read_secrets": attempt(lambda: list(cfg.secrets.dir.iterdir())),
    "lazy_import": attempt(lambda: __import__("runtime.secrets.vault")),
    "read_outside": attempt(lambda: (OUTSIDE / "other-secret").read_bytes()),
    "write_outside": attempt(lambda: (OUTSIDE / "planted").write_text("x")),
    "write_next_to_runtime": attempt(lambda: paths.root.with_suffix(".planted").mkdir()),
    "write_runtime": attempt(lambda: (paths.root / "file").write_text("x")),
    "exec": attempt(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)),
    "remove_runtime": attempt(lambda: shutil.rmtree(paths.root)),
    "signal_outside": attempt(lambda: os.kill(os.getppid(), 0)),  # the test, not its child
}
started = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
seen["signal_inside"] = attempt(lambda: os.kill(started.pid, signal.SIGTERM))  # like the engine
started.wait()
print(json.dumps({"report": report, "seen": seen}))
"""


def _confined(demo_dir: Path, outside: Path, mode: str, thread: bool = False) -> dict[str, Any]:
    config = demo_dir / "demo.toml"
    argv = [sys.executable, "-c", _CONFINE_CHILD, str(config), str(outside), mode, str(+thread)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(landlock.abi_version() < 1, reason="no Landlock on this kernel")
def test_harness_confines_itself_to_what_serving_needs(demo_dir: Path, tmp_path: Path) -> None:
    """`harness serve` applies Landlock to itself before its first thread: it still reads
    its model, signature, TLS key and secrets, imports its own code, writes and removes the
    engine's runtime dir and starts the engine's stage 2; it reads and writes nothing else
    (another folder's secret, a file planted next to the runtime dir or elsewhere), and
    it signals only processes it started, such as the engine."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "other-secret").write_text("not for the front")
    out = _confined(demo_dir, outside, "required")
    assert out["report"]["scope"] == "front" and out["report"]["enforced"] is True
    assert out["report"]["tcp"]["enforced"] is False  # the front binds and exports
    seen = out["seen"]
    allowed = ["read_model", "read_signature", "read_tls_key", "read_secrets", "lazy_import"]
    allowed += ["write_runtime", "exec", "remove_runtime", "signal_inside"]
    assert {name: seen[name] for name in allowed} == dict.fromkeys(allowed, 0)
    denied = ["read_outside", "write_outside", "write_next_to_runtime"]
    assert {name: seen[name] for name in denied} == dict.fromkeys(denied, -errno.EACCES)
    if landlock.abi_version() >= 6:  # signals reach only what harness started
        assert seen["signal_outside"] == -errno.EPERM
    assert not (outside / "planted").exists()


@pytest.mark.skipif(landlock.abi_version() < 1, reason="no Landlock on this kernel")
def test_harness_does_not_confine_itself_with_threads_already_running(
    demo_dir: Path, tmp_path: Path
) -> None:
    """Landlock would bind only the calling thread: with another already running, harness
    says so (best_effort) or refuses to start (required, exit 5)."""
    best = _confined(demo_dir, tmp_path, "best_effort", thread=True)
    assert best["report"]["enforced"] is False
    assert "2 threads already run" in best["report"]["reason"]
    assert "2 threads already run" in _confined(demo_dir, tmp_path, "required", True)["error"]


_GPU_RULES_CHILD = r"""
import json, sys
from runtime import config
from runtime.engine.process import make_runtime_dir
from runtime.sandbox import front, landlock
landlock.NVIDIA_DEVICES = sys.argv[2] + "/nvidia*"  # stand-ins for /dev/nvidia*
settings = ['engine.device="cuda"', 'sandbox.landlock="required"', 'sandbox.seccomp="off"']
cfg = config.load(sys.argv[1], settings)
paths = make_runtime_dir(cfg)
report = front.confine(cfg, paths.root)
engine = landlock.build(cfg, paths.root, [])  # as the engine's start builds them, later
print(json.dumps({"front": report["filesystem"]["devices"], "engine": engine.devices}))
"""


@pytest.mark.skipif(landlock.abi_version() < 1, reason="no Landlock on this kernel")
def test_a_cuda_engine_gets_the_gpu_rules_after_harness_confined_itself(
    demo_dir: Path, tmp_path: Path
) -> None:
    """harness builds the engine's rules after it has confined itself, when it can no longer
    list /dev: the GPU device files must still be in them (found on a GPU: without them
    CUDA failed in the engine with EACCES on every device)."""
    devices = tmp_path / "dev"
    devices.mkdir()
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        (devices / name).touch()
    argv = [sys.executable, "-c", _GPU_RULES_CHILD, str(demo_dir / "demo.toml"), str(devices)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    expected = sorted(str(p) for p in devices.iterdir())
    assert [d for d in seen["front"] if d.startswith(str(devices))] == expected
    assert [d for d in seen["engine"] if d.startswith(str(devices))] == expected


def test_harness_s_files_inside_the_engine_s_folders_are_covered(open_tmp: Path) -> None:
    """harness's config in a folder of its own inside a folder the engine reads (the image's
    /etc/harness): that folder is an empty one for the engine; a file beside what the engine
    needs is /dev/null; harness itself still reads both."""
    shared = open_tmp / "etc"
    (shared / "harness" / "trust").mkdir(parents=True)
    (shared / "harness" / "harness.toml").write_text("[model]")
    (shared / "top.toml").write_text("secret")
    (shared / "needed.conf").write_text("needed")
    (open_tmp / ".root").mkdir()
    root = namespaces.RootPlan(
        mount_point=str(open_tmp / ".root"),
        read=[*landlock.SYSTEM_READ, str(REPO), sys.prefix, sys.base_prefix, str(shared)],
        write=[str(open_tmp / "w")],
        hide=[str(shared / "harness" / "harness.toml"), str(shared / "top.toml")],
    )
    (open_tmp / "w").mkdir()
    prepared = namespaces.prepare("required", root)
    assert prepared.report["root"]["hidden"] == [str(shared / "harness"), str(shared / "top.toml")]
    inside = """
import json, os, sys
from runtime.sandbox import namespaces
from runtime.sandbox.stage_plan import NamespacesPlan
namespaces.enter(NamespacesPlan(**json.loads(sys.argv[1])))
base = sys.argv[2]
print(json.dumps([sorted(os.listdir(base)), os.listdir(base + "/harness"),
                  open(base + "/top.toml").read(), open(base + "/needed.conf").read()]))
"""
    fds = prepared.stage2()
    done = subprocess.run(
        [sys.executable, "-c", inside, json.dumps(dataclasses.asdict(fds)), str(shared)],
        pass_fds=list(fds.fds.values()),
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    prepared.close()
    assert done.returncode == 0, done.stderr
    listing, below, top, needed = json.loads(done.stdout)
    assert listing == ["harness", "needed.conf", "top.toml"] and below == []
    assert top == "" and needed == "needed"
    assert (shared / "top.toml").read_text() == "secret"  # harness's view is unchanged
