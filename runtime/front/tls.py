"""The front's TLS: TLS 1.3 only, a client certificate from the configured CA required,
and the client's identity (a SAN) matched against an exact allowlist."""

from __future__ import annotations

import os
import ssl
import time
from typing import Any

from runtime import telemetry
from runtime.config import TLSSection
from runtime.errors import ConfigError


def server_context(tls: TLSSection) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # OpenSSL also checks the client certificate's EKU allows clientAuth.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No session tickets: a resumed session skips the client certificate, so a client whose
    # CA was rotated out (or whose certificate expired) would keep getting in for the ticket's
    # lifetime. Every connection is a full handshake; connections are kept alive, so they are
    # few.
    ctx.num_tickets = 0
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"front.tls.cert {tls.cert} / front.tls.key {tls.key}: cannot load: {exc}",
            fix="point them at a PEM certificate and its matching unencrypted private key",
        ) from exc
    try:
        ctx.load_verify_locations(cafile=tls.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"front.tls.client_ca {tls.client_ca}: cannot load: {exc}",
            fix="point it at the PEM CA certificate(s) that issue your clients' certificates",
        ) from exc
    return ctx


def peer_identities(peercert: dict[str, Any] | None) -> list[tuple[str, str]]:
    """SAN entries of a verified peer certificate, as ('URI'|'DNS'|'email', value)."""
    if not peercert:
        return []
    return [(kind, value) for kind, value in peercert.get("subjectAltName", ())]


# OpenSSL's reasons for what a client gets wrong, as event reasons. Anything else (TLS 1.2, not
# TLS at all, no shared cipher) is `handshake_failed`, with OpenSSL's reason as the detail.
_REASONS = {
    "CERTIFICATE_VERIFY_FAILED": "client_certificate_invalid",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
}


class Handshakes:
    """The TLS handshakes the front runs (server.TlsHandshake runs each one, so the client's
    address is known; an SSL object never knows it).

    - `in_progress`: connections accepted whose handshake has not ended (a gauge). Nobody is
      authenticated yet; `timeout_s` (front.handshake_timeout_s) bounds how long each may
      take, and `limit` (front.max_handshakes) how many there are: past it a new connection
      is closed as it is accepted. Each holds ~55 KiB; unbounded, only RLIMIT_NOFILE would
      stop a client that opens connections and stalls them.
    - Refused by OpenSSL: no client certificate, one that does not verify (unknown CA,
      expired, not yet valid, not for clientAuth), TLS 1.2, or not TLS at all.
    - Cut by the timeout, or refused past the limit.

    Each refused or cut handshake is counted; the `tls_handshake_rejected` events are limited
    to one per reason and detail per second, each with `count`, the handshakes it stands for,
    and `clients`, the first addresses among them, so that a scanner cannot flood the log. A
    TCP connect that closes before its handshake ends (the kubelet's probes) is none of these."""

    def __init__(self, timeout_s: float = 60.0, limit: int | None = None) -> None:
        self.events = telemetry.Throttled("tls_handshake_rejected", "blocked")
        # Both from the front's config (server.build_server); 60 s is uvloop's default.
        self.timeout_s = timeout_s
        self.limit = limit
        self.in_progress = 0

    def begin(self, client: str | None) -> bool:
        """A connection was accepted: may its handshake start?"""
        if self.limit is not None and self.in_progress >= self.limit:
            self.events.record(
                client,
                reason="too_many_handshakes",
                detail=f"{self.limit} handshakes in progress (front.max_handshakes)",
            )
            return False
        self.in_progress += 1
        return True

    def end(self) -> None:
        self.in_progress -= 1

    def failed(self, exc: ssl.SSLError, client: str | None) -> None:
        reason = _REASONS.get(exc.reason or "", "handshake_failed")
        detail = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
        self.events.record(client, reason=reason, detail=str(detail))

    def timed_out(self, client: str | None) -> None:
        self.events.record(
            client,
            reason="handshake_timeout",
            detail=f"no handshake within front.handshake_timeout_s ({self.timeout_s:g} s)",
        )


class RotatingContext:
    """The front's TLS material, re-read when its files change (Vault Agent or cert-manager
    rotate them in place, often through a symlink swap). New handshakes switch to the newest
    context from the ClientHello callback; established connections keep theirs, so open
    streams are not cut. A half-written or mismatched update keeps the previous material.
    `client_ca_generation` counts the client CA's changes: the front serves a connection
    authenticated under an older one no further than the request in hand."""

    CHECK_EVERY_S = 1.0

    def __init__(self, tls: TLSSection) -> None:
        self.tls = tls
        self.base = server_context(tls)  # handed to the server; never replaced
        self.current = self.base
        self.client_ca_generation = 0
        self._stamp = self._files_stamp()
        self._next_check = time.monotonic() + self.CHECK_EVERY_S
        self.base.sni_callback = self._on_client_hello
        self.handshakes = Handshakes()

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            stats = [os.stat(p) for p in (self.tls.cert, self.tls.key, self.tls.client_ca)]
        except OSError:
            return None  # mid-rotation: try again later
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)

    def reload_if_changed(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.CHECK_EVERY_S
        stamp = self._files_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            fresh = server_context(self.tls)
        except ConfigError as exc:
            telemetry.emit("tls_reload", "failed", error=exc.message)
            return  # keep serving with the previous material; retried on the next change
        fresh.sni_callback = self._on_client_hello
        if self._stamp is None or stamp[2] != self._stamp[2]:
            self.client_ca_generation += 1
        self.current, self._stamp = fresh, stamp
        telemetry.emit(
            "tls_reload", "ok", cert=str(self.tls.cert), client_ca=str(self.tls.client_ca)
        )

    def _on_client_hello(
        self, sslobj: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext
    ) -> None:
        self.reload_if_changed()
        if self.current is not ctx:
            sslobj.context = self.current
