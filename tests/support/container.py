"""harness inside its image under podman + runc, run the way deploy/ runs it, observed through the
same methods as tests.support.harness.Harness so that the end-to-end tests take either as their
target.

The container: read-only root (`--read-only-tmpfs=false`: podman would otherwise leave /run and
/var/tmp writable), tmpfs for /run/harness and /tmp, a private /dev/shm, every capability
dropped, no-new-privileges, uid 10001, the shipped seccomp/harness-cpu.json unmodified; the
model, its signature, the trust material and harness.toml mounted read-only; the server key on
a tmpfs (/dev/shm) readable by uid 10001 only. The image's HEALTHCHECK stays, without its
timer (`--health-interval disable`: the timer needs systemd, which this machine's podman does
not have); `healthcheck()` runs it once, as the timer would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.support import REPO, free_port
from tests.support.harness import Observed

IMAGE = os.environ.get("HARNESS_IMAGE", "localhost/harness:cpu")
UID = 10001
PROFILE = REPO / "seccomp" / "harness-cpu.json"
# The podman settings this kind of machine needs (images/containers.conf).
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "images" / "containers.conf")}

CONFIG = """\
# harness.toml for the image test: deploy/base/harness.toml with the demo's model and PKI.
[model]
dir = "/models/model"
served_name = "demo"

[model.signature]
path = "/models/model.sig"
method = "key"
public_key = "/etc/harness/trust/signing-key.pub"

[front]
listen = "0.0.0.0:8443"
allowed_identities = ["spiffe://harness.demo/ns/gateway/sa/ai-gateway"]

[front.tls]
cert = "/run/secrets/harness/server.pem"
key = "/run/secrets/harness/server-key.pem"
client_ca = "/etc/harness/trust/ca.pem"

[secrets]
dir = "/run/secrets/harness"
required = ["server-key.pem"]

[limits]
max_tokens = 64

[engine]
device = "cpu"
runtime_dir = "/run/harness"
max_model_len = 256
kv_cache_memory_bytes = 67108864

[engine.vllm]
# As demo.toml: the demo model is float32, and vLLM's CPU build serves it as bfloat16 by
# default, whose first forward pass kills the worker on this kind of machine (no sandbox
# needed to see it).
dtype = "float32"

[sandbox]
# Not merely where the node allows them: the image must serve with them.
namespaces = "required"
"""

# Every process in the container, from inside it: pid, process group, /proc/PID/status.
_PS = """
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        continue
    status = dict(line.split(":\\t", 1) for line in lines if ":\\t" in line)
    out.append({"pid": int(pid), "pgid": int(stat[2]), "state": stat[0], "status": status})
print(json.dumps(out))
"""


def missing() -> str | None:
    """Why the image tests cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (`make image-test` installs it)"
    found = subprocess.run(["podman", "image", "exists", IMAGE], env=ENV, check=False)
    if found.returncode != 0:
        return f"no image {IMAGE} (`make image` builds it)"
    return None


