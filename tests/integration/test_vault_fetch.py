"""`harness secrets fetch` against a Vault-API stand-in, and against a real Vault when one is
configured.

No Vault server can run on the machines this suite runs on, so `VaultStandIn` below is a small
HTTPS server (real TLS, certificates from a CA generated per session) that speaks the
documented Vault HTTP API for exactly the calls `harness secrets fetch` makes, and no others:
`POST /v1/auth/<mount>/login` (Kubernetes: role + jwt; AppRole: role_id + secret_id),
`GET /v1/<mount>/data/<path>` (KV v2 read), `POST /v1/auth/token/revoke-self`. It issues
tokens, checks `X-Vault-Token` on every read, forgets revoked tokens and records each call.
Output dirs live on real tmpfs (/dev/shm). `test_real_vault` runs the same command against a
real Vault when `VAULT_ADDR` and the AppRole files are provided (see its skip reason).
"""

from __future__ import annotations

import errno
import io
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runtime import cli, telemetry
from runtime.config import SECRET_LIKE
from runtime.demo import pki
from runtime.errors import ConfigError, SecretsError
from runtime.secrets.vault import SecretSpec, parse_spec, render
from tests.support import REPO, clean_environ

JWT = "eyJhbGciOiJSUzI1NiJ9.standin-service-account.sig"
ROLE_ID = "5f7c3a1e-role-id"
SECRET_ID = "9d1e0b7a-secret-id"
TLS_KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n"
API_KEY = "sk-live-ünïcode-value"
KV: dict[str, dict[str, Any]] = {
    "harness/front": {"key": TLS_KEY, "cert": "-----BEGIN CERTIFICATE-----\n"},
    "harness/otlp": {"authorization": API_KEY},
    "harness/db": {"user": "app", "password": "db-pass-4711"},
    "harness/odd": {"port": 5432},
}
VALUES = [TLS_KEY.splitlines()[1], API_KEY, "db-pass-4711", JWT, ROLE_ID, SECRET_ID]


# -- the Vault-API stand-in -----------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    token: str | None


