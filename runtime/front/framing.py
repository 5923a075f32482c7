"""HTTP/1.1 framing rules the front enforces before a request reaches the app, on top of
what llhttp (uvicorn's httptools parser) refuses itself. Pure: the front's protocol
(server.py) hands these what the parser reports, and sends the refusal they return.

Why each rule: a request that two HTTP implementations could read differently (which `Host`,
which `Content-Length`, an absolute-form target routed by its path) is the
raw material of request smuggling and cache poisoning at the gateway in front; the rest bound
what one request can make the front parse and hold.
"""

from __future__ import annotations

import http
from dataclasses import dataclass, field
from typing import Any

import httptools

from runtime.front.limits import Rejected
from runtime.front.proxy import error_body

# Headers a request may carry once: with two, the gateway and the front may each believe a
# different one.
SINGLE_HEADERS = frozenset({b"host", b"content-length", b"content-type", b"transfer-encoding"})
# Any other name at most this often (thousands of `accept` headers were accepted and
# forwarded), and at most this many headers in all (each costs a parser callback).
MAX_SAME_HEADER = 8
MAX_HEADERS = 128
# A chunk-size line: the size in hex, its extensions and CRLF. Nothing the front serves uses
# extensions, and llhttp parses them without a limit of its own.
MAX_CHUNK_LINE_BYTES = 256
# Chunks (with data) in one body: each costs the front ~5 us of parser callbacks, so a 1 MiB
# body of one-byte chunks was ~5 s of its CPU; with this cap, ~20 ms. A 1 MiB body (the
# default max_body_bytes) still fits in chunks of 256 bytes, 64 MiB (the most) in 16 KiB.
MAX_CHUNKS = 4096
# HTTP versions the front speaks; 0.9 (no version) and 2.0 in an HTTP/1 request line are
# parsed by llhttp and were answered as HTTP/1.1.
VERSIONS = frozenset({"1.1", "1.0"})


@dataclass(frozen=True)
class Refusal:
    """A request refused by its framing: what the client is told, and the event's fields
    (`code` is its reason; `fields` hold only values from small fixed sets, as the event
    throttling requires)."""

    status: int
    code: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def response(self) -> bytes:
        """The whole response, the connection's last."""
        body = error_body(self.status, self.message, self.code)
        phrase = http.HTTPStatus(self.status).phrase
        return (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (self.status, phrase.encode(), len(body), body)
        )

    def rejected(self) -> Rejected:
        """The same refusal, for the app to answer (and log with its route)."""
        return Rejected(self.status, self.message, self.code)


UPGRADE = Refusal(400, "upgrade_not_supported", "Protocol upgrades are not served here")
TRAILERS = Refusal(400, "trailers_not_allowed", "Chunked request bodies may not carry trailers")
CHUNK_LINE_TOO_LONG = Refusal(
    400,
    "chunk_extension_too_long",
    f"A chunk-size line (its size and extensions) is longer than {MAX_CHUNK_LINE_BYTES} bytes; "
    "send chunks without extensions",
    {"limit_bytes": MAX_CHUNK_LINE_BYTES},
)
TOO_MANY_CHUNKS = Refusal(
    400,
    "too_many_chunks",
    f"The body has more than {MAX_CHUNKS} chunks; send larger chunks, or a Content-Length",
    {"limit": MAX_CHUNKS},
)
BAD_CHUNK_SIZE = Refusal(400, "malformed_body", "Malformed HTTP request: bad chunk size")


def head_too_large(limit: int) -> Refusal:
    return Refusal(
        431,
        "header_too_large",
        f"The request line and headers are larger than {limit} bytes; send fewer or shorter "
        "headers, or a shorter request target",
        {"limit_bytes": limit},
    )


def parser_refusal(exc: httptools.HttpParserError, in_body: bool) -> Refusal:
    """What llhttp refused: CL and TE together, a bad Transfer-Encoding, obs-fold, bare LF,
    NUL and other control bytes, unknown methods, an HTTP/2 preface, a bad chunk...
    (`in_body`: after part of the body was parsed). Its reason strings are constants, so
    they are safe as the event's `detail`."""
    detail = str(exc)[:120]
    if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ is not None:
        detail = f"{detail}: {type(exc.__context__).__name__}"  # raised in a parser callback
    if "PRI/Upgrade" in detail:  # `PRI * HTTP/2.0`: a client speaking HTTP/2 without ALPN
        return Refusal(505, "http2_preface", "HTTP/2 is not served here: use HTTP/1.1")
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return Refusal(501, "unknown_method", "Unknown request method")
    if "HTTP version" in detail:  # HTTP/1.2, HTTP/3.0...
        return _version_refusal(detail)
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return Refusal(400, "invalid_target", "Invalid request target", {"detail": detail})
    code = "malformed_body" if in_body else "malformed_request"
    return Refusal(400, code, f"Malformed HTTP request: {detail}", {"detail": detail})


def _version_refusal(detail: str) -> Refusal:
    return Refusal(
        505,
        "http_version_not_supported",
        "Only HTTP/1.1 and HTTP/1.0 are served here",
        {"detail": detail},
    )


def chunk_size(line: bytes) -> int | None:
    """The size on a chunk-size line llhttp has accepted (hex digits, then `;` extensions)."""
    try:
        return int(line.split(b";", 1)[0].strip(b"\r\n"), 16)
    except ValueError:
        return None


class Head:
    """One request head, as its headers arrive: counts, and what the checks need."""

    __slots__ = ("body_bytes", "chunked", "counts", "has_host", "total")

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}
        self.total = 0
        self.has_host = False
        self.body_bytes = 0  # Content-Length
        self.chunked = False  # a Transfer-Encoding (llhttp accepts only one ending in chunked)

    def add(self, name: bytes, value: bytes) -> Refusal | None:
        """`name` lowercased."""
        self.total += 1
        if self.total > MAX_HEADERS:
            return Refusal(
                431,
                "too_many_headers",
                f"More than {MAX_HEADERS} request headers",
                {"limit": MAX_HEADERS},
            )
        seen = self.counts[name] = self.counts.get(name, 0) + 1
        if name in SINGLE_HEADERS:
            if seen > 1:
                text = name.decode()
                return Refusal(400, "repeated_header", f"{text} may appear once", {"header": text})
            if name == b"host":
                self.has_host = True
            elif name == b"content-length":
                self.body_bytes = int(value) if value.strip().isdigit() else 0
            elif name == b"transfer-encoding":
                self.chunked = True
        elif seen > MAX_SAME_HEADER:  # the name is the client's: not an event field
            return Refusal(
                400,
                "repeated_header",
                f"A header name appears more than {MAX_SAME_HEADER} times",
                {"limit": MAX_SAME_HEADER},
            )
        return None

    def check(self, version: str, target: bytes, upgrade: bool) -> Refusal | None:
        """The whole head, before the app sees it."""
        if version not in VERSIONS:
            return _version_refusal(f"HTTP/{version}")
        # Origin form only (`/path?query`): an absolute-form target was routed by its path
        # whatever its host, and `*` or an authority (CONNECT) names no route.
        if not target.startswith(b"/"):
            if b"://" in target:
                return Refusal(
                    400, "absolute_form_target", "The request target must be a path, not a URL"
                )
            return Refusal(400, "invalid_target", "The request target must be a path")
        if upgrade:  # `Connection: upgrade` with `Upgrade` (h2c, websocket): none is served
            return UPGRADE
        if version == "1.1" and not self.has_host:  # RFC 9112 section 3.2: a 400
            return Refusal(400, "missing_host", "An HTTP/1.1 request needs a Host header")
        return None
