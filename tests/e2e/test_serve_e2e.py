"""The whole chain, for real: the openai client -> mTLS front -> vLLM (CPU) on a Unix socket."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from runtime import config
from runtime.demo import assets
from runtime.sandbox.front import ENGINE_SHM
from tests.conftest import Containers, Servers
from tests.support import DRAFT, LORA, LORA_NAME, client_context, process_group, raw_request
from tests.support import container as image
from tests.support.container import Container
from tests.support.harness import Harness, openai_client

pytestmark = pytest.mark.engine


def _client_ctx(demo_dir: Path) -> ssl.SSLContext:
    pki = demo_dir / "pki"
    return client_context(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")


def test_completion_through_the_front(target: Harness | Container, demo_dir: Path) -> None:
    api = openai_client(target.url, _client_ctx(demo_dir))
    result = api.completions.create(model="demo", prompt="hello world", max_tokens=8)
    assert result.model == "demo"
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 8
    request = target.wait_for("request", route="/v1/completions")
    assert request["status"] == 200
    assert request["identity"] == "spiffe://harness.demo/ns/gateway/sa/ai-gateway"


def test_streamed_chat_chunks_arrive_before_the_stream_ends(
    target: Harness | Container, demo_dir: Path
) -> None:
    api = openai_client(target.url, _client_ctx(demo_dir))
    arrivals = []
    stream = api.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=64,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 32  # many separate SSE events, not one block
    # The tiny model generates 64 tokens in a few ms, so timing here proves little; the
    # deterministic proof that the front never buffers a stream is in
    # tests/integration/test_front_routes.py (an upstream that holds the rest of its stream
    # until the client saw the first chunk).


def test_max_tokens_over_the_cap_is_rejected_and_the_default_is_the_cap(
    target: Harness | Container, demo_dir: Path
) -> None:
    api = openai_client(target.url, _client_ctx(demo_dir))
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model="demo", prompt="hello", max_tokens=65)
    assert info.value.body["code"] == "max_tokens_exceeded"  # type: ignore[index]
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    # No max_tokens: the front injects the cap, and the engine generates no more.
    result = api.completions.create(model="demo", prompt="hello", extra_body={"ignore_eos": True})
    assert result.usage is not None and result.usage.completion_tokens == 64
    event = target.wait_for(
        "request", route="/v1/completions", tokens_allowed=64, tokens_asked=None
    )
    assert event["status"] == 200
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="other", prompt="hello", max_tokens=4)


def test_token_ids_are_checked_against_the_verified_model_s_vocabulary(
    target: Harness | Container, demo_dir: Path
) -> None:
    """The vocabulary size comes from the verified config.json; vLLM itself parses and serves
    what the front forwards."""
    from runtime.demo.model import VOCAB

    api = openai_client(target.url, _client_ctx(demo_dir))
    result = api.completions.create(
        model="demo", prompt=[0, 1, VOCAB - 1], max_tokens=4, logit_bias={str(VOCAB - 1): -100}
    )
    assert result.usage is not None and result.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model="demo", prompt=[0, VOCAB], max_tokens=4)
    assert info.value.body["param"] == "prompt"  # type: ignore[index]
    assert f"0 to {VOCAB - 1}" in info.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            response_format={"type": "json_object"},
        )
    assert info.value.body["code"] == "structured_outputs_not_allowed"  # type: ignore[index]


def _get(url: str, ctx: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(verify=ctx, timeout=10) as client:
        return client.get(url)


def test_client_without_certificate_fails(target: Harness | Container, demo_dir: Path) -> None:
    ctx = client_context(demo_dir / "pki" / "ca.pem")
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        _get(f"{target.url}/v1/models", ctx)


def test_client_certificate_from_another_ca_fails(
    target: Harness | Container, demo_dir: Path, tmp_path: Path
) -> None:
    from runtime.demo import pki

    other = pki.make_ca("some other CA")
    pki.client_cert(other, "spiffe://harness.demo/ns/gateway/sa/ai-gateway").write(
        tmp_path / "c.pem", tmp_path / "k.pem"
    )
    ctx = client_context(demo_dir / "pki" / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        _get(f"{target.url}/v1/models", ctx)


def test_tls12_only_client_fails(target: Harness | Container, demo_dir: Path) -> None:
    pki = demo_dir / "pki"
    ctx = client_context(
        pki / "ca.pem", pki / "client.pem", pki / "client-key.pem", max_tls=ssl.TLSVersion.TLSv1_2
    )
    with pytest.raises(httpx.ConnectError):
        _get(f"{target.url}/v1/models", ctx)


def test_same_ca_but_identity_not_allowed_is_closed_before_http(
    target: Harness | Container, demo_dir: Path, tmp_path: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from runtime.demo import pki

    pki_dir = demo_dir / "pki"
    ca = pki.Issued(
        x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()),
        serialization.load_pem_private_key((pki_dir / "ca-key.pem").read_bytes(), None),  # type: ignore[arg-type]
    )
    pki.client_cert(ca, "spiffe://harness.demo/ns/other/sa/intruder").write(
        tmp_path / "c.pem", tmp_path / "k.pem"
    )
    ctx = client_context(pki_dir / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    served_before = len(target.events("request"))
    for _ in range(10):
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError)):
            _get(f"{target.url}/v1/models", ctx)
    rejected = target.wait_for("tls_handshake_rejected")
    assert len(target.events("request")) == served_before
    assert rejected["presented"] == ["URI:spiffe://harness.demo/ns/other/sa/intruder"]


FORBIDDEN = [
    "/pause",
    "/collective_rpc",
    "/v1/../pause",
    "/%761/models",
    "//v1/models",
    "/invocations",
    "/v1/models/",
    "/V1/models",
    "/v1/models%00",
    "/health",
    "/metrics",
    "/v1/models/../models",
    "/v1/%2e%2e/pause",
    "/tokenize",
    "/v1/completions/../../pause",
    "/v1/load_lora_adapter",  # runtime LoRA loading: adapters are verified at start only
    "/v1/unload_lora_adapter",
]


def test_routes_outside_the_allowlist_never_reach_the_engine(
    target: Harness | Container, demo_dir: Path
) -> None:
    ctx = _client_ctx(demo_dir)
    marker = f"probe{os.getpid()}{time.monotonic_ns()}"
    # Only what the engine logs from here on: other tests of the session may have reached
    # the engine's socket directly (its own /metrics), not through the front.
    logged_before = len(target.log())
    with httpx.Client(verify=ctx, timeout=10) as client:
        # Positive control: an allowed route does show up in the engine's access log.
        assert client.get(f"{target.url}/v1/models?{marker}").status_code == 200
    for path in FORBIDDEN:
        for method in ("GET", "POST"):
            status, body = raw_request(target.url, ctx, method, path.encode(), b"{}")
            assert status == 404, (method, path)
            assert json.loads(body)["error"]["code"] == "route_not_allowed"
    time.sleep(0.5)
    logged = target.log()[logged_before:]
    access = [line for line in logged.splitlines() if '"GET ' in line or '"POST ' in line]
    assert any('"GET /v1/models HTTP' in line for line in access), "positive control failed"
    assert not any(marker in line for line in access), "query string was forwarded"
    for line in access:
        request = re.search(r'"(?:GET|POST) (\S+) HTTP', line)
        assert request and request.group(1) in {
            "/health",
            "/v1/models",
            "/v1/completions",
            "/v1/chat/completions",
        }, line


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def test_engine_processes_have_no_tcp_listener(harness: Harness) -> None:
    listening = _listening_inodes()
    engine = process_group(harness.engine_pid)
    assert harness.engine_pid in engine and len(engine) >= 2  # API server + EngineCore at least
    for pid in engine:
        assert not (_socket_inodes(pid) & listening), f"engine process {pid} listens on TCP"
    # Positive control: the same method sees the front's listener.
    assert _socket_inodes(harness.proc.pid) & listening


def test_the_engine_has_mount_network_and_ipc_namespaces_of_its_own(
    target: Harness | Container,
) -> None:
    """Required, and served: as root (host) no user namespace is needed; as uid 10001
    without capabilities (the image, under the shipped container profile) one comes first.
    Its root holds what its Landlock rules name, and a /dev/shm of its own. On the host it
    has a PID namespace with a procfs of its own too (vLLM's first process is pid 2); in the
    image the runtime's masked /proc makes the kernel refuse a new procfs, and the event
    says so."""
    event = target.events("namespaces")[0]
    assert event["isolated"] is True and event["mode"] == "required"
    as_root = isinstance(target, Harness) and os.geteuid() == 0
    expected = ["mount", "network", "ipc"] if as_root else ["user", "mount", "network", "ipc"]
    if isinstance(target, Container):
        assert event["pid_refused"].startswith("[Errno 1] mount proc in a new PID namespace")
    else:
        expected.append("pid")
        assert event["pid_in_namespace"] == 2
    assert event["namespaces"] == expected and event["entered"] == expected
    root = event["root"]
    assert root["shm_bytes"] == 1 << 30 and "/dev/null" in root["devices"]
    assert "/usr" in root["read_only"] and len(root["writable"]) == 1


_ENGINE_VIEW = """
import json, os, sys
pid, paths = sys.argv[1], sys.argv[2:]
root = f"/proc/{pid}/root"
seen = {path: os.path.exists(root + path) for path in paths}
seen["own /dev/shm"] = os.stat(root + "/dev/shm").st_dev != os.stat("/dev/shm").st_dev
print(json.dumps(seen))
"""


def test_the_engine_sees_none_of_harness_s_files_and_its_own_dev_shm(
    target: Harness | Container, demo_dir: Path
) -> None:
    """Seen from inside the engine's mount namespace (/proc/PID/root): the model and its
    runtime dir are there; harness's config, TLS key (the demo keeps it in /dev/shm, the
    image in the secrets volume), CA and signature are not, and its /dev/shm is its own."""
    if isinstance(target, Container):  # tests/support/container.py's CONFIG and mounts
        model = "/models/model"
        hidden = ["/models/model.sig", "/etc/harness/harness.toml", "/etc/harness/trust/ca.pem"]
        hidden.append("/run/secrets/harness/server-key.pem")
    else:
        cfg = config.load(demo_dir / assets.CONFIG_NAME)
        assert cfg.model.signature is not None
        model, hidden = str(cfg.model.dir), [str(cfg.source), str(cfg.model.signature.path)]
        hidden += [str(cfg.front.tls.key), str(cfg.front.tls.client_ca)]
    runtime = target.events("engine_start")[0]["socket"].rsplit("/", 1)[0]
    paths = [f"{model}/config.json", runtime, *hidden]
    seen = json.loads(target.python(_ENGINE_VIEW, str(target.engine_pid), *paths))
    assert seen[f"{model}/config.json"] and seen[runtime] and seen["own /dev/shm"], seen
    assert not any(seen[path] for path in hidden), seen


_READ_HARNESS = """
import sys
for name in ("environ", "mem", "maps"):
    try:
        open(f"/proc/{sys.argv[1]}/{name}", "rb").read(1)
        print(name, "readable")
    except PermissionError:
        print(name, "refused")
