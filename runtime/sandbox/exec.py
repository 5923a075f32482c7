"""Stage 2: a fresh, single-threaded process that applies the engine's sandbox plan and execs
vLLM (as `runc init` does). Never run from `preexec_fn`, never in a process with threads.

Protocol: the plan arrives as JSON on the inherited fd `--plan-fd`; one JSON line goes back on
`--report-fd`, which is close-on-exec: the parent reads it, then sees EOF at exec (success) or
at exit (failure, with {"error": ...} in the report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from runtime.sandbox import network, privileges


def _report(fd: int, record: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.sandbox.exec")
    parser.add_argument("--plan-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args()
    with os.fdopen(args.plan_fd, "rb") as plan_file:
        plan = json.loads(plan_file.read())
    os.set_inheritable(args.report_fd, False)  # closes at exec: EOF tells the parent we made it
    report: dict[str, Any] = {}
    try:
        report["network"] = network.apply(plan["network_namespace"])
    except OSError as exc:
        _report(args.report_fd, {"error": f"network namespace: {exc}", **report})
        return 5
    try:
        report["privileges"] = privileges.apply(plan["privileges"])
    except OSError as exc:  # fail closed: never exec vLLM half-dropped
        _report(args.report_fd, {"error": f"privilege drop: {exc}", **report})
        return 5
    _report(args.report_fd, report)
    os.chdir(plan["cwd"])
    try:
        os.execve(plan["argv"][0], plan["argv"], plan["env"])  # noqa: S606 - argv, no shell
    except OSError as exc:
        print(f"harness stage-2: execve {plan['argv'][0]}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(main())
