"""A small, offline "test Sigstore instance": a Fulcio-like CA, a CT log and a Rekor log.

It writes a TrustedRoot (and a ClientTrustConfig around it) and issues Sigstore bundles v0.3
for DSSE envelopes that sigstore-python 4.5.1 verifies for real, with no network: the leaf has
an embedded SCT over its precertificate, and the log entry (kind dsse 0.0.1) carries both an
inclusion promise (SET) and an RFC 6962 inclusion proof whose checkpoint the Rekor key signs.
Every signature goes into this instance's own Merkle tree, so later bundles get real proofs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import secrets
import struct
from datetime import UTC, datetime, timedelta

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IN_TOTO = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
TRUST_CONFIG_MEDIA_TYPE = "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"
SIGNING_CONFIG_MEDIA_TYPE = "application/vnd.dev.sigstore.signingconfig.v0.2+json"
OIDC_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw UTF-8 bytes
OIDC_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
REKOR_ORIGIN = "rekor.test.example"  # the checkpoint signer name must not contain spaces
LEAF_LIFETIME = timedelta(minutes=10)  # Fulcio's short-lived certificates


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _der(tag: int, content: bytes) -> bytes:
    """A DER TLV (short or long form length)."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 6962 key/log ID: SHA-256 of the DER SubjectPublicKeyInfo (Rekor logID, CT log ID)."""
    return hashlib.sha256(_spki(key)).digest()


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the envelope signature covers."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


# RFC 6962 Merkle tree: leaf = H(0x00 || entry), node = H(0x01 || left || right).
def _leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)  # largest power of two strictly below n


def _root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return hashlib.sha256(b"\x01" + _root(leaves[:k]) + _root(leaves[k:])).digest()


def _audit_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """Sibling hashes from the leaf upwards (RFC 6962 section 2.1.1)."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*_audit_path(index, leaves[:k]), _root(leaves[k:])]
    return [*_audit_path(index - k, leaves[k:]), _root(leaves[:k])]


def _time_range(start: datetime) -> dict[str, str]:
    return {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _sha256(data: bytes) -> dict[str, str]:
    return {"algorithm": "sha256", "value": hashlib.sha256(data).hexdigest()}


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePublicKey,
    valid: tuple[datetime, datetime],
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.CertificateBuilder:
    """A certificate builder with SKI and AKI (cryptography's WebPKI policy, which sigstore's
    chain check uses, expects them) followed by `extensions` in order."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder


