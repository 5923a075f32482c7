"""The in-process front (tests/support/front.py) and client certificates: unfit ones refused,
handshakes OpenSSL refuses reported, the server certificate and client CA rotated, expiry."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from runtime.demo import pki
from runtime.front.tls import RotatingContext
from tests.support import client_context, free_port
from tests.support.front import (
    ALLOWED,
    CHAT,
    Front,
    audit_events,
    load_ca,
    read_status,
)


@pytest.mark.parametrize("variant", ["expired", "not_yet_valid", "server_auth_only"])
def test_client_certificates_of_the_right_ca_but_unfit_are_refused(
    front: Front, variant: str
) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from runtime.demo.pki import SERVER_AUTH, Issued

    ca_key = front.pki_dir / "ca-key.pem"
    ca = Issued(
        x509.load_pem_x509_certificate((front.pki_dir / "ca.pem").read_bytes()),
        serialization.load_pem_private_key(ca_key.read_bytes(), None),  # type: ignore[arg-type]
    )
    now = dt.datetime.now(dt.UTC)
    kwargs: dict[str, Any] = {
        "expired": {
            "not_before": now - dt.timedelta(days=10),
            "not_after": now - dt.timedelta(days=1),
        },
        "not_yet_valid": {
            "not_before": now + dt.timedelta(days=1),
            "not_after": now + dt.timedelta(days=10),
        },
        "server_auth_only": {"eku": [SERVER_AUTH]},
    }[variant]
    pki.client_cert(ca, ALLOWED, **kwargs).write(
        front.pki_dir / f"{variant}.pem", front.pki_dir / f"{variant}-key.pem"
    )
    with (
        pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError)),
        httpx.Client(verify=front.ctx(variant)) as client,
    ):
        client.get(f"{front.url}/v1/models")
    assert front.upstream.seen == []
    # OpenSSL refused the handshake, before the front saw a connection; it is still reported.
    [event] = audit_events(front, "tls_handshake_rejected")
    assert event["reason"] == "client_certificate_invalid" and event["count"] == 1
    assert (
        event["detail"]
        == {
            "expired": "certificate has expired",
            "not_yet_valid": "certificate is not yet valid",
            "server_auth_only": "unsuitable certificate purpose",
        }[variant]
    )


def _handshake(front: Front, ctx: ssl.SSLContext) -> None:
    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if not tls.recv(1):  # TLS 1.3: the server's verdict arrives after the client's Finished
            raise ConnectionError("closed")


def test_handshakes_openssl_refuses_are_reported_and_counted(front: Front) -> None:
    from runtime import telemetry
    from runtime.front import metrics

    port = free_port()
    collected = metrics.serve(
        f"127.0.0.1:{port}", metrics.Gauges(lambda: 0.0, lambda: 0.0, lambda: 0.0)
    )
    host, front_port = front.url.removeprefix("https://").split(":")
    try:
        for _ in range(3):  # the kubelet's probes: a TCP connect that sends nothing
            socket.create_connection((host, int(front_port))).close()
        no_cert = ssl.create_default_context(cafile=str(front.pki_dir / "ca.pem"))
        for _ in range(10):  # one event at once, the other nine within a second, counted
            _handshake(front, no_cert)
        tls12 = front.ctx()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        _handshake(front, tls12)
        with socket.create_connection((host, int(front_port)), timeout=10) as raw:
            raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw.recv(1)
        deadline = time.monotonic() + 10
        while sum(e.get("count", 0) for e in front.events) < 12:
            assert time.monotonic() < deadline, front.events
            time.sleep(0.05)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        telemetry.unsubscribe(collected.observe)
    events = [e for e in front.events if e["event_type"] == "tls_handshake_rejected"]
    no_certs = [e for e in events if e["reason"] == "no_client_certificate"]
    # The first at once, the rest held back and reported together (10 take well under 1 s).
    assert no_certs[0]["count"] == 1 and sum(e["count"] for e in no_certs) == 10
    assert len(no_certs) <= 3
    assert no_certs[0]["detail"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert all(e["clients"] == ["127.0.0.1"] for e in events)  # who tried, not in the key
    others = {(e["reason"], e["detail"], e["count"]) for e in events if e not in no_certs}
    assert others == {
        ("handshake_failed", "UNSUPPORTED_PROTOCOL", 1),  # TLS 1.2
        ("handshake_failed", "HTTP_REQUEST", 1),  # plain HTTP to the TLS port
    }
    assert 'harness_connections_refused_total{reason="no_client_certificate"} 10.0' in text
    assert 'harness_connections_refused_total{reason="handshake_failed"} 2.0' in text
    assert front.upstream.seen == []


def _peer_serial(front: Front, name: str = "client") -> int:
    from cryptography import x509

    host, port = front.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port))) as raw,
        front.ctx(name).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_server_certificate_rotation_keeps_open_streams(front: Front) -> None:
    before = _peer_serial(front)
    with (
        httpx.Client(verify=front.ctx(), timeout=20) as client,
        client.stream("POST", f"{front.url}/v1/chat/completions", json=CHAT) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "data: 1"
        # Rotate in place, as cert-manager or Vault Agent would.
        fresh = pki.server_cert(load_ca(front.pki_dir))
        fresh.write(front.pki_dir / "server.pem.new", front.pki_dir / "server-key.pem.new")
        os.replace(front.pki_dir / "server-key.pem.new", front.pki_dir / "server-key.pem")
        os.replace(front.pki_dir / "server.pem.new", front.pki_dir / "server.pem")
        time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)
        assert _peer_serial(front) == fresh.cert.serial_number != before  # new connections
        front.upstream.gate.set()
        rest = [line for line in lines if line]
    assert rest == ["data: 2", "data: [DONE]"]  # the stream opened before it was not cut
    assert any(e["outcome"] == "ok" for e in audit_events(front, "tls_reload"))


def test_client_ca_rotation_applies_to_new_connections(front: Front) -> None:
    new_ca = pki.make_ca("rotated client CA")
    pki.client_cert(new_ca, ALLOWED).write(front.pki_dir / "new.pem", front.pki_dir / "new-key.pem")
    # Clients keep verifying the server with the CA that issued its certificate.
    shutil.copy(front.pki_dir / "ca.pem", front.pki_dir / "server-ca.pem")
    ctx_new = client_context(
        front.pki_dir / "server-ca.pem", front.pki_dir / "new.pem", front.pki_dir / "new-key.pem"
    )
    ctx_old = client_context(
        front.pki_dir / "server-ca.pem",
        front.pki_dir / "client.pem",
        front.pki_dir / "client-key.pem",
    )
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=ctx_new) as client:
        client.get(f"{front.url}/v1/models")
    new_ca.write(front.pki_dir / "ca.pem.new")
    os.replace(front.pki_dir / "ca.pem.new", front.pki_dir / "ca.pem")
    time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)
    with httpx.Client(verify=ctx_new) as client:
        assert client.get(f"{front.url}/v1/models").status_code == 200
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=ctx_old) as client:
        client.get(f"{front.url}/v1/models")


def test_session_resumption_cannot_outlive_a_client_ca_rotation(front: Front) -> None:
    """A resumed TLS session skips the client certificate: the front issues no session
    tickets, so a client the rotated CA no longer trusts cannot get back in with one."""
    host, port = front.url.removeprefix("https://").split(":")
    ctx = front.ctx()

    def get(session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession | None, bool]:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_status(tls) == 200
            return tls.session, tls.session_reused

    session, _ = get()
    assert session is not None and not session.has_ticket
    _, reused = get(session)
    assert not reused  # every connection shows its certificate
    pki.make_ca("rotated client CA").write(front.pki_dir / "ca.pem.new")
    os.replace(front.pki_dir / "ca.pem.new", front.pki_dir / "ca.pem")
    time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(session)
    assert len(front.upstream.seen) == 2


def _keep_alive_requests(
    front: Front, ctx: ssl.SSLContext, between: Callable[[], None]
) -> list[tuple[int, bytes | None]]:
    """Two requests on one keep-alive connection, `between()` in between: each one's status
    and `connection` header, and whether the front closed the connection after the second."""
    host, port = front.url.removeprefix("https://").split(":")
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answers: list[tuple[int, bytes | None]] = []
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        for step in (None, between):
            if step is not None:
                step()
            tls.sendall(request)
            headers: dict[bytes, bytes] = {}
            answers.append((read_status(tls, headers), headers.get(b"connection")))
        assert tls.recv(1) == b""  # closed by the front after that last response
    return answers


def test_a_client_ca_rotation_ends_kept_alive_connections_after_one_request(
    front: Front,
) -> None:
    """An open connection was authenticated by the old client CA: after the rotation it gets
    one more response, marked `connection: close`; its client cannot come back."""

    def rotate() -> None:
        pki.make_ca("rotated client CA").write(front.pki_dir / "ca.pem.new")
        os.replace(front.pki_dir / "ca.pem.new", front.pki_dir / "ca.pem")
        time.sleep(RotatingContext.CHECK_EVERY_S + 0.2)

    assert _keep_alive_requests(front, front.ctx(), rotate) == [(200, None), (200, b"close")]
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=front.ctx()) as client:
        client.get(f"{front.url}/v1/models")
    assert len(front.upstream.seen) == 2


def test_an_expired_client_certificate_ends_its_kept_alive_connection(
    make_front: Callable[..., Front],
) -> None:
    import datetime as dt

    front = make_front(keepalive_timeout_s=30)
    now = dt.datetime.now(dt.UTC)
    expires = now.replace(microsecond=0) + dt.timedelta(seconds=3)
    pki.client_cert(
        load_ca(front.pki_dir), ALLOWED, not_before=now - dt.timedelta(minutes=1), not_after=expires
    ).write(front.pki_dir / "brief.pem", front.pki_dir / "brief-key.pem")

    def expire() -> None:
        time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)

    answers = _keep_alive_requests(front, front.ctx("brief"), expire)
    assert answers == [(200, None), (200, b"close")]