class Container(Observed):
    """One `podman run` of the image, attached: its stdout (harness's events) and stderr go to
    files, and its exit code is the container's. Process ids (engine_pid, processes()) are
    those of the container's PID namespace."""

    def __init__(self, demo_dir: Path, workdir: Path, overrides: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.metrics_url: str | None = None
        self.name = f"harness-test-{os.getpid()}-{self.port}"
        self.workdir = workdir
        self.stdout_path = workdir / f"{self.name}.events"
        self.stderr_path = workdir / f"{self.name}.log"
        trust = workdir / "trust"
        trust.mkdir(exist_ok=True)
        for name, source in (("ca.pem", "pki/ca.pem"), ("signing-key.pub", "signing-key.pub")):
            shutil.copy(demo_dir / source, trust / name)
        config = workdir / "harness.toml"
        config.write_text(CONFIG)
        self.secrets = _secrets_for_uid(demo_dir, self.name)
        args = [
            "podman", "run", "--rm", "--name", self.name, "--health-interval", "disable",
            "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", "/run/harness:rw,mode=1777",
            "--tmpfs", "/tmp:rw,mode=1777",
            "--shm-size", "1g",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--user", f"{UID}:{UID}",
            "--security-opt", f"seccomp={PROFILE}",
            "-v", f"{demo_dir / 'model'}:/models/model:ro",
            "-v", f"{demo_dir / 'model.sig'}:/models/model.sig:ro",
            # The demo's signed LoRA adapter and draft model, for the tests that serve them.
            "-v", f"{demo_dir / 'adapter'}:/models/adapter:ro",
            "-v", f"{demo_dir / 'adapter.sig'}:/models/adapter.sig:ro",
            "-v", f"{demo_dir / 'draft'}:/models/draft:ro",
            "-v", f"{demo_dir / 'draft.sig'}:/models/draft.sig:ro",
            "-v", f"{trust}:/etc/harness/trust:ro",
            "-v", f"{config}:/etc/harness/harness.toml:ro",
            "-v", f"{self.secrets}:/run/secrets/harness:ro",
            "-p", f"127.0.0.1:{self.port}:8443",
            "-e", f"POD_NAME={self.name}", "-e", "POD_NAMESPACE=image-test",
            IMAGE, "--config", "/etc/harness/harness.toml",
        ]  # fmt: skip
        for item in overrides or []:
            args += ["--set", item]
        self.proc = subprocess.Popen(
            args,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )

    def healthcheck(self) -> str:
        """The image's HEALTHCHECK, run once in the container (as uid 10001, under its seccomp
        profile): `healthy` or `unhealthy`, as podman reports it."""
        return healthcheck(self.name)

    def processes(self) -> list[dict[str, Any]]:
        """Every live process in the container (pid, pgid, state, /proc/PID/status), read by
        a process started inside it, under the same profile and uid."""
        done = subprocess.run(
            ["podman", "exec", self.name, "python3.11", "-c", _PS],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [p for p in json.loads(done.stdout) if p["state"] != "Z"]

    def python(self, code: str, *args: str) -> str:
        """`python -c CODE ARGS` inside the container (uid 10001, its profile), its stdout."""
        command = ["podman", "exec", self.name, "python3.11", "-c", code, *args]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def engine_group(self) -> list[dict[str, Any]]:
        return [p for p in self.processes() if p["pgid"] == self.engine_pid]

    def signal_engine(self, sig: signal.Signals) -> None:
        kill = f"import os; os.kill({self.engine_pid}, {int(sig)})"
        command = ["podman", "exec", self.name, "python3.11", "-c", kill]
        subprocess.run(command, env=ENV, check=True, timeout=60)

    def gone(self) -> bool:
        """After exit: the container, and with it every process, is gone (--rm)."""
        found = subprocess.run(["podman", "container", "exists", self.name], env=ENV, check=False)
        return found.returncode != 0

    # -- control --------------------------------------------------------------------------
    def send_stop(self) -> None:
        """SIGTERM to tini (PID 1), which forwards it to harness; without waiting."""
        subprocess.run(
            ["podman", "kill", "--signal", "TERM", self.name], env=ENV, check=True, timeout=60
        )

    def terminate(self, timeout: float = 120) -> int:
        """`podman stop`: SIGTERM to tini (PID 1), which forwards it to harness."""
        if self.proc.poll() is None:
            subprocess.run(
                ["podman", "stop", "-t", str(int(timeout)), self.name],
                env=ENV,
                capture_output=True,
                check=False,
                timeout=timeout + 30,
            )
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=60)
            except subprocess.TimeoutExpired:
                subprocess.run(["podman", "rm", "-f", self.name], env=ENV, check=False)
                self.proc.wait()
        shutil.rmtree(self.secrets, ignore_errors=True)


def healthcheck(name: str) -> str:
    done = subprocess.run(
        ["podman", "healthcheck", "run", name],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 0 healthy, 1 unhealthy, else an error
    return "healthy" if done.returncode == 0 else "unhealthy"


def _secrets_for_uid(demo_dir: Path, name: str) -> Path:
    """The server key and certificate on a tmpfs, readable by the container's uid only (a
    Secret volume with defaultMode 0400 and the pod's fsGroup does the same)."""
    from runtime import config as config_mod

    cfg = config_mod.load(demo_dir / "demo.toml")
    assert cfg.secrets.dir is not None
    folder = Path("/dev/shm") / name
    folder.mkdir(mode=0o700)
    for source, target in (
        (cfg.front.tls.key, "server-key.pem"),
        (cfg.front.tls.cert, "server.pem"),
    ):
        shutil.copy(source, folder / target)
        (folder / target).chmod(0o400)
        os.chown(folder / target, UID, UID)
    os.chown(folder, UID, UID)
    return folder
