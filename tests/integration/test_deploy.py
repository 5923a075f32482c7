"""The container images, AppArmor profiles and Kubernetes manifests, checked by tools nobody
here wrote (hadolint, checkov, kubernetes-validate, kustomize, apparmor_parser), and the
security-relevant fields asserted one by one so an edit cannot weaken them silently.

The tools live in .venv-scan (`make scan-tools`); `make test` requires them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime import config as config_mod
from runtime.sandbox.seccomp import bpf, configured, oci, policy
from tests.support import REPO

SCAN = REPO / ".venv-scan"
DEB = SCAN / "deb" / "root"
OVERLAYS = ("cpu", "gpu", "vault-agent")
CONTAINERFILES = (
    REPO / "images" / "gpu" / "Containerfile",
    REPO / "images" / "cpu" / "Containerfile",
)
WRITABLE = {"/run/harness", "/tmp", "/dev/shm"}  # the memory-backed mounts
UID = 10001


def tool(relative: str) -> Path:
    path = SCAN / relative
    if not path.exists():
        message = f"{path} is missing: run `make scan-tools`"
        if os.environ.get("HARNESS_REQUIRE_SCAN_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(args: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs
    )


# -- rendering -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered by Debian 12's kubectl (kustomize), one file per overlay."""
    kubectl = tool("deb/root/usr/bin/kubectl")
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        result = run([kubectl, "kustomize", REPO / "deploy" / "overlays" / overlay])
        assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(result.stdout)
    return files


def docs(rendered: dict[str, Path], overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered[overlay].read_text()) if d]


