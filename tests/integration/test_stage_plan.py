"""The stage-2 contract (runtime.sandbox.stage_plan): what harness hands the process that
becomes the engine is typed, parsed strictly, and read by a stage 2 that imports nothing but
the standard library and its own sandbox modules."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.sandbox import stage_plan
from runtime.sandbox.seccomp import bpf
from runtime.sandbox.stage_plan import (
    LandlockPlan,
    NamespacesPlan,
    PrivilegesPlan,
    SeccompPlan,
    StagePlan,
)
from tests.support import POD, REPO

PROFILE = REPO / "seccomp" / "engine-cpu.json"


def _plan() -> StagePlan:
    return StagePlan(
        argv=["/bin/true"],
        env={"PATH": "/usr/bin"},
        cwd="/",
        namespaces=NamespacesPlan("off"),
        privileges=PrivilegesPlan(None, None, 4096),
        landlock=LandlockPlan("off"),
        seccomp=bpf.compile_plan("enforce", json.loads(PROFILE.read_text()), str(PROFILE)),
    )


def test_a_plan_goes_through_json_unchanged_with_its_compiled_filter() -> None:
    plan = _plan()
    assert plan.seccomp.notify and len(plan.seccomp.bpf) % 8 == 0 and len(plan.seccomp.bpf) > 800
    assert stage_plan.from_json(stage_plan.to_json(plan)) == plan
    recording = bpf.recording_plan()
    assert recording.mode == "record" and recording.notify and recording.bpf


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(extra=1), "plan: unknown key 'extra'"),
        (lambda p: p.pop("cwd"), "plan: missing key 'cwd'"),
        (lambda p: p["privileges"].update(uid=True), "plan.privileges.uid must be int, not bool"),
        (lambda p: p["landlock"].update(read="/"), "plan.landlock.read must be a list"),
        (
            lambda p: p["landlock"].update(tcp_ports=["80"]),
            "plan.landlock.tcp_ports[0] must be int",
        ),
        (lambda p: p["seccomp"].update(bpf="not base64!"), "plan.seccomp.bpf is not base64"),
        (lambda p: p["namespaces"]["fds"].update(net="3"), "plan.namespaces.fds.net must be int"),
        (lambda p: p["env"].update(PATH=None), "plan.env.PATH must be str"),
        (lambda p: p.update(seccomp=None), "plan.seccomp must be an object"),
    ],
)
def test_a_plan_with_a_wrong_unknown_or_missing_key_is_refused(change, message: str) -> None:
    raw = json.loads(stage_plan.to_json(_plan()))
    change(raw)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        stage_plan.from_json(json.dumps(raw).encode())


def _report() -> stage_plan.StageReport:
    return stage_plan.StageReport(
        namespaces=stage_plan.NamespacesReport("required", ["mnt", "net", "pid"], 2, 0.001),
        privileges=stage_plan.PrivilegesReport(
            {"core": 0, "nproc": 4096}, True, "empty", 65534, 65534, [], "none", "SIGKILL", 0.0
        ),
        landlock=stage_plan.LandlockReport("off", False, reason="disabled by config"),
        seccomp={"mode": "enforce", "installed": True},
    )


def test_what_stage_two_reports_is_typed_and_parsed_as_strictly() -> None:
    """Each mechanism's part of stage 2's report is a dataclass; harness parses the whole
    back strictly, and the events carry exactly what each part has (None is left out)."""
    report = _report()
    assert stage_plan.report_from_json(stage_plan.report_to_json(report)) == report
    wire = json.loads(stage_plan.report_to_json(report))
    assert "error" not in wire and "abi" not in wire["landlock"]  # None is not sent
    assert stage_plan.fields(report.landlock) == {
        "mode": "off",
        "enforced": False,
        "reason": "disabled by config",
    }
    # A stage 2 that stopped after prepare: the drop's fields are absent, not made up.
    partial = stage_plan.PrivilegesReport({"core": 0}, True)
    assert stage_plan.fields(partial) == {"rlimits": {"core": 0}, "no_new_privs": True}
    for change, message in (
        (lambda r: r["privileges"].update(ambient=[]), "report.privileges: unknown key"),
        (lambda r: r["namespaces"].update(pid_in_namespace="2"), "pid_in_namespace must be int"),
        (lambda r: r["landlock"].pop("enforced"), "report.landlock: missing key 'enforced'"),
    ):
        raw = json.loads(stage_plan.report_to_json(report))
        change(raw)
        with pytest.raises(ValueError, match=f"stage report: .*{message}"):
            stage_plan.report_from_json(json.dumps(raw).encode())


def _modules(code: str) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import json, sys; {code}; print(json.dumps(list(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    return set(json.loads(out.stdout))


def test_stage_two_imports_only_the_standard_library_and_its_own_modules() -> None:
    added = _modules("import runtime.sandbox.exec") - _modules("pass")
    ours = {m for m in added if m.split(".")[0] == "runtime"}
    assert ours == {
        "runtime",
        "runtime.errors",
        "runtime.sandbox",
        "runtime.sandbox._linux",
        "runtime.sandbox.exec",
        "runtime.sandbox.landlock",
        "runtime.sandbox.namespaces",
        "runtime.sandbox.pidns",
        "runtime.sandbox.privileges",
        "runtime.sandbox.stage_plan",
    }
    foreign = sorted(m for m in added - ours if m.split(".")[0] not in sys.stdlib_module_names)
    assert foreign == [], f"stage 2 imports {foreign}"
    # The check can fail: harness's own side of the sandbox pulls in libseccomp and pydantic.
    heavy = _modules("import runtime.sandbox.seccomp.bpf, runtime.config")
    assert {"pyseccomp", "pydantic"} <= {m.split(".")[0] for m in heavy}


def test_seccomp_profiles_and_harness_rules_are_read_without_libseccomp() -> None:
    """oci.py and policy.py are pure: parsing a profile and harness's own rules need no
    libseccomp (only bpf.py compiles, and it is the one that imports pyseccomp)."""
    pure = _modules("import runtime.sandbox.seccomp.oci, runtime.sandbox.seccomp.policy")
    assert "pyseccomp" not in pure
    assert "pyseccomp" in _modules("import runtime.sandbox.seccomp.bpf")


def _stage2(data: bytes, wrapper: tuple[str, ...] = ()) -> tuple[int, dict]:
    """Run stage 2 on `data` as its plan (under `wrapper`); its exit code and report."""
    plan_r, plan_w = os.pipe()
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            *wrapper,
            *(sys.executable, "-I", "-m", "runtime.sandbox.exec"),
            *("--plan-fd", str(plan_r), "--report-fd", str(theirs.fileno())),
        ],
        pass_fds=(plan_r, theirs.fileno()),
        cwd="/",
    )
    os.close(plan_r)
    theirs.close()
    os.write(plan_w, data)
    os.close(plan_w)
    with ours:
        report = json.loads(b"".join(iter(lambda: ours.recv(1 << 16), b"")))
    return proc.wait(timeout=30), report


def test_stage_two_refuses_a_malformed_plan_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    plan = StagePlan(
        argv=["/usr/bin/touch", str(marker)],
        env={},
        cwd="/",
        seccomp=SeccompPlan("off"),
    )
    raw = json.loads(stage_plan.to_json(plan))
    raw["privileges"] = {"uid": 0, "gid": 0, "max_tasks": None, "ambient": ["CAP_SYS_ADMIN"]}
    code, report = _stage2(json.dumps(raw).encode())
    assert code == 5 and "unknown key 'ambient'" in report["error"]
    assert not marker.exists()
    # The same plan, well formed, runs: the refusal above came from the key alone.
    code, report = _stage2(stage_plan.to_json(plan))
    assert code == 0 and "error" not in report and marker.exists()


def test_stage_two_refuses_to_run_with_a_second_thread() -> None:
    code = """
