"""The front's TLS beyond what OpenSSL checks by itself: client certificates fit for client
authentication, throttled identity refusals, a per-address cap on handshakes in progress,
ALPN http/1.1 only, and the key exchange groups. Real TLS with a generated PKI, real sockets:
the front in-process (tests/support/front.py), and `openssl s_client`."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.config import Config, TLSSection
from runtime.demo import pki
from runtime.errors import ConfigError
from runtime.front import tls
from runtime.front.tls import Handshakes, RotatingContext, client_certificate_unfit
from tests.support import client_context, raw_request
from tests.support.front import (
    ALLOWED,
    Front,
    audit_events,
    load_ca,
    read_status,
    wait_until,
)

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _leaf(
    ca: pki.Issued, *, eku: list[x509.ObjectIdentifier] | None, is_ca: bool = False
) -> pki.Issued:
    """A client certificate for ALLOWED that pki.issue cannot make: no EKU extension at all
    (eku None), or basicConstraints CA:TRUE."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd client")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ALLOWED)]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return pki.Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _der(issued: pki.Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def _hostport(front: Front) -> tuple[str, int]:
    host, port = front.url.removeprefix("https://").split(":")
    return host, int(port)


def _refused(front: Front, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> None:
    """A handshake OpenSSL completes, then the front closes the connection unanswered."""
    with (
        socket.create_connection(_hostport(front), timeout=10, source_address=(source, 0)) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(REQUEST)
        if not conn.recv(1):  # TLS 1.3: the verdict comes after the client's Finished
            raise ConnectionError("closed")


def _served(front: Front, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> int:
    with (
        socket.create_connection(_hostport(front), timeout=10, source_address=(source, 0)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(REQUEST)
        return read_status(conn)


def _counted(front: Front, reason: str) -> int:
    return sum(
        e.get("count", 1)
        for e in front.events
        if e["event_type"] == "tls_handshake_rejected" and e.get("reason") == reason
    )


# -- 1. client certificates fit for client authentication --------------------------------


def test_client_certificate_unfit_verdicts() -> None:
    ca = pki.make_ca("verdicts CA")
    client_auth = [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client_certificate_unfit(_der(pki.client_cert(ca, ALLOWED))) is None
    assert client_certificate_unfit(_der(_leaf(ca, eku=None))) == (
        "client_certificate_not_for_client_auth",
        "no extendedKeyUsage extension",
    )
    assert client_certificate_unfit(_der(_leaf(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]))) == (
        "client_certificate_not_for_client_auth",
        "extendedKeyUsage without clientAuth",
    )
    assert client_certificate_unfit(_der(_leaf(ca, eku=client_auth, is_ca=True))) == (
        "client_certificate_is_ca",
        "basicConstraints CA:TRUE",
    )
    assert client_certificate_unfit(_der(ca)) == (
        "client_certificate_is_ca",
        "basicConstraints CA:TRUE",
    )
    assert client_certificate_unfit(b"\x30\x03\x02\x01\x00") == (
        "client_certificate_invalid",
        "cryptography cannot parse it",
    )


@pytest.mark.parametrize(
    ("variant", "reason", "detail"),
    [
        ("no_eku", "client_certificate_not_for_client_auth", "no extendedKeyUsage extension"),
        ("ca_leaf", "client_certificate_is_ca", "basicConstraints CA:TRUE"),
    ],
)
def test_certificates_openssl_accepts_but_unfit_for_client_auth_are_refused(
    front: Front, variant: str, reason: str, detail: str
) -> None:
    """Signed by the client CA, valid, with an allowed identity: OpenSSL's purpose check
    passes both (no EKU: any purpose; CA:TRUE: not looked at for a leaf). The front closes the
    connection before any HTTP is read, and reports it."""
    issued = _leaf(load_ca(front.pki_dir), eku=None if variant == "no_eku" else [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ], is_ca=variant == "ca_leaf")  # fmt: skip
    issued.write(front.pki_dir / f"{variant}.pem", front.pki_dir / f"{variant}-key.pem")
    ctx = front.ctx(variant)
    # Its first request often arrives in the same read as the handshake: repeat, so that one
    # slipping through would reach the upstream.
    for _ in range(5):
        _refused(front, ctx)
        with pytest.raises(OSError):
            raw_request(front.url, ctx, "GET", b"/v1/models")
    wait_until(lambda: _counted(front, reason) >= 10, "the refusals were not all counted")
    events = [e for e in audit_events(front, "tls_handshake_rejected") if e["reason"] == reason]
    assert events[0]["detail"] == detail and events[0]["count"] == 1
    assert events[0]["clients"] == ["127.0.0.1"]
    assert len(events) <= 3  # throttled: one at once, the rest counted
    assert front.upstream.seen == []
    assert _served(front, front.ctx()) == 200  # a fit certificate is still served


def test_the_verdict_on_a_certificate_is_cheap() -> None:
    """A connection's check is a lookup of its certificate's DER; parsing is done once for
    each certificate."""
    ca = pki.make_ca("cache CA")
    der = _der(pki.client_cert(ca, ALLOWED))
    client_certificate_unfit.cache_clear()
    for _ in range(100):
        assert client_certificate_unfit(der) is None
    info = client_certificate_unfit.cache_info()
    assert info.misses == 1 and info.hits == 99


# -- 2. identity refusals are throttled ----------------------------------------------------


def test_identity_refusals_are_throttled_and_name_what_was_presented(front: Front) -> None:
    """Anyone holding a certificate from the client CA can cause these at will: one event a
    second per set of SANs presented, the rest counted into the next."""
    ctx = front.ctx("other")
    for _ in range(40):
        _refused(front, ctx)
    wait_until(lambda: _counted(front, "identity_not_allowed") >= 40, "not all counted")
    events = audit_events(front, "tls_handshake_rejected")
    assert {e["reason"] for e in events} == {"identity_not_allowed"}
    assert len(events) <= 5 and events[0]["count"] == 1
    assert sum(e["count"] for e in events) == 40
    for event in events:
        assert list(event["presented"]) == ["URI:spiffe://test.local/ns/x/sa/other"]
        assert event["detail"] == "no SAN is in front.allowed_identities"
        assert event["clients"] == ["127.0.0.1"]
    assert front.upstream.seen == []


# -- 3. handshakes in progress per client address ---------------------------------------


def test_handshakes_per_client_are_counted_and_forgotten() -> None:
    handshakes = Handshakes(limit=8, per_client=2)
    assert handshakes.begin("10.0.0.1") and handshakes.begin("10.0.0.1")
    assert not handshakes.begin("10.0.0.1")  # its share is full
    assert handshakes.begin("10.0.0.2") and handshakes.begin(None)
    assert handshakes.in_progress == 4
    assert handshakes.by_client == {"10.0.0.1": 2, "10.0.0.2": 1}
    for client in ("10.0.0.1", "10.0.0.2", None, "10.0.0.1"):
        handshakes.end(client)
    assert handshakes.in_progress == 0 and handshakes.by_client == {}  # nothing left behind
    assert handshakes.begin("10.0.0.1")


def test_one_address_holding_its_handshakes_cannot_lock_out_another(
    make_front: Callable[..., Front],
) -> None:
    """127.0.0.1 holds its share of handshake slots with bare TCP connects; its further
    connections are closed at accept, while a client from 127.0.0.2 is still served."""
    front = make_front(
        max_handshakes=4,
        max_handshakes_per_client=2,
        handshake_timeout_s=30,
        keepalive_timeout_s=30,
    )
    assert front.tls_material is not None
    handshakes = front.tls_material.handshakes
    address = _hostport(front)
    with contextlib.ExitStack() as held:
        for _ in range(2):
            held.enter_context(socket.create_connection(address, timeout=10))
        wait_until(lambda: handshakes.in_progress == 2, "the stalled handshakes are not counted")
        for _ in range(3):
            with socket.create_connection(address, timeout=10) as extra:
                extra.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert extra.recv(1) == b""  # closed at accept
        assert handshakes.by_client == {"127.0.0.1": 2}
        # Without the cap per address, 127.0.0.1 could have taken all four slots.
        assert _served(front, front.ctx(), source="127.0.0.2") == 200
        assert handshakes.by_client == {"127.0.0.1": 2}
    wait_until(lambda: handshakes.in_progress == 0, "the closed connections are still counted")
    assert handshakes.by_client == {}
    wait_until(lambda: _counted(front, "too_many_handshakes_from_client") >= 3, "not all counted")
    refused = audit_events(front, "tls_handshake_rejected")
    assert {e["reason"] for e in refused} == {"too_many_handshakes_from_client"}
    assert refused[0]["detail"] == (
        "2 handshakes in progress from its address (front.max_handshakes_per_client)"
    )
    assert all(e["clients"] == ["127.0.0.1"] for e in refused)
    assert [seen["path"] for seen in front.upstream.seen] == [b"/v1/models"]


def _front_config(**front: object) -> Config:
    return Config.model_validate(
        {
            "model": {"dir": "/tmp", "served_name": "demo", "unsafe_unsigned": True},
            "front": {
                "allowed_identities": [ALLOWED],
                "tls": {"cert": "/c.pem", "key": "/k.pem", "client_ca": "/ca.pem"},
                **front,
            },
        }
    )


def test_max_handshakes_per_client_default_and_bound(tmp_path: Path) -> None:
    from runtime import config

    assert _front_config().front.handshakes_per_client == 64
    assert _front_config(max_handshakes=16).front.handshakes_per_client == 16
    assert _front_config(max_handshakes_per_client=8).front.handshakes_per_client == 8
    path = tmp_path / "harness.toml"
    path.write_text(
        '[model]\ndir = "m"\nserved_name = "demo"\nunsafe_unsigned = true\n'
        f'[front]\nallowed_identities = ["{ALLOWED}"]\n'
        '[front.tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
    )
    with pytest.raises(ConfigError) as info:
        config.load(path, ["front.max_handshakes=16", "front.max_handshakes_per_client=32"])
    assert "max_handshakes_per_client (32) is more than max_handshakes (16)" in info.value.message
    assert "'front'" in info.value.message and info.value.exit_code == 2


# -- 4. ALPN: http/1.1 only --------------------------------------------------------------


def test_an_h2_only_client_gets_no_protocol_and_its_preface_never_reaches_the_engine(
    front: Front,
) -> None:
    """Python's ssl answers an ALPN offer it cannot meet with no protocol (not the
    no_application_protocol alert): the handshake completes without h2, and the HTTP/2
    preface then meets the HTTP/1.1 parser."""
    h2_only = front.ctx()
    h2_only.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(_hostport(front), timeout=10) as raw,
        h2_only.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        assert conn.selected_alpn_protocol() is None
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := conn.recv(4096):
                answer += chunk
    # Refused by the HTTP/1.1 side (today uvicorn's 400), or closed; never served.
    assert answer == b"" or answer.split(b" ", 2)[1][:1] in (b"4", b"5"), answer
    assert front.upstream.seen == []
    both = front.ctx()
    both.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(_hostport(front), timeout=10) as raw,
        both.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        assert conn.selected_alpn_protocol() == "http/1.1"
        conn.sendall(REQUEST)
        assert read_status(conn) == 200


# -- 5. key exchange groups --------------------------------------------------------------


@pytest.fixture()
def pki_dir(tmp_path: Path) -> Path:
    ca = pki.make_ca("groups CA")
    ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    pki.server_cert(ca).write(tmp_path / "server.pem", tmp_path / "server-key.pem")
    pki.client_cert(ca, ALLOWED).write(tmp_path / "client.pem", tmp_path / "client-key.pem")
    return tmp_path


def _section(pki_dir: Path) -> TLSSection:
    return TLSSection(
        cert=pki_dir / "server.pem", key=pki_dir / "server-key.pem", client_ca=pki_dir / "ca.pem"
    )


@contextlib.contextmanager
def _tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A plain TLS server on `ctx` (in a thread): handshake, write b"ok", close."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(10)
            with contextlib.suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn:
                conn.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _s_client(pki_dir: Path, port: int, groups: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-tls1_3", "-groups", groups, "-CAfile", str(pki_dir / "ca.pem"),
            "-cert", str(pki_dir / "client.pem"), "-key", str(pki_dir / "client-key.pem"),
            "-verify_return_error", "-ign_eof",
        ],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


@needs_openssl
def test_only_x25519_p256_and_p384_are_negotiated(pki_dir: Path) -> None:
    with _tls_server(tls.server_context(_section(pki_dir))) as port:
        for groups, shown in [
            ("X25519", "X25519"),
            ("P-256", "ECDH, prime256v1"),
            ("P-384", "ECDH, secp384r1"),
            ("X448:P-521:P-384", "ECDH, secp384r1"),  # the one it shares is picked
        ]:
            done = _s_client(pki_dir, port, groups)
            assert f"Server Temp Key: {shown}" in done.stdout, done.stdout + done.stderr
            assert "Verification: OK" in done.stdout and "ok" in done.stdout
        for groups in ("X448", "P-521", "ffdhe2048", "X448:P-521"):
            done = _s_client(pki_dir, port, groups)
            assert done.returncode != 0, groups
            assert "handshake failure" in done.stderr, done.stderr
            assert "Server Temp Key" not in done.stdout


@needs_openssl
def test_the_front_refuses_x448_and_p521_and_reports_it(front: Front) -> None:
    port = _hostport(front)[1]
    for groups in ("X448", "P-521"):
        done = _s_client(front.pki_dir, port, groups)
        assert done.returncode != 0 and "Server Temp Key" not in done.stdout, groups
    assert "Server Temp Key: X25519" in _s_client(front.pki_dir, port, "X25519").stdout
    wait_until(lambda: _counted(front, "handshake_failed") >= 2, "the refusals were not counted")
    events = audit_events(front, "tls_handshake_rejected")
    assert {(e["reason"], e["detail"]) for e in events} == {
        ("handshake_failed", "NO_SUITABLE_KEY_SHARE")
    }
    assert front.upstream.seen == []


@needs_openssl
def test_rotated_contexts_keep_the_groups(pki_dir: Path) -> None:
    material = RotatingContext(_section(pki_dir))
    pki.server_cert(load_ca(pki_dir)).write(
        pki_dir / "server.pem.new", pki_dir / "server-key.pem.new"
    )
    os.replace(pki_dir / "server-key.pem.new", pki_dir / "server-key.pem")
    os.replace(pki_dir / "server.pem.new", pki_dir / "server.pem")
    material._next_check = 0.0
    material.reload_if_changed()
    assert material.current is not material.base
    with _tls_server(material.current) as port:
        assert "handshake failure" in _s_client(pki_dir, port, "P-521").stderr
        assert "Server Temp Key: X25519" in _s_client(pki_dir, port, "X25519").stdout


def test_a_python_client_offering_p521_only_is_refused(pki_dir: Path) -> None:
    """Without the openssl CLI too: a client context limited to one curve offers only it."""
    ctx = client_context(pki_dir / "ca.pem", pki_dir / "client.pem", pki_dir / "client-key.pem")
    with _tls_server(tls.server_context(_section(pki_dir))) as port:
        for curve, works in [("secp521r1", False), ("prime256v1", True), ("secp384r1", True)]:
            ctx.set_ecdh_curve(curve)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                if works:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                        assert conn.recv(2) == b"ok"
                else:
                    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
                        ctx.wrap_socket(raw, server_hostname="localhost")


def test_the_groups_are_set_only_through_a_pointer_that_checks_out(pki_dir: Path) -> None:
    """The SSL_CTX pointer is used only when OpenSSL, asked through it, reports this
    context's verify mode and options; another context's pointer is refused, and so is a
    list OpenSSL refuses, without leaving an error behind for the ssl module."""
    import ctypes

    ours = tls.server_context(_section(pki_dir))
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    other.check_hostname, other.verify_mode = False, ssl.CERT_NONE
    pointer = ctypes.c_void_p.from_address(id(other) + object.__basicsize__).value
    with pytest.raises(ConfigError, match="not CPython's PySSLContext"):
        tls._set_groups(ours, tls.GROUPS, pointer=pointer)
    with pytest.raises(ConfigError, match="OpenSSL refused the list") as info:
        tls._set_groups(ours, "X25519:no-such-group")
    assert "X25519:P-256:P-384" in info.value.message and info.value.fix
    # The context still works, with the groups it had.
    ctx = client_context(pki_dir / "ca.pem", pki_dir / "client.pem", pki_dir / "client-key.pem")
    with (
        _tls_server(ours) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        assert conn.recv(2) == b"ok"
