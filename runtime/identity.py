"""Identities are certificate SANs, compared exactly and by type: a URI entry (spiffe://...)
matches only a URI SAN, an email entry only an email SAN, anything else only a DNS SAN.
Shared by the front (client certificates) and weight signatures (signing certificates)."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509


def kind_of(identity: str) -> str:
    if "://" in identity:
        return "URI"
    if "@" in identity:
        return "email"
    return "DNS"


def match_identity(sans: Iterable[tuple[str, str]], allowed: Iterable[str]) -> str | None:
    """The first allowed identity among `sans` ('URI'|'DNS'|'email', value), or None."""
    present = set(sans)
    for identity in allowed:
        if (kind_of(identity), identity) in present:
            return identity
    return None


def certificate_sans(cert: x509.Certificate) -> list[tuple[str, str]]:
    """A certificate's SANs in the shape ssl.getpeercert() uses."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return (
        [("URI", v) for v in names.get_values_for_type(x509.UniformResourceIdentifier)]
        + [("email", v) for v in names.get_values_for_type(x509.RFC822Name)]
        + [("DNS", v) for v in names.get_values_for_type(x509.DNSName)]
    )
