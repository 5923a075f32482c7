from __future__ import annotations

from runtime.front.tls import peer_identities
from runtime.identity import match_identity

SPIFFE = "spiffe://cluster.local/ns/gw/sa/gateway"


def test_exact_match_by_san_type() -> None:
    assert match_identity([("URI", SPIFFE)], [SPIFFE]) == SPIFFE
    assert match_identity([("DNS", "gw.example")], ["gw.example"]) == "gw.example"
    assert match_identity([("email", "gw@example.com")], ["gw@example.com"]) == "gw@example.com"


def test_no_prefix_case_or_type_confusion() -> None:
    assert match_identity([("URI", SPIFFE + "x")], [SPIFFE]) is None
    assert match_identity([("URI", SPIFFE.upper())], [SPIFFE]) is None
    assert match_identity([("DNS", SPIFFE)], [SPIFFE]) is None  # a DNS SAN is not a URI
    assert match_identity([("URI", "gw.example")], ["gw.example"]) is None
    assert match_identity([], [SPIFFE]) is None


def test_peer_identities_reads_getpeercert_shape() -> None:
    cert = {"subject": ((("commonName", SPIFFE),),), "subjectAltName": (("URI", SPIFFE),)}
    assert peer_identities(cert) == [("URI", SPIFFE)]
    assert peer_identities(None) == []
    # The subject CN is never an identity.
    assert peer_identities({"subject": ((("commonName", SPIFFE),),)}) == []
