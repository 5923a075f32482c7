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


class RotatingContext:
    """The front's TLS material, re-read when its files change (Vault Agent or cert-manager
    rotate them in place, often through a symlink swap). New handshakes switch to the newest
    context from the ClientHello callback; established connections keep theirs, so open
    streams are not cut. A half-written or mismatched update keeps the previous material."""

    CHECK_EVERY_S = 1.0

    def __init__(self, tls: TLSSection) -> None:
        self.tls = tls
        self.base = server_context(tls)  # handed to the server; never replaced
        self.current = self.base
        self._stamp = self._files_stamp()
        self._next_check = time.monotonic() + self.CHECK_EVERY_S
        self.base.sni_callback = self._on_client_hello

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
