"""The front's TLS: TLS 1.3 only, a client certificate from the configured CA required,
and the client's identity (a SAN) matched against an exact allowlist."""

from __future__ import annotations

import ssl
from typing import Any

from runtime.config import TLSSection
from runtime.errors import ConfigError
from runtime.identity import match_identity

__all__ = ["match_identity", "peer_identities", "server_context"]


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