class TestSigstore:
    """An in-process Sigstore instance. `now` pins the signing time (default: the wall clock
    at each `sign_dsse`); a past `now` gives bundles whose leaf has expired since, as usual."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        tmp_dir: pathlib.Path,
        *,
        issuer: str = "https://issuer.example",
        now: datetime | None = None,
    ) -> None:
        self.issuer = issuer
        self.now = now
        start = (now or datetime.now(UTC)).replace(microsecond=0) - timedelta(days=1)
        self.root_key = ec.generate_private_key(ec.SECP384R1())  # Fulcio's CAs are P-384
        self.intermediate_key = ec.generate_private_key(ec.SECP384R1())
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_log_id = _key_id(self.rekor_key.public_key())
        self.ct_log_id = _key_id(self.ct_key.public_key())
        self._tree_id = secrets.randbelow(2**63)
        self._leaves: list[bytes] = []  # this instance's Rekor log (RFC 6962 leaf hashes)

        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigstore-test-root")])
        inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigstore-test-inter")])
        root_pub, inter_pub = self.root_key.public_key(), self.intermediate_key.public_key()
        valid = (start, start + timedelta(days=3650))
        ca = (_key_usage(ca=True), True)
        root_ext = [ca, (x509.BasicConstraints(ca=True, path_length=None), True)]
        inter_ext = [ca, (x509.BasicConstraints(ca=True, path_length=0), True)]
        root = _builder(root_name, root_name, root_pub, root_pub, valid, root_ext)
        inter = _builder(inter_name, root_name, inter_pub, root_pub, valid, inter_ext)
        self.root_cert = root.sign(self.root_key, hashes.SHA384())
        self.intermediate_cert = inter.sign(self.root_key, hashes.SHA384())

        # sigstore checks validFor.start against the *real* clock (even when verifying), so
        # it must not lie in the future however `now` is pinned.
        valid_for = _time_range(min(start, datetime.now(UTC) - timedelta(days=1)))

        def log(url: str, key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
            public_key = {
                "rawBytes": _b64(_spki(key.public_key())),
                "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                "validFor": valid_for,
            }
            log_id = {"keyId": _b64(_key_id(key.public_key()))}
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": public_key,
                "logId": log_id,
            }

        chain = [self.intermediate_cert, self.root_cert]  # issuing CA first, root last
        certificates = [
            {"rawBytes": _b64(c.public_bytes(serialization.Encoding.DER))} for c in chain
        ]
        trusted_root = {
            "mediaType": TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [log(f"https://{REKOR_ORIGIN}", self.rekor_key)],
            "certificateAuthorities": [
                {
                    "subject": {"organization": "sigstore.test", "commonName": "sigstore"},
                    "uri": "https://fulcio.test.example",
                    "certChain": {"certificates": certificates},
                    "validFor": valid_for,
                }
            ],
            "ctlogs": [log("https://ctfe.test.example", self.ct_key)],
            "timestampAuthorities": [],
        }
        # A signing config that sigstore's SigningConfig accepts (one CA, one Rekor v1 log);
        # verification never reads it and nothing here contacts these URLs.
        service = {"majorApiVersion": 1, "validFor": valid_for, "operator": "test"}
        trust_config = {
            "mediaType": TRUST_CONFIG_MEDIA_TYPE,
            "trustedRoot": trusted_root,
            "signingConfig": {
                "mediaType": SIGNING_CONFIG_MEDIA_TYPE,
                "caUrls": [{"url": "https://fulcio.test.example", **service}],
                "rekorTlogUrls": [{"url": f"https://{REKOR_ORIGIN}", **service}],
                "rekorTlogConfig": {"selector": "ANY"},
            },
        }
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.trusted_root_path = tmp_dir / "trusted_root.json"
        self.trusted_root_path.write_text(json.dumps(trusted_root, indent=2))
        self.client_trust_config_path = tmp_dir / "trust_config.json"
        self.client_trust_config_path.write_text(json.dumps(trust_config, indent=2))

    def _leaf(
        self, key: ec.EllipticCurvePrivateKey, identity: str, issuer: str, t: datetime
    ) -> x509.Certificate:
        """A Fulcio-style leaf: empty subject, critical SAN, OIDC issuer extensions, and an
        embedded SCT from this instance's CT log."""
        san: x509.GeneralName = x509.UniformResourceIdentifier(identity)
        if "@" in identity:
            san = x509.RFC822Name(identity)
        extensions = [
            (_key_usage(ca=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.SubjectAlternativeName([san]), True),  # critical: the subject is empty
            (x509.UnrecognizedExtension(OIDC_ISSUER_V1, issuer.encode()), False),
            (x509.UnrecognizedExtension(OIDC_ISSUER_V2, _der(0x0C, issuer.encode())), False),
        ]
        pub, issuer_pub = key.public_key(), self.intermediate_key.public_key()
        valid = (t, t + LEAF_LIFETIME)
        builder = _builder(
            x509.Name([]), self.intermediate_cert.subject, pub, issuer_pub, valid, extensions
        )
        # The SCT signs the precertificate TBS: the final TBS minus the SCT list extension,
        # so the SCT extension goes last and everything else stays byte-identical.
        tbs = builder.sign(self.intermediate_key, hashes.SHA384()).tbs_certificate_bytes
        ts_ms = int(t.timestamp()) * 1000  # whole seconds: sigstore re-derives ms via a float
        signed = (
            struct.pack(">BBQH", 0, 0, ts_ms, 1)  # v1, certificate_timestamp, time, precert_entry
            + _key_id(issuer_pub)  # issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + struct.pack(">H", 0)  # no CT extensions
        )
        sig = _sign(self.ct_key, signed)
        sct = struct.pack(">B32sQH", 0, self.ct_log_id, ts_ms, 0)  # v1, log id, time, no ext
        sct += struct.pack(">BBH", 4, 3, len(sig)) + sig  # sha256, ecdsa
        sct_list = struct.pack(">HH", len(sct) + 2, len(sct)) + sct
        sct_ext = x509.UnrecognizedExtension(SCT_LIST, _der(0x04, sct_list))
        leaf = builder.add_extension(sct_ext, False).sign(self.intermediate_key, hashes.SHA384())
        assert leaf.tbs_precertificate_bytes == tbs
        return leaf

    def sign_dsse(
        self,
        payload: bytes,
        payload_type: str,
        *,
        identity: str,
        issuer: str | None = None,
        tamper_integrated_time: bool = False,
    ) -> bytes:
        """A Sigstore bundle v0.3 (JSON bytes) for a DSSE envelope over `payload`."""
        t = (self.now or datetime.now(UTC)).replace(microsecond=0)
        key = ec.generate_private_key(ec.SECP256R1())  # ephemeral, as with Fulcio
        leaf = self._leaf(key, identity, issuer or self.issuer, t)
        sig = _sign(key, pae(payload_type, payload))
        envelope = {
            "payload": _b64(payload),
            "payloadType": payload_type,
            "signatures": [{"sig": _b64(sig), "keyid": ""}],
        }

        # The Rekor dsse 0.0.1 entry that verify_dsse compares with the bundle (envelopeHash is
        # opaque to verifiers: Rekor hashed the envelope as submitted).
        verifier = _b64(leaf.public_bytes(serialization.Encoding.PEM))
        spec = {
            "envelopeHash": _sha256(rfc8785.dumps(envelope)),
            "payloadHash": _sha256(payload),
            "signatures": [{"signature": _b64(sig), "verifier": verifier}],
        }
        body = rfc8785.dumps({"apiVersion": "0.0.1", "kind": "dsse", "spec": spec})
        index = len(self._leaves)
        self._leaves.append(_leaf_hash(body))
        size, root = len(self._leaves), _root(self._leaves)
        integrated_time = int(t.timestamp()) + 1  # inside the leaf's 10-minute validity

        # Inclusion promise (SET): Rekor signs canonical JSON of {body, integratedTime, logID,
        # logIndex}; sigstore uses integratedTime as the signing time only if the SET is there.
        promise = {
            "body": _b64(body),
            "integratedTime": integrated_time,
            "logID": self.rekor_log_id.hex(),
            "logIndex": index,
        }
        set_sig = _sign(self.rekor_key, rfc8785.dumps(promise))
        if tamper_integrated_time:
            integrated_time += 1  # still within the leaf's validity: only the SET breaks

        # Signed checkpoint (a signed note); sigstore matches the key hint against logID[:4].
        note = (
            f"{REKOR_ORIGIN} - {self._tree_id}\n{size}\n{_b64(root)}\n"
            f"Timestamp: {int(t.timestamp()) * 10**9}\n"
        )
        note_sig = _b64(self.rekor_log_id[:4] + _sign(self.rekor_key, note.encode()))
        checkpoint = f"{note}\n\u2014 {REKOR_ORIGIN} {note_sig}\n"

        entry = {
            "logIndex": str(index),
            "logId": {"keyId": _b64(self.rekor_log_id)},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"},
            "integratedTime": str(integrated_time),
            "inclusionPromise": {"signedEntryTimestamp": _b64(set_sig)},
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": _b64(root),
                "treeSize": str(size),
                "hashes": [_b64(h) for h in _audit_path(index, self._leaves)],
                "checkpoint": {"envelope": checkpoint},
            },
            "canonicalizedBody": _b64(body),
        }
        bundle = {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {
                "certificate": {"rawBytes": _b64(leaf.public_bytes(serialization.Encoding.DER))},
                "tlogEntries": [entry],
            },
            "dsseEnvelope": envelope,
        }
        return json.dumps(bundle, indent=2).encode()