def one(items: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in items if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def harness_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"])


# -- the scanners --------------------------------------------------------------------------


def test_every_rendered_manifest_validates_against_kubernetes_schemas(
    rendered: dict[str, Path],
) -> None:
    validate = tool("bin/kubernetes-validate")
    for overlay, path in rendered.items():
        result = run([validate, "--strict", path])
        assert result.returncode == 0, f"{overlay}:\n{result.stdout}{result.stderr}"
        passed = result.stdout.count(" passed for resource ")
        assert passed == len(docs(rendered, overlay)), result.stdout


def test_a_manifest_with_a_misspelt_field_fails_validation(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    validate = tool("bin/kubernetes-validate")
    bad = tmp_path / "bad.yaml"
    bad.write_text(rendered["cpu"].read_text().replace("readOnlyRootFilesystem", "readOnlyRootFs"))
    assert run([validate, "--strict", bad]).returncode != 0


def checkov(args: list[str | Path]) -> list[dict[str, Any]]:
    env = dict(
        os.environ,
        # Offline: no download of external checks or guideline mappings.
        BC_SKIP_MAPPING="TRUE",
        PATH=f"{DEB / 'usr' / 'bin'}:{os.environ.get('PATH', '')}",
    )
    result = run([tool("bin/checkov"), "--skip-download", "-o", "json", *args], env=env)
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def assert_no_failures(reports: list[dict[str, Any]]) -> int:
    checked = 0
    for report in reports:
        failed = report["results"]["failed_checks"]
        assert not failed, [
            (f["check_id"], f["check_name"], f["resource"], f["file_path"]) for f in failed
        ]
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped["check_result"].get("suppress_comment", "")
            assert len(reason) > 40, f"{skipped['check_id']} skipped without a reason"
        checked += report["summary"]["passed"]
    return checked


def test_checkov_finds_nothing_in_deploy_and_the_rendered_overlays(
    rendered: dict[str, Path],
) -> None:
    assert assert_no_failures(checkov(["-d", REPO / "deploy"])) > 100
    rendered_dir = next(iter(rendered.values())).parent
    assert assert_no_failures(checkov(["-d", rendered_dir, "--framework", "kubernetes"])) > 200


def test_checkov_finds_nothing_in_the_containerfiles(tmp_path: Path) -> None:
    # checkov recognises Dockerfiles by name only: scan copies named like one.
    copies = []
    for index, path in enumerate(CONTAINERFILES):
        copy = tmp_path / f"{index}.Dockerfile"
        shutil.copy(path, copy)
        copies += ["-f", copy]
    assert assert_no_failures(checkov([*copies, "--framework", "dockerfile"])) > 80


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(path: Path) -> None:
    result = run([tool("bin/hadolint"), path])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_root_user(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text(CONTAINERFILES[0].read_text().replace("USER 10001:10001", "USER root"))
    assert run([tool("bin/hadolint"), bad]).returncode != 0


# -- AppArmor ------------------------------------------------------------------------------

PROFILES = {
    "harness-front": "harness-front",
    "harness-front-gpu": "harness-front",
    "harness-engine": "harness-engine",
    "harness-engine-gpu": "harness-engine",
}


def apparmor_parser(profile_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(
        [
            tool("deb/root/sbin/apparmor_parser"),
            "--config-file=/dev/null",
            "-M",
            tool("deb/root/usr/share/apparmor-features/features"),
            "-I",
            profile_dir,
            "-I",
            DEB / "etc" / "apparmor.d",
            *args,
        ]
    )


def test_apparmor_profiles_compile_and_define_the_names_deploy_uses() -> None:
    names = []
    for path in sorted({REPO / "apparmor" / f for f in PROFILES.values()}):
        result = apparmor_parser(REPO / "apparmor", "-Q", "-K", path)
        assert result.returncode == 0, f"{path}: {result.stderr}"
        names += apparmor_parser(REPO / "apparmor", "-N", path).stdout.split()
    assert sorted(names) == sorted(PROFILES)


@pytest.mark.parametrize(
    ("old", "new"),
    [("deny ptrace,", "deny ptrace"), ("deny network packet,", "deny network paket,")],
    ids=["missing-comma", "misspelt-rule"],
)
def test_a_broken_apparmor_profile_fails_to_compile(tmp_path: Path, old: str, new: str) -> None:
    shutil.copytree(REPO / "apparmor", tmp_path / "apparmor")
    base = tmp_path / "apparmor" / "abstractions" / "harness-base"
    assert old in base.read_text()
    base.write_text(base.read_text().replace(old, new))
    result = apparmor_parser(
        tmp_path / "apparmor", "-Q", "-K", tmp_path / "apparmor" / "harness-engine"
    )
    assert result.returncode != 0
    assert "harness-base" in result.stderr


def flattened(name: str) -> str:
    """One profile's rules with every include expanded (apparmor_parser -p)."""
    text = apparmor_parser(REPO / "apparmor", "-p", REPO / "apparmor" / PROFILES[name]).stdout
    body = re.search(rf"^profile {re.escape(name)} .*?^\}}", text, re.S | re.M)
    assert body, f"profile {name} not found"
    return re.sub(r"#.*", "", body.group(0))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_apparmor_profiles_keep_their_denials(name: str) -> None:
    rules = {line.strip() for line in flattened(name).splitlines()}
    for rule in (
        "deny network inet raw,",
        "deny network inet6 raw,",
        "deny network packet,",
        "deny ptrace,",
        "deny @{PROC}/sys/** wl,",
        "deny /lib/modules/** rwklx,",
        "deny /opt/venv/** wl,",
        "deny /models/** wl,",
        "deny /{var/,}run/secrets/kubernetes.io/** rwklx,",
    ):
        assert rule in rules, f"{name} lost `{rule}`"
    if name.startswith("harness-engine"):  # no capability, even in its own user namespace
        for rule in ("deny capability,", "deny mount,", "deny umount,", "deny pivot_root,"):
            assert rule in rules, f"{name} lost `{rule}`"
    else:  # the engine's namespaces, and nothing beyond them
        assert {r for r in rules if r.startswith("capability ")} == {
            "capability sys_admin,",
            "capability sys_chroot,",
            "capability net_admin,",
            "capability setpcap,",
        }
        assert {"deny capability dac_override,", "deny capability sys_ptrace,"} <= rules
    writable = [r for r in rules if re.match(r"^/\S+ \S*w\S*,$", r) and not r.startswith("deny")]
    allowed_roots = ("/run/harness/", "/tmp/", "/dev/shm/", "/dev/null", "/dev/zero", "/dev/full")
    extra = [r for r in writable if not r.startswith(allowed_roots) and "/dev/nvidia" not in r]
    assert not extra, f"{name} may write outside the runtime dir, /tmp and /dev/shm: {extra}"
    assert ("/dev/nvidiactl rw," in rules) == name.endswith("-gpu")
    if name.startswith("harness-engine"):
        assert "deny /run/secrets/** rwklx," in rules
        assert "deny /vault/** rwklx," in rules


# -- the manifests' security-relevant fields -----------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted_pod_security(
    rendered: dict[str, Path], overlay: str
) -> None:
    labels = one(docs(rendered, overlay), "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_and_container_security_context(rendered: dict[str, Path], overlay: str) -> None:
    items = docs(rendered, overlay)
    pod = one(items, "Deployment", "harness")["spec"]["template"]["spec"]
    gpu = overlay == "gpu"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert pod.get(key, False) is False
    assert pod["automountServiceAccountToken"] is (overlay == "vault-agent")
    assert one(items, "ServiceAccount")["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": f"harness/harness-{'gpu' if gpu else 'cpu'}.json",
    }
    assert ctx["appArmorProfile"] == {
        "type": "Localhost",
        "localhostProfile": "harness-front-gpu" if gpu else "harness-front",
    }
    assert re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", container["image"])
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in container["env"]
    }
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_memory_backed_paths_are_writable(rendered: dict[str, Path], overlay: str) -> None:
    pod = one(docs(rendered, overlay), "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = set()
    for mount in harness_container(one(docs(rendered, overlay), "Deployment"))["volumeMounts"]:
        volume = volumes[mount["name"]]
        assert "hostPath" not in volume
        if mount.get("readOnly"):
            continue
        writable.add(mount["mountPath"])
        assert volume["emptyDir"]["medium"] == "Memory", mount
        assert "sizeLimit" in volume["emptyDir"]
    assert writable == WRITABLE
    model = next(
        m
        for m in harness_container(one(docs(rendered, overlay), "Deployment"))["volumeMounts"]
        if m["mountPath"] == "/models/model"
    )
    assert model["readOnly"] is True
    assert volumes[model["name"]]["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_probes(rendered: dict[str, Path], overlay: str) -> None:
    items = docs(rendered, overlay)
    container = harness_container(one(items, "Deployment"))
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory", "ephemeral-storage"):
            assert resource in container["resources"][kind]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if overlay == "gpu" else None)
    # Plain TCP connects: the front serves /healthz and /readyz over mTLS only.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "https"}, probe
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    hard = one(items, "ResourceQuota")["spec"]["hard"]
    assert ("requests.nvidia.com/gpu" in hard) == (overlay == "gpu")
    assert one(items, "LimitRange")["spec"]["limits"][0]["max"]
    assert one(items, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "harness"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_the_gateway_and_reaches_the_collector_only(
    rendered: dict[str, Path], overlay: str
) -> None:
    items = docs(rendered, overlay)
    deny = one(items, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    policies = [d["spec"] for d in items if d["kind"] == "NetworkPolicy"]
    ingress = [rule for p in policies for rule in p.get("ingress", [])]
    assert ingress == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "ai-gateway"}
                    },
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ai-gateway"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": 8443}],
        }
    ]
    egress = [rule for p in policies for rule in p.get("egress", [])]
    peers = {
        (
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            tuple(sorted(peer["podSelector"]["matchLabels"].items())),
            port["protocol"],
            port["port"],
        )
        for rule in egress
        for peer in rule["to"]
        for port in rule["ports"]
    }
    assert all("ipBlock" not in peer for rule in egress for peer in rule["to"])
    expected = {("observability", (("app.kubernetes.io/name", "otel-collector"),), "TCP", 4318)}
    if overlay == "vault-agent":
        expected |= {
            ("vault", (("app.kubernetes.io/name", "vault"),), "TCP", 8200),
            ("kube-system", (("k8s-app", "kube-dns"),), "UDP", 53),
            ("kube-system", (("k8s-app", "kube-dns"),), "TCP", 53),
        }
    assert peers == expected


