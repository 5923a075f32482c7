"""harness's own filter under a container's profile (runtime/sandbox/front.py).

The container runtime's profile refuses what it does not list with TRACE: ENOSYS, and no event
anywhere. When harness knows that profile (`sandbox.container_profile`), its own filter refuses
the same calls first, with EPERM and a `seccomp_violation` event. Here the shipped container
profile is loaded first, as runc loads it, in a real child process, as root and as uid 10001
without capabilities (as in a pod); in the image, the e2e tests check that harness finds the
profile by itself and that serving raises no alert (tests/e2e/test_serve_e2e.py).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import config as config_mod
from runtime.errors import ConfigError
from runtime.sandbox import front
from runtime.sandbox.seccomp import oci, policy
from tests.support import POD, REPO

CONTAINER_PROFILE = REPO / "seccomp" / "harness-cpu.json"

_CHILD = r"""
import ctypes, json, os, socket, subprocess, sys, threading, time
from pathlib import Path
from runtime.sandbox import _linux, front
from runtime.sandbox.seccomp import bpf, oci, policy

PROFILE, WITHIN = Path(sys.argv[1]), sys.argv[2] == "1"
outer = oci.load_profile(PROFILE)
_linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)  # as runc does with no-new-privileges
bpf.compile_profile(outer, "as_written").filter.load()
libc = ctypes.CDLL(None, use_errno=True)

def call(name_or_nr, *args):
    nr = bpf.syscall_number(name_or_nr) if isinstance(name_or_nr, str) else name_or_nr
    return 0 if libc.syscall(nr, *args) >= 0 else -ctypes.get_errno()

def attempt(action):
    try:
        action()
        return 0
    except OSError as exc:
        return -exc.errno

def thread():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()

