"""The front's TLS: TLS 1.3 only, a client certificate from the configured CA required (and
fit for client authentication), and the client's identity (a SAN) matched against an exact
allowlist."""

from __future__ import annotations

import ctypes
import functools
import os
import ssl
import time
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from runtime import telemetry
from runtime.config import TLSSection
from runtime.errors import ConfigError

# Key exchange: the groups every TLS 1.3 client offers, and no others (OpenSSL 3.0's default
# list also has X448, P-521 and the FFDHE groups: more code reachable by anyone, no gain).
GROUPS = "X25519:P-256:P-384"


def server_context(tls: TLSSection) -> ssl.SSLContext:
    """The front's TLS context; the rotating material makes a new one on every change, so
    whatever must hold on every connection is set here."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # OpenSSL's purpose check refuses an EKU without clientAuth, but lets a certificate with
    # no EKU at all, or a CA certificate, through: client_certificate_unfit() finishes it.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No session tickets: a resumed session skips the client certificate, so a client whose
    # CA was rotated out (or whose certificate expired) would keep getting in for the ticket's
    # lifetime. Every connection is a full handshake; connections are kept alive, so they are
    # few.
    ctx.num_tickets = 0
    # HTTP/1.1 only. A client that offers only h2 gets no protocol rather than the
    # no_application_protocol alert: CPython's ALPN callback answers "no ack" and Python has
    # no other. Its HTTP/2 preface then meets the HTTP/1.1 parser, which refuses it.
    ctx.set_alpn_protocols(["http/1.1"])
    _set_groups(ctx, GROUPS)
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


# SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl with this command (ssl.h).
_SSL_CTRL_SET_GROUPS_LIST = 92
# What SSL_CTX_get_verify_mode says for each of Python's verify modes (CPython's _ssl.c).
_OPENSSL_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def _groups_error(why: str) -> ConfigError:
    return ConfigError(
        f"front TLS: cannot limit the key exchange groups to {GROUPS}: {why}",
        fix="run harness on the CPython and OpenSSL 3 of its image (CPython's ssl module "
        "as a shared _ssl extension linked to libssl)",
    )


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl that CPython's _ssl module is linked to. Symbols looked up through _ssl's
    own handle resolve in _ssl's dependencies, as its own calls do: the same library, so the
    same SSL_CTX layout, whatever other OpenSSL the process has loaded (cryptography's)."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    if path is None:
        raise _groups_error("CPython's _ssl module is built into the interpreter")
    lib = ctypes.CDLL(path)
    pointer, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    signatures: dict[str, tuple[list[Any], Any]] = {
        "SSL_CTX_ctrl": ([pointer, c_int, c_long, pointer], c_long),
        "SSL_CTX_get_verify_mode": ([pointer], c_int),
        "SSL_CTX_get_options": ([pointer], ctypes.c_uint64),
        "OpenSSL_version_num": ([], ctypes.c_ulong),
        "ERR_clear_error": ([], None),
    }
    for name, (argtypes, restype) in signatures.items():
        try:
            function = getattr(lib, name)
        except AttributeError as exc:
            raise _groups_error(f"{name} is not reachable from _ssl") from exc
        function.argtypes, function.restype = argtypes, restype
    version = lib.OpenSSL_version_num()
    if version != ssl.OPENSSL_VERSION_NUMBER:
        raise _groups_error(
            f"the libssl found ({version:#x}) is not the ssl module's "
            f"({ssl.OPENSSL_VERSION_NUMBER:#x})"
        )
    return lib


def _set_groups(ctx: ssl.SSLContext, groups: str, *, pointer: int | None = None) -> None:
    """SSL_CTX_set1_groups_list on the context's SSL_CTX: Python 3.11's ssl module sets one
    curve at most (set_ecdh_curve), and no X25519. The SSL_CTX pointer is the field right
    after PyObject_HEAD in CPython's PySSLContext (`pointer` overrides it, for the tests); it
    is used only once OpenSSL, asked through it, reports the verify mode and options that
    Python has set on this context."""
    lib = _libssl()
    if pointer is None:
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if (
        not pointer
        or lib.SSL_CTX_get_verify_mode(pointer) & 3 != _OPENSSL_VERIFY_MODES[ctx.verify_mode]
        or lib.SSL_CTX_get_options(pointer) != int(ctx.options) & (2**64 - 1)
    ):
        raise _groups_error("the SSL context's layout is not CPython's PySSLContext")
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        lib.ERR_clear_error()  # or the ssl module would report it with its next error
        raise _groups_error("OpenSSL refused the list")


# Fit for client authentication, beyond OpenSSL's purpose check: (reason, detail) when not.
# A client's certificate is the same on each of its connections: the verdict is kept for the
# last few certificates seen (their DER, ~1 KiB each), so a connection costs a dict lookup.
@functools.lru_cache(maxsize=64)
def client_certificate_unfit(der: bytes) -> tuple[str, str] | None:
    try:
        extensions = x509.load_der_x509_certificate(der).extensions
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except Exception:  # cryptography reads X.509 more strictly than OpenSSL: refuse, not crash
        return "client_certificate_invalid", "cryptography cannot parse it"
    if constraints is not None and constraints.ca:
        return "client_certificate_is_ca", "basicConstraints CA:TRUE"
    try:
        usages = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "client_certificate_not_for_client_auth", "no extendedKeyUsage extension"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "client_certificate_not_for_client_auth", "extendedKeyUsage without clientAuth"
    return None


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
      stop a client that opens connections and stalls them. `per_client`
      (front.max_handshakes_per_client) bounds those of one client address, so that one
      address cannot hold every slot and lock the others out.
    - Refused by OpenSSL: no client certificate, one that does not verify (unknown CA,
      expired, not yet valid, not for clientAuth), TLS 1.2, or not TLS at all.
    - Cut by the timeout, or refused past either limit.
    - Refused by the front right after OpenSSL accepted them (server.IdentityCheckingProtocol):
      a client certificate unfit for client authentication, or an identity not allowed.

    Each refused or cut handshake is counted; the `tls_handshake_rejected` events are limited
    to one per reason and detail per second, each with `count`, the handshakes it stands for,
    and `clients`, the first addresses among them, so that a scanner cannot flood the log. A
    TCP connect that closes before its handshake ends (the kubelet's probes) is none of these."""

    def __init__(
        self, timeout_s: float = 60.0, limit: int | None = None, per_client: int | None = None
    ) -> None:
        self.events = telemetry.Throttled("tls_handshake_rejected", "blocked")
        # From the front's config (server.build_server); 60 s is uvloop's default.
        self.timeout_s = timeout_s
        self.limit = limit
        self.per_client = per_client
        self.in_progress = 0
        # Handshakes in progress by client address. An address leaves it with its last one,
        # so it never has more entries than handshakes in progress.
        self.by_client: dict[str, int] = {}

    def begin(self, client: str | None) -> bool:
        """A connection was accepted: may its handshake start?"""
        if self.limit is not None and self.in_progress >= self.limit:
            self.events.record(
                client,
                reason="too_many_handshakes",
                detail=f"{self.limit} handshakes in progress (front.max_handshakes)",
            )
            return False
        if client is not None:
            held = self.by_client.get(client, 0)
            if self.per_client is not None and held >= self.per_client:
                self.events.record(
                    client,
                    reason="too_many_handshakes_from_client",
                    detail=f"{self.per_client} handshakes in progress from its address "
                    "(front.max_handshakes_per_client)",
                )
                return False
            self.by_client[client] = held + 1
        self.in_progress += 1
        return True

    def end(self, client: str | None) -> None:
        self.in_progress -= 1
        if client is not None:
            held = self.by_client.pop(client, 0)
            if held > 1:
                self.by_client[client] = held - 1

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