if __name__ == "__main__":
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    ID, ISS = "ml-team@example.com", "https://issuer.example"
    tmp = pathlib.Path(tempfile.mkdtemp())
    home = tmp / "home"
    home.mkdir()
    # No cache writes (HOME/XDG point at an empty dir that must stay empty) and no network.
    os.environ.update(HOME=str(home), XDG_CACHE_HOME=str(home / "c"), XDG_DATA_HOME=str(home))

    def _no_network(*_args: object, **_kwargs: object) -> None:
        raise OSError("network disabled in the self-check")

    socket.socket.connect = _no_network  # type: ignore[method-assign]
    socket.create_connection = _no_network  # type: ignore[assignment]

    from sigstore.models import Bundle, ClientTrustConfig, TrustedRoot
    from sigstore.verify import Verifier, policy

    inst = TestSigstore(tmp / "a", issuer=ISS)
    statement = b'{"_type": "https://in-toto.io/Statement/v1", "subject": [], "predicate": {}}'

    def verify(
        bundle: bytes, root: pathlib.Path | None = None, identity: str = ID, issuer: str = ISS
    ) -> tuple[str, bytes]:
        trusted_root = TrustedRoot.from_file(str(root or inst.trusted_root_path))
        want = policy.Identity(identity=identity, issuer=issuer)
        return Verifier(trusted_root=trusted_root).verify_dsse(Bundle.from_json(bundle), want)

    for _ in range(5):  # tree sizes 1..5 exercise empty and non-empty audit paths
        assert verify(inst.sign_dsse(statement, IN_TOTO, identity=ID)) == (IN_TOTO, statement)
    uri_id = "https://github.com/org/repo/.github/workflows/sign.yml@refs/heads/main"
    uri_bundle = inst.sign_dsse(statement, IN_TOTO, identity=uri_id)
    assert verify(uri_bundle, identity=uri_id) == (IN_TOTO, statement)
    past = TestSigstore(tmp / "past", now=datetime.now(UTC) - timedelta(days=400))
    assert verify(past.sign_dsse(statement, IN_TOTO, identity=ID), past.trusted_root_path)
    config = ClientTrustConfig.from_json(inst.client_trust_config_path.read_text())
    assert config.trusted_root.get_fulcio_certs() and config.signing_config.get_tlogs()
    print("accepted: email and URI identities, tree sizes 1-6, a leaf that expired long ago")

    good = inst.sign_dsse(statement, IN_TOTO, identity=ID)
    tampered = inst.sign_dsse(statement, IN_TOTO, identity=ID, tamper_integrated_time=True)
    cases = {
        "wrong identity": lambda: verify(good, identity="someone@example.com"),
        "wrong issuer": lambda: verify(good, issuer="https://other.example"),
        "other instance's root": lambda: verify(good, TestSigstore(tmp / "b").trusted_root_path),
        "tampered integratedTime": lambda: verify(tampered),
    }
    for label, case in cases.items():
        try:
            case()
        except Exception as exc:  # sigstore raises VerificationError subclasses
            print(f"rejected {label}: {type(exc).__name__}: {exc}")
        else:
            raise AssertionError(f"accepted {label}")
    assert not any(home.rglob("*")), f"files written: {list(home.rglob('*'))}"
    print("no network used, nothing written under HOME / XDG dirs")

    # Bonus: model_signing 1.1.1 accepts an OMS statement re-signed by this instance.
    cli = str(pathlib.Path(sys.executable).with_name("model_signing"))
    model, key_pem, key_sig, sig = tmp / "model", tmp / "k.pem", tmp / "key.sig", tmp / "ms.sig"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(bytes(64))
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    private_key = ec.generate_private_key(ec.SECP256R1())
    key_pem.write_bytes(private_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    sign_args = ["sign", "key", model, "--private_key", key_pem, "--signature", key_sig]
    subprocess.run([cli, *sign_args], check=True, env=env)
    oms = base64.b64decode(json.loads(key_sig.read_text())["dsseEnvelope"]["payload"])
    sig.write_bytes(inst.sign_dsse(oms, IN_TOTO, identity=ID))
    trust = inst.client_trust_config_path
    verify_args = ["verify", "sigstore", model, "--signature", sig, "--trust_config", trust]
    who = ["--identity", ID, "--identity_provider", ISS]
    rc = subprocess.run([cli, *verify_args, *who], env=env).returncode
    print(f"model_signing verify sigstore exit code: {rc}")
    assert rc == 0