import threading, time
from runtime.sandbox import exec as stage2
from runtime.sandbox.stage_plan import SeccompPlan, StagePlan
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
try:
    stage2.apply(StagePlan(argv=["/bin/true"], env={}, cwd="/", seccomp=SeccompPlan("off")))
except stage2.StageError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "stage 2 must be single-threaded"


# What a container runtime or a recording does: a filter with a notification listener above
# stage 2 (it notifies only on acct(2), which nothing here calls), its listener kept open
# (the kernel forgets a listener once its last fd is closed), then exec.
_LISTENER_ABOVE = """
import os, sys, pyseccomp
flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
flt.add_rule(pyseccomp.NOTIFY, "acct")
flt.load()
os.set_inheritable(pyseccomp._libseccomp.seccomp_notify_fd(flt._filter), True)
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("pod", [False, True], ids=["root", "uid-10001"])
def test_a_filter_that_cannot_load_stops_stage_two_and_says_why(pod: bool) -> None:
    """Only one filter in a process's ancestry may hold a listener: under one, `enforce`
    cannot load. Stage 2 stops (exit 5) with the reason and the mode that works, and its
    report says the filter is not installed (it said `installed: true` before, so harness
    emitted seccomp_install ok). The same plan in `kill` mode, which needs no listener, runs."""
    if pod and os.geteuid() != 0:
        pytest.skip("the uid-10001 case starts from root")
    wrapper = (*(POD if pod else ()), sys.executable, "-I", "-c", _LISTENER_ABOVE)
    profile = json.loads(PROFILE.read_text())
    plans = {
        mode: StagePlan(
            argv=["/bin/true"],
            env={},
            cwd="/",
            seccomp=bpf.compile_plan(mode, profile, str(PROFILE)),
        )
        for mode in ("enforce", "kill")
    }
    code, report = _stage2(stage_plan.to_json(plans["enforce"]), wrapper)
    assert code == 5
    assert "notification listener is already installed" in report["error"]
    assert 'sandbox.seccomp = "kill"' in report["error"]
    assert report["seccomp"]["installed"] is False and report["seccomp"]["mode"] == "enforce"
    code, report = _stage2(stage_plan.to_json(plans["kill"]), wrapper)
    assert code == 0 and "error" not in report and report["seccomp"]["installed"] is True
