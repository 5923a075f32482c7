"""Run a program under a container's seccomp profile, as runc does: no_new_privs, the profile
loaded as written, then execve. Usage: python tests/support/under_profile.py PROFILE.json ARGV..."""

from __future__ import annotations

import json
import os
import sys

from runtime.sandbox import _linux
from runtime.sandbox.seccomp import bpf, oci


def main() -> None:
    profile_path, *argv = sys.argv[1:]
    with open(profile_path) as handle:
        profile = oci.parse_profile(json.load(handle), "outer")
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    bpf.compile_profile(profile, "as_written").filter.load()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