"""


def test_a_process_of_harness_s_uid_cannot_read_its_memory_or_environment(
    target: Harness | Container,
) -> None:
    """In the image harness and the engine share uid 10001 (a pod's setting): harness is not
    dumpable, so its /proc files belong to root and another process of its uid, outside
    Landlock (started here with `podman exec`), is refused. As root on a host this holds
    trivially, so the host target only checks that harness still serves."""
    if isinstance(target, Harness):
        assert target.alive()
        return
    [harness] = [
        p
        for p in target.processes()
        if p["status"].get("Name") == "harness" and p["status"].get("PPid") == "1"
    ]
    assert harness["status"]["Uid"].split()[0] == "10001"
    out = target.python(_READ_HARNESS, str(harness["pid"]))
    assert out.split() == ["environ", "refused", "mem", "refused", "maps", "refused"], out


def test_engine_runs_in_private_network_and_ipc_namespaces(harness: Harness) -> None:
    """torch.distributed (gloo) in vLLM's worker listens on loopback TCP ports; in the engine's
    own namespace they are reachable by nobody else, and there is no interface but lo."""
    for kind in ("net", "ipc"):
        own = os.readlink(f"/proc/{harness.proc.pid}/ns/{kind}")
        for pid in process_group(harness.engine_pid):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != own, (kind, pid)
    devices = Path(f"/proc/{harness.engine_pid}/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    # Inside that namespace, whatever listens is bound to loopback only.
    for line in Path(f"/proc/{harness.engine_pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            assert local.startswith("0100007F:"), line


def test_engine_environment_is_the_allowlist(harness: Harness) -> None:
    from runtime.config import SECRET_LIKE

    environ = Path(f"/proc/{harness.engine_pid}/environ").read_bytes().split(b"\0")
    names = {item.split(b"=", 1)[0].decode() for item in environ if item}
    assert names == set(harness.events("engine_start")[0]["env_names"])
    assert "HARNESS_TEST_CANARY" not in names
    assert not [n for n in names if SECRET_LIKE.search(n)]
    assert {"HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "VLLM_HOST_IP"} <= names


def test_every_event_has_the_mandatory_fields(harness: Harness) -> None:
    events = harness.events()
    assert {"config_loaded", "engine_start", "engine_ready", "front_listen"} <= {
        e["event_type"] for e in events
    }
    for event in events:
        for key in ("timestamp_utc", "event_type", "outcome", "pod_name", "namespace"):
            assert event.get(key), (key, event)
        assert event["outcome"] in {"allowed", "blocked", "failed", "ok"}


def test_readyz_and_healthz(harness: Harness, demo_dir: Path) -> None:
    ctx = _client_ctx(demo_dir)
    assert _get(f"{harness.url}/healthz", ctx).status_code == 200
    assert _get(f"{harness.url}/readyz", ctx).json() == {"status": "ready"}


def test_metrics_endpoint_counts_requests_and_open_connections(
    harness: Harness, demo_dir: Path
) -> None:
    """The launcher wires the gauges to the running front: a connection held open during
    the scrape is counted, so is the request made on it, and so is a connection that has
    not begun its handshake."""
    assert harness.metrics_url is not None
    host, port = harness.url.removeprefix("https://").split(":")

    def gauge(text: str, name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found is not None, text
        return float(found[1])

    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        _client_ctx(demo_dir).wrap_socket(raw, server_hostname="localhost") as tls,
        socket.create_connection((host, int(port)), timeout=10),  # no ClientHello yet
    ):
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200 ")
        deadline = time.monotonic() + 10
        while True:  # the request's event may land a moment after its response
            text = httpx.get(harness.metrics_url, timeout=10).text
            counted = gauge(text, "harness_handshakes_in_progress") >= 1
            if (counted and 'route="/v1/models"' in text) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert gauge(text, "harness_connections_open") >= 1
    assert gauge(text, "harness_handshakes_in_progress") >= 1
    assert 'harness_requests_total{outcome="allowed",reason="",route="/v1/models"' in text
    assert re.search(r"^harness_requests_in_flight 0\.0$", text, re.MULTILINE), text


def test_the_front_has_open_files_for_its_connection_cap(harness: Harness) -> None:
    """front_listen says what the connection cap needs, and harness runs with at least that
    soft RLIMIT_NOFILE (raised at start when it was lower)."""
    listen = harness.events("front_listen")[0]
    assert listen["max_connections"] == 1024
    assert listen["open_files_needed"] == 1024 + 256 + 16 + 256
    limits = Path(f"/proc/{harness.proc.pid}/limits").read_text()
    [soft] = [line.split()[3] for line in limits.splitlines() if line.startswith("Max open files")]
    assert int(soft) == listen["open_files_limit"] >= listen["open_files_needed"]


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_every_engine_process_has_no_capabilities_no_new_privs_and_seccomp(
    target: Harness | Container,
) -> None:
    """On the host as root the engine also changes uid (below); in the image everything runs
    as uid 10001 with no capabilities at all, tini and harness included."""
    engine = target.engine_group()
    assert len(engine) >= 2  # API server + EngineCore at least
    for process in engine:
        status = process["status"]
        assert status["Uid"].split()[0] != "0", (process["pid"], status["Uid"])
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (process["pid"], caps, status[caps])
        assert status["NoNewPrivs"] == "1", process["pid"]
        assert status["Seccomp"] == "2", (process["pid"], "seccomp filter mode")
    if isinstance(target, Container):
        for process in target.processes():  # tini, harness, this probe: the container's
            status = process["status"]
            assert status["Uid"].split() == ["10001"] * 4, (process["pid"], status["Uid"])
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
            assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


@pytest.mark.skipif(os.geteuid() != 0, reason="the engine changes uid only when harness is root")
def test_every_engine_process_runs_unprivileged(harness: Harness) -> None:
    engine = process_group(harness.engine_pid)
    assert len(engine) >= 2
    for pid in engine:
        status = _status(pid)
        assert status["Uid"].split() == ["65534"] * 4, (pid, status["Uid"])
        assert status["Gid"].split() == ["65534"] * 4, (pid, status["Gid"])
        assert status["Groups"] == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (pid, caps, status[caps])
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2", (pid, "seccomp filter mode")
    event = harness.events("privilege_drop")[0]
    assert event["outcome"] == "ok" and event["uid"] == 65534 and event["no_new_privs"] is True
    # The harness itself (the front) keeps root for now; the engine cannot read its secrets.
    secrets_dir = Path(harness.events("secret_injection")[0]["dir"])
    mode = secrets_dir.stat()
    assert mode.st_uid == 0 and mode.st_mode & 0o077 == 0


def test_engine_compute_threads_and_the_front_keep_to_their_cpus(harness: Harness) -> None:
    """engine.cpus (the shared server sets it where there are two CPUs or more): vLLM binds
    its compute threads to the engine's CPUs, and no thread of harness runs there."""
    from runtime.config import parse_cpu_list

    listen = harness.events("front_listen")[0]
    if "engine_cpus" not in listen:
        pytest.skip("one CPU: nothing to split")
    engine_cpus = set(parse_cpu_list(listen["engine_cpus"]))
    front_cpus = set(parse_cpu_list(listen["front_cpus"]))
    assert engine_cpus and front_cpus and not engine_cpus & front_cpus
    for task in os.listdir(f"/proc/{harness.proc.pid}/task"):
        assert _affinity(task) in (front_cpus, None), task
    bound = [
        (pid, task)
        for pid in process_group(harness.engine_pid)
        for task in os.listdir(f"/proc/{pid}/task")
        if _affinity(task) == engine_cpus
    ]
    assert bound, "no engine thread is bound to engine.cpus"


def _affinity(task: str) -> set[int] | None:
    try:
        return os.sched_getaffinity(int(task))
    except ProcessLookupError:
        return None  # a thread that ended meanwhile


def test_engine_serves_with_seccomp_enforced_and_landlock_on(
    harness: Harness, demo_dir: Path
) -> None:
    """The shared harness runs the defaults: the shipped profile in `enforce` mode, Landlock
    best effort (ABI 7 on these machines). It served every test above."""
    installed = harness.events("seccomp_install")[0]
    assert installed["outcome"] == "ok" and installed["mode"] == "enforce"
    assert installed["profile"].endswith("seccomp/engine-cpu.json")
    harness_fenced, fenced = harness.events("landlock")  # harness first, then the engine
    assert fenced["outcome"] == "ok" and fenced["enforced"] is True
    assert fenced["tcp"]["enforced"] is True
    assert str(demo_dir / "model") in fenced["filesystem"]["read_execute"]
    # Harness itself, from before its first thread: the engine's paths and its own.
    assert harness_fenced["scope"] == "front" and harness_fenced["enforced"] is True
    assert set(fenced["filesystem"]["read_execute"]) < set(
        harness_fenced["filesystem"]["read_execute"]
    )
    assert str(demo_dir / "pki") in harness_fenced["filesystem"]["read_execute"]
    # The engine's /dev/shm is its own tmpfs: harness names it in its rules by a descriptor.
    assert harness_fenced["filesystem"]["write"] == [*fenced["filesystem"]["write"], ENGINE_SHM]
    client = openai_client(harness.url, _client_ctx(demo_dir))
    done = client.completions.create(model="demo", prompt="sandboxed", max_tokens=4)
    assert done.usage.completion_tokens >= 1
    # harness itself (the front) runs under its deny-list filter, on every thread.
    front = [e for e in harness.events("seccomp_install") if e.get("scope") == "front"]
    assert front and front[0]["installed"] is True
    # Its refusals are answered and reported by a process of its own, a child of harness.
    reporter = _status(front[0]["supervisor_pid"])
    assert reporter["PPid"] == str(harness.proc.pid) and reporter["State"][0] in "SR"
    status = _status(harness.proc.pid)
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"


def test_the_engines_refusals_reach_harness_and_a_stock_start_raises_no_alert(
    target: Harness | Container,
) -> None:
    """vLLM probes io_uring while it starts: both the engine's filter and (in the image) the
    container's profile refuse it, and harness's supervisor still answers it. That makes one
    summary, no alert; nothing else was refused, at startup or while serving. The front's
    event loop (uvloop) probes io_uring once too, under harness's own filter: one summary of
    its own. In the image harness finds the container's profile by itself, and its filter
    refuses (and would report) what that profile refuses: serving raised no alert either."""
    target.wait_for("front_listen")
    [front] = [e for e in target.events("seccomp_install") if e.get("scope") == "front"]
    if isinstance(target, Container):
        assert front["mode"] == "container_profile"
        assert front["container_profile"] == "/usr/share/harness/seccomp/harness-cpu.json"
    else:
        assert front["mode"] == "deny_list"
        assert front["container_profile_unknown"] == "harness started under no seccomp filter"
    summaries = {e.get("scope", "engine"): e for e in target.events("seccomp_startup_probes")}
    assert set(summaries) == {"engine", "front"}
    for probes in summaries.values():
        assert "io_uring_setup" in probes["probes"] and probes["outcome"] == "blocked"
        assert probes["mode"] == "enforce"
    assert summaries["front"]["probes"] == {"io_uring_setup": 1}
    assert target.events("seccomp_violation") == []


def test_clamp_policy_gives_a_completion_of_at_most_the_cap(
    harness: Harness, demo_dir: Path
) -> None:
    """A second front, in-process, with max_tokens_policy = clamp, in front of the same real
    engine (its Unix socket): an over-cap request is served, cut to the cap."""
    import threading

    from runtime import config as config_mod
    from runtime.front import server as front_server
    from runtime.front.proxy import FrontApp, FrontState
    from runtime.front.tls import RotatingContext
    from tests.support import free_port

    port = free_port()
    cfg = config_mod.load(
        demo_dir / "demo.toml",
        [
            f'front.listen="127.0.0.1:{port}"',
            'limits.max_tokens_policy="clamp"',
            "limits.max_tokens=8",
        ],
    )
    state = FrontState(engine_ready=True)
    app = FrontApp(
        Path(harness.events("engine_start")[0]["socket"]),
        state,
        front=cfg.front,
        limits=cfg.limits,
        served_names=("demo",),
    )
    listener = front_server.bind(cfg.front)
    server = front_server.build_server(cfg.front, app, state, RotatingContext(cfg.front.tls))
    thread = threading.Thread(target=lambda: front_server.run(server.serve(sockets=[listener])))
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        api = openai_client(f"https://127.0.0.1:{port}", _client_ctx(demo_dir))
        result = api.completions.create(
            model="demo", prompt="hello", max_tokens=50, extra_body={"ignore_eos": True}
        )
        assert result.usage is not None and result.usage.completion_tokens == 8
    finally:
        server.should_exit = True
        thread.join(15)
        listener.close()


def test_a_tensor_parallel_engine_serves_inside_the_sandbox(
    servers: Servers, demo_dir: Path
) -> None:
    """engine.vllm.tensor_parallel_size = 2 with the real vLLM CPU build: two worker ranks,
    each bound to its own CPUs, meeting over TCP inside the engine's own network namespace,
    under the shipped profile (recorded with this workload too) and Landlock. Served, and not
    one syscall refused."""
    harness = servers.start(["engine.vllm.tensor_parallel_size=2"])
    try:
        harness.wait_ready()
        api = openai_client(harness.url, _client_ctx(demo_dir))
        result = api.completions.create(model="demo", prompt="hello", max_tokens=8)
        assert result.usage is not None and 0 < result.usage.completion_tokens <= 8
        [start] = harness.events("engine_start")
        assert "--tensor-parallel-size" in start["argv"]
        assert harness.events("namespaces")[-1]["isolated"] is True
        assert harness.events("seccomp_violation") == []
    finally:
        harness.kill()


def test_a_signed_lora_adapter_and_a_draft_model_serve_inside_the_sandbox(
    servers: Servers, harness: Harness, demo_dir: Path
) -> None:
    """The demo's signed LoRA adapter ([[engine.lora]]) and one-layer draft model
    ([engine.draft]) with the real vLLM CPU build, under the shipped profile and Landlock:
    both verified before the engine starts and re-checked after it is ready; the adapter
    answers under its name and changes what greedy decoding gives (vLLM applied it); the
    draft model leaves greedy output as the model alone gives it (it only proposes)."""
    prompt = "hello world the model serves"

    def greedy(target: Harness, model: str) -> str:
        api = openai_client(target.url, _client_ctx(demo_dir))
        result = api.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        return result.choices[0].text

    base = greedy(harness, "demo")  # the shared server: no adapter, no draft
    served = servers.start([LORA, DRAFT])
    try:
        served.wait_ready()
        assert greedy(served, "demo") == base
        assert greedy(served, LORA_NAME) != base
        [start] = served.events("engine_start")
        assert "--enable-lora" in start["argv"] and "--speculative-config" in start["argv"]
        checks = [(e["artifact"], e.get("stage")) for e in served.events("weight_integrity_check")]
        artifacts = ["model", f"engine.lora[{LORA_NAME}]", "engine.draft"]
        assert checks == [(a, None) for a in artifacts] + [(a, "after_load") for a in artifacts]
        assert served.events("seccomp_violation") == []
        with httpx.Client(verify=_client_ctx(demo_dir), timeout=30) as client:
            listed = client.get(f"{served.url}/v1/models").json()["data"]
        assert {m["id"] for m in listed} == {"demo", LORA_NAME}
    finally:
        served.kill()


TOOLS = [
    "limits.max_tokens=128",  # the demo tokenizer spells JSON a character at a time
    "limits.tools.allow=true",
    'limits.structured_outputs.allow="json_schema"',
    "engine.vllm.enable_auto_tool_choice=true",
    'engine.vllm.tool_call_parser="hermes"',
]
PICK = {
    "type": "function",
    "function": {
        "name": "pick_color",
        "description": "Pick a color",
        "parameters": {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
        "strict": True,  # the engine makes the arguments follow the schema
    },
}


def _no_whitespace(demo_dir: Path) -> dict[str, int]:
    """A logit_bias that keeps the random model from what it prefers inside a JSON grammar,
    whitespace, until max_tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_dir / "model" / "tokenizer.json"))
    vocab = tokenizer.get_vocab().values()
    return {str(i): -100 for i in vocab if (s := tokenizer.decode([i])) and not s.strip()}


def test_tool_calls_with_the_engine_s_parser_inside_the_sandbox(
    servers: Servers, demo_dir: Path
) -> None:
    """limits.tools with vLLM's built-in hermes parser, the real engine under the shipped
    profile: a named tool_choice of a strict tool makes the engine follow the tool's schema
    (grammar-guided) and answer with a tool call the openai client reads; a conversation
    that carries the call and its result is served; tool_choice "auto" is served (the random
    model calls no tool, its text comes back); what limits.tools refuses never reaches the
    engine."""
    harness = servers.start(TOOLS)
    try:
        harness.wait_ready()
        api = openai_client(harness.url, _client_ctx(demo_dir))
        question = [{"role": "user", "content": "pick a color please"}]
        named = api.chat.completions.create(
            model="demo",
            messages=question,  # type: ignore[arg-type]
            tools=[PICK],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "pick_color"}},
            temperature=0,
            logit_bias=_no_whitespace(demo_dir),
        )
        [call] = named.choices[0].message.tool_calls or []
        assert call.function.name == "pick_color"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) in ({"color": "red"}, {"color": "green"})  # type: ignore[union-attr]

        answered = api.chat.completions.create(
            model="demo",
            messages=[
                *question,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "content": "red", "tool_call_id": call.id},
            ],  # type: ignore[list-item]
            tools=[PICK],  # type: ignore[list-item]
            tool_choice="none",
            max_tokens=8,
        )
        assert answered.choices[0].message.content is not None
        assert not answered.choices[0].message.tool_calls

        auto = api.chat.completions.create(
            model="demo",
            messages=question,  # type: ignore[arg-type]
            tools=[PICK],  # type: ignore[list-item]
            max_tokens=8,
        )
        assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")

        pattern = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a+)+"}}}
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(
                model="demo",
                messages=question,  # type: ignore[arg-type]
                tools=[{"type": "function", "function": {"name": "f", "parameters": pattern}}],
                tool_choice="required",
                max_tokens=8,
            )
        assert info.value.body["param"] == "tools[0].function.parameters"  # type: ignore[index]
        refused = harness.wait_for("request_rejected", route="/v1/chat/completions")
        assert refused["reason"] == "structured_outputs_not_allowed"
        assert [e["status"] for e in harness.events("request")] == [200, 200, 200]
        assert harness.events("seccomp_violation") == []
    finally:
        harness.kill()


@pytest.mark.image
def test_the_images_healthcheck_passes_once_harness_serves_and_fails_without_it(
    containers: Containers,
) -> None:
    """The image's own HEALTHCHECK (a TCP connect to 8443, what the Deployment's probes do),
    run by podman inside the container, as uid 10001 under the shipped profile: healthy once
    harness serves. The control: the same image and flags with an entrypoint that only waits
    (nothing listens): unhealthy."""
    assert containers.shared().healthcheck() == "healthy"
    name = f"harness-test-idle-{os.getpid()}"
    idle = [
        "podman", "run", "-d", "--rm", "--name", name, "--health-interval", "disable",
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--user", f"{image.UID}:{image.UID}", "--security-opt", f"seccomp={image.PROFILE}",
        "--entrypoint", "sleep", image.IMAGE, "300",
    ]  # fmt: skip
    subprocess.run(
        idle,
        env=image.ENV,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        assert image.healthcheck(name) == "unhealthy"
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], env=image.ENV, check=False)


_IMAGE_KEY = 'method="key", public_key="/etc/harness/trust/signing-key.pub"'


@pytest.mark.image
def test_adapters_a_draft_model_and_tool_calls_serve_in_the_image(
    containers: Containers, demo_dir: Path
) -> None:
    """The options of the two tests above, in the image under podman + runc as deploy/ runs it
    (uid 10001, no capabilities, the shipped container profile): the signed adapter and draft
    model mounted read-only, verified before the engine and after it is ready; the adapter
    answers for its name and changes greedy output; a named tool call comes back."""
    container = containers.start(
        [
            f'engine.lora=[{{name="{LORA_NAME}", dir="/models/adapter", '
            f'signature={{path="/models/adapter.sig", {_IMAGE_KEY}}}}}]',
            'engine.draft={dir="/models/draft", num_speculative_tokens=3, '
            f'signature={{path="/models/draft.sig", {_IMAGE_KEY}}}}}',
            *TOOLS,
        ]
    )
    try:
        container.wait_ready()
        api = openai_client(container.url, _client_ctx(demo_dir))

        def greedy(model: str) -> str:
            prompt = "hello world the model serves"
            result = api.completions.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0
            )
            return result.choices[0].text

        assert greedy(LORA_NAME) != greedy("demo")
        checks = [
            (e["artifact"], e.get("stage")) for e in container.events("weight_integrity_check")
        ]
        artifacts = ["model", f"engine.lora[{LORA_NAME}]", "engine.draft"]
        assert checks == [(a, None) for a in artifacts] + [(a, "after_load") for a in artifacts]
        # vLLM refuses logit_bias next to a draft model, which the strict call above needs to
        # keep the random model from whitespace: here the grammar holds the call's envelope.
        loose = {**PICK, "function": {**PICK["function"], "strict": False}}
        named = api.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "pick a color please"}],
            tools=[loose],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "pick_color"}},
            temperature=0,
        )
        [call] = named.choices[0].message.tool_calls or []
        assert call.function.name == "pick_color"  # type: ignore[union-attr]
        assert container.events("seccomp_violation") == []
    finally:
        container.kill()