events, serving = [], threading.Event()
container = front.ContainerProfile(outer, str(PROFILE)) if WITHIN else None
report = front.apply(container, events.append, lambda: None, lambda probes: serving.set())
front.serving()
serving.wait(10)  # the supervisor's answer: from now on every refusal is an alert
seen = {
    "times": call("times", None),  # not in the container's profile: ENOSYS there
    "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
    "raw_netlink": attempt(lambda: socket.socket(16, socket.SOCK_RAW).close()),
    "tcp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    "unix": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
    "thread": attempt(thread),
    "exec": attempt(lambda: subprocess.run(["/bin/true"], check=True)),
    "newer": call(report.get("enosys_from", 447), 0, 0, 0),  # newer than any it names
    "clone3": call("clone3", None, 0),
}
deadline = time.monotonic() + 5
while len({e["syscall"] for e in events}) < (4 if WITHIN else 2) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.3)  # anything else on its way
print(json.dumps({"report": report, "seen": seen, "events": events, "uid": os.getuid()}))
"""


@pytest.mark.parametrize("who", ["root", "pod"])
@pytest.mark.parametrize("within", [True, False], ids=["container_profile", "deny_list"])
def test_calls_only_the_container_profile_refuses_are_reported_when_harness_knows_it(
    who: str, within: bool
) -> None:
    """Within the profile: a call it does not list (times), a UDP socket and a raw netlink
    socket it does not allow are EPERM and each a `seccomp_violation` (scope front) within a
    second; exec stays refused, what the front does (TCP, Unix, threads) works, and calls newer
    than any the profile names and clone3 keep their ENOSYS, without an event. The control,
    harness's deny list alone under the same container profile: the container's ENOSYS,
    silently."""
    if who == "pod" and not Path("/usr/bin/setpriv").exists():
        pytest.skip("setpriv is missing")
    prefix = POD if who == "pod" else []
    result = subprocess.run(
        [*prefix, sys.executable, "-c", _CHILD, str(CONTAINER_PROFILE), "1" if within else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["uid"] == (10001 if who == "pod" else 0)
    seen, report = out["seen"], out["report"]
    assert seen["tcp"] == seen["unix"] == seen["thread"] == 0
    assert seen["exec"] == -errno.EPERM  # the front's deny list, either way
    assert seen["newer"] == seen["clone3"] == -errno.ENOSYS
    events: dict[str, dict] = {}
    for event in out["events"]:
        events.setdefault(event["syscall"], event)
    if within:
        assert report["mode"] == "container_profile"
        assert report["container_profile"] == str(CONTAINER_PROFILE)
        assert seen["times"] == seen["udp"] == seen["raw_netlink"] == -errno.EPERM
        assert set(events) == {"times", "socket", "execve"}, out["events"]
        assert all(e["scope"] == "front" and e["phase"] == "serving" for e in events.values())
        assert all(e["action"] == "refused_eperm" for e in events.values())
        # The first is UDP (the raw netlink one, within the same second, is counted after it).
        assert (events["socket"]["socket_domain"], events["socket"]["socket_type"]) == (2, 2)
    else:
        assert report["mode"] == "deny_list" and "container_profile" not in report
        assert seen["times"] == seen["udp"] == -errno.ENOSYS  # the container's, silently
        assert seen["raw_netlink"] == -errno.EPERM  # the front's own deny list
        assert set(events) == {"socket", "execve"}, out["events"]


def _cfg(demo_dir: Path, *overrides: str) -> config_mod.Config:
    return config_mod.load(demo_dir / "demo.toml", list(overrides))


def test_container_profile_setting(demo_dir: Path, tmp_path: Path) -> None:
    """`auto` on a host without a seccomp filter, or without the image's copy: none, and the
    report says why; a path is read and parsed at startup (a broken one is exit 2, named); `off`
    says so."""
    auto = front.container_profile(_cfg(demo_dir))
    assert auto.profile is None
    assert auto.report() == {"container_profile_unknown": "harness started under no seccomp filter"}
    given = front.container_profile(
        _cfg(demo_dir, f'sandbox.container_profile="{CONTAINER_PROFILE}"')
    )
    assert given.profile is not None and given.report() == {
        "container_profile": str(CONTAINER_PROFILE)
    }
    off = front.container_profile(_cfg(demo_dir, 'sandbox.container_profile="off"'))
    assert off.profile is None and "off" in off.source
    broken = tmp_path / "broken.json"
    broken.write_text('{"defaultAction": "SCMP_ACT_NOPE", "syscalls": []}')
    with pytest.raises(ConfigError) as raised:
        front.container_profile(_cfg(demo_dir, f'sandbox.container_profile="{broken}"'))
    assert str(broken) in raised.value.message and raised.value.exit_code == 2
    # A deny list (default ALLOW) is no profile to stand within: exit 2 at startup, named.
    deny_list = tmp_path / "deny-list.json"
    deny_list.write_text(
        '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": '
        '[{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]}'
    )
    with pytest.raises(ConfigError) as raised:
        front.container_profile(_cfg(demo_dir, f'sandbox.container_profile="{deny_list}"'))
    assert "SCMP_ACT_ALLOW" in raised.value.message and str(deny_list) in raised.value.message


@pytest.mark.parametrize("outer", ["shipped", "allows_times"])
def test_auto_reads_the_images_copy_when_harness_starts_under_a_filter(
    demo_dir: Path, tmp_path: Path, outer: str
) -> None:
    """In a child under the shipped container profile (as runc loads it), `auto` looks for the
    image's copy where the Containerfiles put it; on this host it is not there, and the report
    names the path it looked for. Under another profile (here: one that allows times(2), as
    every runtime's default does) it does not hold itself to the shipped one at all."""
    profile = json.loads(CONTAINER_PROFILE.read_text())
    if outer == "allows_times":
        profile["syscalls"][0]["names"].append("times")
    path = tmp_path / "outer.json"
    path.write_text(json.dumps(profile))
    child = r"""
import json, sys
from runtime import config
from runtime.sandbox import _linux, front
from runtime.sandbox.seccomp import bpf, oci, policy
_linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
bpf.compile_profile(oci.load_profile(sys.argv[1]), "as_written").filter.load()
cfg = config.load(sys.argv[2], [])
print(json.dumps(front.container_profile(cfg).report()))
"""
    result = subprocess.run(
        [sys.executable, "-c", child, str(path), str(demo_dir / "demo.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    if outer == "allows_times":
        assert "not the shipped container profile" in found["container_profile_unknown"]
        return
    expected = front.IMAGE_PROFILES / "harness-cpu.json"
    if expected.exists():
        assert found == {"container_profile": str(expected)}
    else:
        assert str(expected) in found["container_profile_unknown"]


def test_the_front_keeps_only_typed_non_raw_socket_rules() -> None:
    """The container's socket rules the front keeps: a type named, not SOCK_RAW, not
    AF_PACKET. Of the shipped profile's, all but AF_NETLINK/SOCK_RAW."""
    rules = [r for r in oci.load_profile(CONTAINER_PROFILE).rules if "socket" in r.names]
    dropped = [r for r in rules if not front._plain_socket(r)]
    assert len(rules) == 6 and [a.value for r in dropped for a in r.args if a.index == 0] == [16]

    def rule(*args: oci.ArgRule) -> oci.Rule:
        return oci.Rule(names=("socket",), action="SCMP_ACT_ALLOW", args=args)

    def family(value: int) -> oci.ArgRule:
        return oci.ArgRule(0, value, 0, "SCMP_CMP_EQ")

    def kind(value: int) -> oci.ArgRule:
        return oci.ArgRule(1, policy.SOCK_TYPE_MASK, value, "SCMP_CMP_MASKED_EQ")

    assert front._plain_socket(rule(family(2), kind(1)))  # TCP
    for refused in (
        rule(),  # any socket
        rule(family(17), kind(2)),  # AF_PACKET
        rule(kind(2)),  # a type, any family (AF_PACKET among them)
        rule(oci.ArgRule(0, 40, 0, "SCMP_CMP_NE"), kind(2)),  # Docker's way: not vsock
        rule(family(2), kind(10)),  # SOCK_PACKET
    ):
        assert not front._plain_socket(refused), refused