@dataclass
class VaultStandIn:
    tls: ssl.SSLContext | None
    kv_mount: str = "secret"
    k8s_mount: str = "kubernetes"
    approle_mount: str = "approle"
    deny_revoke: bool = False
    redirect_reads_to: str | None = None
    calls: list[Call] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                standin._handle(self, "GET")

            def do_POST(self) -> None:
                standin._handle(self, "POST")

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                if standin.tls is not None:  # handshake in the request thread, not the loop
                    request = standin.tls.wrap_socket(request, server_side=True)
                super().finish_request(request, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # refused handshakes are what some tests are about

        self.server = Server(("127.0.0.1", 0), Handler)
        scheme = "https" if self.tls else "http"
        self.addr = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else {}
        token = h.headers.get("X-Vault-Token")
        path = h.path.split("?", 1)[0]
        self.calls.append(Call(method, path, token))
        status, doc = self._route(method, path, body, token)
        data = b"" if doc is None else json.dumps(doc).encode()
        h.send_response(status)
        if status in (301, 302, 307, 308):
            h.send_header("Location", f"{self.redirect_reads_to}{path}")
        if doc is not None:
            h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(
        self, method: str, path: str, body: dict[str, Any], token: str | None
    ) -> tuple[int, dict[str, Any] | None]:
        denied = {"errors": ["permission denied"]}
        if method == "POST" and path == f"/v1/auth/{self.k8s_mount}/login":
            if body.get("role") != "inference":
                return 400, {"errors": [f'invalid role name "{body.get("role")}"']}
            return self._login() if body.get("jwt") == JWT else (403, denied)
        if method == "POST" and path == f"/v1/auth/{self.approle_mount}/login":
            ok = body.get("role_id") == ROLE_ID and body.get("secret_id") == SECRET_ID
            return self._login() if ok else (400, {"errors": ["invalid role or secret ID"]})
        if method == "POST" and path == "/v1/auth/token/revoke-self":
            if token not in self.live or self.deny_revoke:
                return 403, denied
            self.live.discard(token)
            self.revoked.add(token)
            return 204, None
        prefix = f"/v1/{self.kv_mount}/data/"
        if method == "GET" and path.startswith(prefix):
            if token not in self.live:
                return 403, denied
            if self.redirect_reads_to:
                return 307, None
            data = KV.get(path.removeprefix(prefix))
            if data is None:
                return 404, {"errors": []}
            meta = {"version": 3, "created_time": "2025-01-01T00:00:00Z", "deletion_time": ""}
            return 200, {"data": {"data": data, "metadata": meta}, "lease_duration": 0}
        return 404, {"errors": ["no handler for route"]}

    def _login(self) -> tuple[int, dict[str, Any]]:
        token = f"hvs.standin{len(self.calls):04d}{os.urandom(8).hex()}"
        self.live.add(token)
        auth = {"client_token": token, "policies": ["default"], "lease_duration": 60}
        return 200, {"auth": auth}


# -- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("vault-pki")
    ca = pki.make_ca("vault stand-in CA")
    ca.write(root / "ca.pem")
    pki.make_ca("some other CA").write(root / "other-ca.pem")
    pki.server_cert(ca).write(root / "server.pem", root / "server-key.pem")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(root / "server.pem", root / "server-key.pem")
    return Pki(root / "ca.pem", root / "other-ca.pem", ctx)


@pytest.fixture()
def vault(tls: Pki) -> Iterator[VaultStandIn]:
    standin = VaultStandIn(tls.server)
    yield standin
    standin.close()


@pytest.fixture()
def out(shm_dir: Path) -> Path:
    return shm_dir  # fetched secrets go to tmpfs


@pytest.fixture()
def creds(tmp_path: Path) -> Path:
    for name, value in (("jwt", JWT), ("role-id", ROLE_ID), ("secret-id", SECRET_ID)):
        (tmp_path / name).write_text(value + "\n")
    return tmp_path


@pytest.fixture()
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Events of in-process runs; the environment cleared of secret-like names."""
    for name in list(os.environ):
        if SECRET_LIKE.search(name):
            monkeypatch.delenv(name)
    stream = io.StringIO()
    telemetry.set_stream(stream)
    yield stream
    telemetry.set_stream(None)


def _fetch(vault: VaultStandIn, ca: Path, creds: Path, out: Path, *extra: str) -> list[str]:
    return [
        "secrets",
        "fetch",
        "--addr",
        vault.addr,
        "--ca-cert",
        str(ca),
        "--auth",
        "kubernetes",
        "--role",
        "inference",
        "--jwt-file",
        str(creds / "jwt"),
        "--out",
        str(out),
        *extra,
    ]


def _parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _assert_no_values(*texts: str) -> None:
    for text in texts:
        for value in VALUES:
            assert value not in text


def _paths(vault: VaultStandIn) -> list[str]:
    return [f"{c.method} {c.path}" for c in vault.calls]


# -- the stand-in -------------------------------------------------------------------------------


def test_fetch_writes_private_files_revokes_the_token_and_logs_no_values(
    vault: VaultStandIn,
    tls: Pki,
    creds: Path,
    out: Path,
    events: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / ".vault-token").write_text("hvs.stale-cli-login")  # hvac's fallback token
    monkeypatch.setenv("HOME", str(tmp_path))
    vault.k8s_mount = "kubernetes-eu"
    argv = _fetch(vault, tls.ca, creds, out, "--auth-mount", "kubernetes-eu")
    argv += ["--secret", "tls.key=harness/front#key", "--secret", "otlp-auth=/harness/otlp/"]
    argv += ["--secret", "db.json=harness/db"]
    assert cli.main(argv) == 0

    assert sorted(os.listdir(out)) == ["db.json", "otlp-auth", "tls.key"]  # no temp files
    for name in os.listdir(out):
        st = os.stat(out / name)
        assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_uid == os.geteuid()
    assert (out / "tls.key").read_text() == TLS_KEY
    assert (out / "otlp-auth").read_bytes() == API_KEY.encode()
    assert json.loads((out / "db.json").read_text()) == KV["harness/db"]

    assert _paths(vault) == [
        "POST /v1/auth/kubernetes-eu/login",
        "GET /v1/secret/data/harness/front",
        "GET /v1/secret/data/harness/otlp",
        "GET /v1/secret/data/harness/db",
        "POST /v1/auth/token/revoke-self",
    ]
    [token] = vault.revoked
    assert vault.calls[0].token is None and {c.token for c in vault.calls[1:]} == {token}
    assert not vault.live

    [event] = _parsed(events)
    assert event["event_type"] == "secret_injection" and event["outcome"] == "ok"
    assert event["count"] == 3 and event["token_revoked"] is True
    assert {s["name"] for s in event["secrets"]} == {"tls.key", "otlp-auth", "db.json"}
    assert {"pod_name", "namespace", "timestamp_utc"} <= set(event)
    captured = capsys.readouterr()
    _assert_no_values(events.getvalue(), captured.out, captured.err, token)
    assert token not in events.getvalue() + captured.err


def test_cli_subprocess_with_approle_and_vault_env_defaults(
    vault: VaultStandIn, tls: Pki, creds: Path, out: Path
) -> None:
    env = dict(clean_environ(), VAULT_ADDR=vault.addr, VAULT_CACERT=str(tls.ca))
    harness = Path(sys.executable).parent / "harness"
    result = subprocess.run(
        [
            str(harness),
            "secrets",
            "fetch",
            "--auth",
            "approle",
            "--role-id-file",
            str(creds / "role-id"),
            "--secret-id-file",
            str(creds / "secret-id"),
            "--secret",
            "tls.key=harness/front#key",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "tls.key").read_text() == TLS_KEY
    assert stat.S_IMODE(os.stat(out / "tls.key").st_mode) == 0o400
    assert _paths(vault)[0] == "POST /v1/auth/approle/login" and len(vault.revoked) == 1
    [event] = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["outcome"] == "ok" and event["auth"] == "approle" and event["count"] == 1
    assert f"wrote 1 secrets to {out}: tls.key" in result.stderr
    _assert_no_values(result.stdout, result.stderr)


def _refused(
    argv: list[str], capsys: pytest.CaptureFixture[str], events: io.StringIO, *needles: str
) -> tuple[str, dict[str, Any]]:
    assert cli.main(argv) == 4
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err
    assert "fix:" in err
    _assert_no_values(err, events.getvalue())
    return err, _parsed(events)[-1]


def test_wrong_ca_fails_tls_with_exit_4(
    vault: VaultStandIn, tls: Pki, creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    argv = _fetch(vault, tls.other_ca, creds, out, "--secret", "k=harness/front#key")
    _, event = _refused(argv, capsys, events, "TLS verification of", "certificate verify failed")
    assert vault.calls == [] and os.listdir(out) == []
    assert event["outcome"] == "failed" and event["token_revoked"] is None


def test_denied_login_exits_4_naming_role_and_mount(
    vault: VaultStandIn, tls: Pki, creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    (creds / "jwt").write_text("eyJ.another-service-account.sig")
    argv = _fetch(vault, tls.ca, creds, out, "--secret", "k=harness/front#key")
    _refused(
        argv,
        capsys,
        events,
        "kubernetes login at auth/kubernetes as role 'inference': refused by Vault: permission "
        "denied",
        "bound_service_account_names",
    )
    assert _paths(vault) == ["POST /v1/auth/kubernetes/login"]  # no token: nothing to revoke
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    ("second", "needle"),
    [
        ("b=harness/absent", "secret b: reading secret/harness/absent: not found"),
        (
            "b=harness/front#nope",
            "secret b: field 'nope' is not in secret/harness/front (its fields: cert, key)",
        ),
        ("b=harness/db", "secret b: secret/harness/db has 2 fields (password, user), not one"),
        ("b=harness/odd", "field 'port' of secret/harness/odd is a int, not a string"),
    ],
)
def test_a_missing_path_or_field_writes_nothing_and_still_revokes(
    vault: VaultStandIn,
    tls: Pki,
    creds: Path,
    out: Path,
    events: io.StringIO,
    capsys: Any,
    second: str,
    needle: str,
) -> None:
    argv = _fetch(vault, tls.ca, creds, out, "--secret", "a=harness/front#key", "--secret", second)
    _, event = _refused(argv, capsys, events, needle)
    assert os.listdir(out) == []  # the first secret, read fine, was not written either
    assert _paths(vault)[-1] == "POST /v1/auth/token/revoke-self"
    assert len(vault.revoked) == 1 and not vault.live
    assert event["outcome"] == "failed" and event["token_revoked"] is True


def test_a_token_that_cannot_be_revoked_fails_before_anything_is_written(
    vault: VaultStandIn, tls: Pki, creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    vault.deny_revoke = True
    argv = _fetch(vault, tls.ca, creds, out, "--secret", "k=harness/front#key")
    _refused(argv, capsys, events, "revoking the Vault token failed", "nothing was written")
    assert os.listdir(out) == []


def test_a_redirect_is_not_followed_with_the_token(
    vault: VaultStandIn, tls: Pki, creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    elsewhere = VaultStandIn(tls.server)
    try:
        vault.redirect_reads_to = elsewhere.addr
        argv = _fetch(vault, tls.ca, creds, out, "--secret", "k=harness/front#key")
        _refused(argv, capsys, events, "unexpected HTTP 307 (redirect to")
        assert elsewhere.calls == [] and os.listdir(out) == []
        assert len(vault.revoked) == 1
    finally:
        elsewhere.close()


def test_a_folder_in_the_way_fails_before_anything_is_written(
    vault: VaultStandIn, tls: Pki, creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    (out / "b").mkdir()
    argv = _fetch(vault, tls.ca, creds, out)
    argv += ["--secret", "a=harness/front#key", "--secret", "b=harness/otlp"]
    _refused(argv, capsys, events, f"writing secret b into {out}: Is a directory")
    assert os.listdir(out) == ["b"] and os.listdir(out / "b") == []


def test_a_failed_write_removes_its_temporary_files(
    vault: VaultStandIn,
    tls: Pki,
    creds: Path,
    out: Path,
    events: io.StringIO,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full tmpfs cannot be produced on demand here: fsync fails on the second file."""
    real_fsync = os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    (out / "a").write_text("the previous version")
    os.chmod(out / "a", 0o400)
    monkeypatch.setattr(os, "fsync", fsync)
    argv = _fetch(vault, tls.ca, creds, out)
    argv += ["--secret", "a=harness/front#key", "--secret", "b=harness/otlp"]
    _refused(argv, capsys, events, f"writing secret b into {out}: No space left on device")
    assert os.listdir(out) == ["a"] and (out / "a").read_text() == "the previous version"
    assert len(vault.revoked) == 1


def test_an_out_dir_on_disk_is_refused_before_vault_is_contacted(
    vault: VaultStandIn,
    tls: Pki,
    creds: Path,
    tmp_path: Path,
    events: io.StringIO,
    capsys: Any,
) -> None:
    disk = tmp_path / "secrets"
    disk.mkdir()
    argv = _fetch(vault, tls.ca, creds, disk, "--secret", "k=harness/front#key")
    _, event = _refused(argv, capsys, events, "not in memory: the secrets would reach a disk")
    assert vault.calls == [] and os.listdir(disk) == []
    assert event["outcome"] == "blocked"


def test_vault_token_in_the_environment_is_refused(
    vault: VaultStandIn,
    tls: Pki,
    creds: Path,
    out: Path,
    events: io.StringIO,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.from-the-environment")
    argv = _fetch(vault, tls.ca, creds, out, "--secret", "k=harness/front#key")
    err, _ = _refused(argv, capsys, events, "VAULT_TOKEN", "values not shown")
    assert "hvs.from-the-environment" not in err + events.getvalue()
    assert vault.calls == [] and os.listdir(out) == []


def test_plain_http_is_refused_unless_explicitly_unsafe(
    creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    plain = VaultStandIn(None)
    try:
        argv = _fetch(plain, Path("/nonexistent-ca.pem"), creds, out)
        argv += ["--secret", "k=harness/otlp"]
        _refused(argv, capsys, events, "is plain http", "--unsafe-allow-http")
        assert plain.calls == []
        assert cli.main([*argv, "--unsafe-allow-http"]) == 0
        assert (out / "k").read_bytes() == API_KEY.encode()
        assert "clear text" in capsys.readouterr().err
        assert [e["event_type"] for e in _parsed(events)][-2:] == [
            "unsafe_setting",
            "secret_injection",
        ]
    finally:
        plain.close()


def test_https_without_a_ca_is_refused(
    vault: VaultStandIn, creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    argv = _fetch(vault, Path("/nonexistent-ca.pem"), creds, out, "--secret", "k=a/b")
    _refused(argv, capsys, events, "--ca-cert /nonexistent-ca.pem: No such file")
    argv.remove("--ca-cert")
    argv.remove("/nonexistent-ca.pem")
    _refused(argv, capsys, events, "no CA certificate to verify Vault")
    assert vault.calls == []


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("tls.key", "no '='"),
        ("=harness/a", "is not a plain file name"),
        (".hidden=harness/a", "is not a plain file name"),
        ("../x=harness/a", "is not a plain file name"),
        ("a/b=harness/a", "is not a plain file name"),
        ("k=", "is not a KV path"),
        ("k=harness/../etc", "is not a KV path"),
        ("k=harness//a", "is not a KV path"),
        ("k=harness/a#", "empty field"),
        ("k.json=harness/a#f", "a .json file holds every field"),
    ],
)
def test_malformed_secret_specs_are_usage_errors(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    assert needle in info.value.message and info.value.exit_code == 2


def test_spec_parsing_and_rendering() -> None:
    assert parse_spec("k=/a/b/#f") == SecretSpec("k", "a/b", "f")
    assert parse_spec("k.json=a") == SecretSpec("k.json", "a", None)
    assert render(SecretSpec("k", "a"), "secret/a", {"only": "v"}) == b"v"
    assert json.loads(render(SecretSpec("k.json", "a"), "secret/a", {"x": "1", "y": "2"})) == {
        "x": "1",
        "y": "2",
    }
    with pytest.raises(SecretsError, match="has 0 fields"):
        render(SecretSpec("k", "a"), "secret/a", {})
    with pytest.raises(SecretsError, match="field 'x' of secret/a is a dict"):
        render(SecretSpec("k.json", "a"), "secret/a", {"x": {"nested": "v"}})


def test_a_duplicate_file_name_is_a_usage_error(
    creds: Path, out: Path, events: io.StringIO, capsys: Any
) -> None:
    argv = ["secrets", "fetch", "--addr", "https://vault:8200", "--auth", "kubernetes"]
    argv += ["--role", "r", "--out", str(out), "--secret", "k=a", "--secret", "k=b"]
    assert cli.main(argv) == 2
    assert "file name k is given twice" in capsys.readouterr().err


# -- a real Vault -----------------------------------------------------------------------------

REAL = {
    "VAULT_ADDR": "the Vault address",
    "HARNESS_VAULT_TEST_APPROLE_DIR": "a folder with files role-id and secret-id",
    "HARNESS_VAULT_TEST_SECRET": "one --secret NAME=PATH[#FIELD] readable by that role",
}


@pytest.mark.skipif(
    not all(os.environ.get(k) for k in REAL),
    reason="no real Vault configured: set "
    + "; ".join(f"{k} ({v})" for k, v in REAL.items())
    + "; VAULT_CACERT for https; optionally HARNESS_VAULT_TEST_KV_MOUNT",
)
def test_real_vault(out: Path) -> None:
    approle = Path(os.environ["HARNESS_VAULT_TEST_APPROLE_DIR"])
    env = clean_environ()
    env["VAULT_ADDR"] = os.environ["VAULT_ADDR"]
    if os.environ.get("VAULT_CACERT"):
        env["VAULT_CACERT"] = os.environ["VAULT_CACERT"]
    unsafe = ["--unsafe-allow-http"] if env["VAULT_ADDR"].startswith("http://") else []
    spec = os.environ["HARNESS_VAULT_TEST_SECRET"]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "harness"),
            "secrets",
            "fetch",
            "--auth",
            "approle",
            "--role-id-file",
            str(approle / "role-id"),
            "--secret-id-file",
            str(approle / "secret-id"),
            "--kv-mount",
            os.environ.get("HARNESS_VAULT_TEST_KV_MOUNT", "secret"),
            "--secret",
            spec,
            "--out",
            str(out),
            *unsafe,
        ],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    written = out / spec.partition("=")[0]
    assert written.stat().st_size > 0 and stat.S_IMODE(written.stat().st_mode) == 0o400
    [event] = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["outcome"] == "ok" and event["token_revoked"] is True