def test_vault_overlay_renders_secrets_in_memory_readable_by_harness_only(
    rendered: dict[str, Path],
) -> None:
    deployment = one(docs(rendered, "vault-agent"), "Deployment")
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert notes["vault.hashicorp.com/agent-inject"] == "true"
    assert notes["vault.hashicorp.com/secret-volume-path"] == "/vault/secrets"
    assert notes["vault.hashicorp.com/agent-inject-token"] == "false"
    assert notes["vault.hashicorp.com/agent-run-as-user"] == str(UID)
    secrets = [
        k.removeprefix("vault.hashicorp.com/agent-inject-secret-")
        for k in notes
        if k.startswith("vault.hashicorp.com/agent-inject-secret-")
    ]
    assert sorted(secrets) == ["server-key.pem", "server.pem"]
    for name in secrets:
        assert notes[f"vault.hashicorp.com/agent-inject-perms-{name}"] == "0400"
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert not [v for v in volumes if "secret" in v], "the Kubernetes Secret volume is replaced"


# -- the configuration the manifests ship --------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shipped_config_validates_and_matches_the_deployment(
    rendered: dict[str, Path], overlay: str, tmp_path: Path
) -> None:
    items = docs(rendered, overlay)
    configmap = one(items, "ConfigMap")
    path = tmp_path / "harness.toml"
    path.write_text(configmap["data"]["harness.toml"])
    cfg = config_mod.load(path)
    deployment = one(items, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == configmap[
        "metadata"
    ]["name"]
    container = harness_container(deployment)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert config_mod.split_listen(cfg.front.listen)[1] == container["ports"][0]["containerPort"]
    assert str(cfg.engine.runtime_dir) in WRITABLE
    assert mounts[str(cfg.model.dir)]["readOnly"] is True
    assert cfg.engine.device == ("cuda" if overlay == "gpu" else "cpu")
    assert not cfg.model.unsafe_allow_writable and not cfg.model.unsafe_unsigned
    assert not cfg.engine.unsafe_run_as_root
    secrets_dir = "/vault/secrets" if overlay == "vault-agent" else "/run/secrets/harness"
    assert str(cfg.secrets.dir) == secrets_dir
    assert str(cfg.front.tls.key).startswith(secrets_dir + "/")
    # The engine's seccomp profile is one the image ships (the Containerfiles copy seccomp/
    # to /usr/share/harness/seccomp), and it compiles in the configured mode.
    assert cfg.sandbox.seccomp == "enforce"  # every overlay, the GPU one too
    shipped = configured.shipped_profiles()[-1]
    path = configured.profile_path(cfg)
    if cfg.sandbox.seccomp_profile is not None:
        assert path.parent == shipped, "a profile outside the image"
        for containerfile in CONTAINERFILES:
            assert f"COPY seccomp/ {shipped}/" in containerfile.read_text()
        path = REPO / "seccomp" / path.name
    bpf.compile_profile(oci.load_profile(path), cfg.sandbox.seccomp)


# -- the images ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_containerfile_hardening(path: Path) -> None:
    text = path.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    stages = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    # A base given as a build argument (make image passes a stand-in where no registry is
    # reachable) must default to a digest.
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    stages = [defaults[s[2:-1]] if s.startswith("${") else s for s in stages]
    external = [s for s in stages if s not in ("base", "build")]
    assert external and all(re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", s) for s in external)
    assert len(stages) >= 3, "multi-stage: base, build, runtime"
    users = [line for line in instructions if line.startswith("USER ")]
    assert users == [f"USER {UID}:{UID}"], "the last stage runs as the numeric non-root uid"
    assert instructions.index(users[0]) > max(
        i for i, line in enumerate(instructions) if line.startswith("FROM ")
    )
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "harness", "serve"]' in instructions
    assert "COPY seccomp/ /usr/share/harness/seccomp/" in instructions
    assert "COPY apparmor/ /usr/share/harness/apparmor/" in instructions
    assert "dpkg --purge --force-remove-essential --force-depends apt" in text


def test_the_cuda_profile_is_the_cpu_profile_and_what_cuda_added() -> None:
    """seccomp/engine-cuda.json (recorded on a GPU, tests/gpu/device_run.sh) keeps everything
    the CPU vLLM engine's profile allows, takes nothing from the fixed deny list, says what
    it was recorded from, and compiles in `enforce` mode."""
    from runtime import recorder

    cpu = recorder.from_profile(REPO / "seccomp" / "engine-cpu.json")
    cuda = recorder.from_profile(REPO / "seccomp" / "engine-cuda.json")
    assert cpu.names <= cuda.names and cpu.sockets <= cuda.sockets
    assert not cuda.names & set(policy.FIXED_DENY)
    # What the CUDA driver and torch's CUDA start called beyond vLLM's CPU engine.
    assert {"sched_get_priority_max", "sched_get_priority_min"} <= cuda.names - cpu.names
    assert (1, 5) in cuda.sockets - cpu.sockets  # AF_UNIX, SOCK_SEQPACKET
    bpf.compile_profile(oci.load_profile(REPO / "seccomp" / "engine-cuda.json"), "enforce")
