"""OMS interoperability with the reference `model_signing` (1.1.1 here, and bundles as 1.0.x
wrote them): key material as rawBytes, a bundle checked with the wrong method, empty files and
small shard sizes under the `shards` serialization, the Sigstore bundle v0.2 media type, and
what a tampered signature tells the operator. Each case runs the reference for real, in both
directions where both sides can produce the thing."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from runtime.demo import pki
from runtime.errors import IntegrityError
from runtime.integrity import oms, signature
from tests.support import run_cli
from tests.support.signing import MODEL_SIGNING, keypair
from tests.support.sigstore_instance import TestSigstore

SIGNER = "ml-team@example.com"
ISSUER = "https://issuer.example"
EMPTY = "notes.txt"  # a kind of file the model-dir policy allows, and that may be empty


@pytest.fixture()
def model(clean_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(clean_model, copy)
    return copy


def _reference(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MODEL_SIGNING), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _reference_sign_key(model: Path, private: Path, sig: Path) -> None:
    made = _reference("sign", "key", model, "--private_key", private, "--signature", sig)
    assert made.returncode == 0, made.stdout + made.stderr


def _reference_verify_key(model: Path, sig: Path, public: Path) -> subprocess.CompletedProcess:
    return _reference("verify", "key", model, "--signature", sig, "--public_key", public)


def _reference_verify_shards(model: Path, sig: Path, public: Path) -> None:
    """model_signing's API, which reads the serialization from the signature (its 1.1.1 CLI
    always hashes whole files, so it verifies no shards signature). Raises on failure."""
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(model, sig)


def _reference_sign_shards(model: Path, private: Path, sig: Path, shard_size: int) -> None:
    from model_signing import hashing, signing

    config = signing.Config().use_elliptic_key_signer(private_key=private)
    config.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=shard_size))
    config.sign(model, sig)


def _statement(sig: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))


def _edit_bundle(sig: Path, edit: Callable[[dict], None]) -> None:
    bundle = json.loads(sig.read_text())
    edit(bundle)
    sig.write_text(json.dumps(bundle))


def _verify_key(model: Path, sig: Path, public: Path) -> signature.Result:
    return signature.verify_model(model, sig, signature.KeyTrust(public))


# -- 1. key material as rawBytes (model_signing <= 1.0.x) --------------------------------

# model-transparency's own v1.0.1 fixture (scripts/tests/v1.0.1-elliptic-key, Apache-2.0):
# written by model_signing 1.0.1, the key as base64 PEM in publicKey.rawBytes, no hint.
V1_0_1_BUNDLE = {
    "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
    "verificationMaterial": {
        "publicKey": {
            "rawBytes": (
                "LS0tLS1CRUdJTiBQVUJMSUMgS0VZLS0tLS0KTUhZd0VBWUhLb1pJemowQ0FRWUZLNEVFQUNJRFlnQUVzdTZy"
                "WkdCVGp4dHZSV1BNaXhUKzNIeW5kVjBKMFlidAphSFpVY080REVLK09KSE8vNGUzMmJiL2ZiSktTcFJnY0Jz"
                "SXBLTGNWaWpVb215Rk9FUmJkN3UrQlRQU1VqR1pEClFxNko3bFR2cC9FQVhRR09LeFc5UlAwTUdYM3FBa3Zp"
                "Ci0tLS0tRU5EIFBVQkxJQyBLRVktLS0tLQo="
            ),
            "keyDetails": "PKIX_ECDSA_P384_SHA_384",
        }
    },
    "dsseEnvelope": {
        "payload": (
            "ewogICJfdHlwZSI6ICJodHRwczovL2luLXRvdG8uaW8vU3RhdGVtZW50L3YxIiwKICAic3ViamVjdCI6IFsK"
            "ICAgIHsKICAgICAgIm5hbWUiOiAidjEuMC4xLWVsbGlwdGljLWtleSIsCiAgICAgICJkaWdlc3QiOiB7CiAg"
            "ICAgICAgInNoYTI1NiI6ICI5Mjc0NTExMGIxYWI0MzY4NDcxY2JlMzE2NjRlMTAxNzRlOTU0YjExM2EzZGYz"
            "MzNkYjg2MDMxN2IyYzZkZWM0IgogICAgICB9CiAgICB9CiAgXSwKICAicHJlZGljYXRlVHlwZSI6ICJodHRw"
            "czovL21vZGVsX3NpZ25pbmcvc2lnbmF0dXJlL3YxLjAiLAogICJwcmVkaWNhdGUiOiB7CiAgICAic2VyaWFs"
            "aXphdGlvbiI6IHsKICAgICAgIm1ldGhvZCI6ICJmaWxlcyIsCiAgICAgICJoYXNoX3R5cGUiOiAic2hhMjU2"
            "IiwKICAgICAgImFsbG93X3N5bWxpbmtzIjogZmFsc2UKICAgIH0sCiAgICAicmVzb3VyY2VzIjogWwogICAg"
            "ICB7CiAgICAgICAgImFsZ29yaXRobSI6ICJzaGEyNTYiLAogICAgICAgICJkaWdlc3QiOiAiYmM5YTcxN2Ri"
            "NjA2NGEzMmNiZTllYWU2ZmM0MDY1MWRkNmQzNmVmMTc1NzE4M2Y1OTBlZmYyYjE3NjVkN2ViYyIsCiAgICAg"
            "ICAgIm5hbWUiOiAic2lnbm1lLTEiCiAgICAgIH0sCiAgICAgIHsKICAgICAgICAiYWxnb3JpdGhtIjogInNo"
            "YTI1NiIsCiAgICAgICAgImRpZ2VzdCI6ICIzMmRjYjFmOGUxYWU1MmQ1OTYzZTU2YTZiYTA2YWI1OGI0MjRj"
            "MTVlZDJhNmI3MGQyZmVjYTFkMDg5MzcwMDI4IiwKICAgICAgICAibmFtZSI6ICJzaWdubWUtMiIKICAgICAg"
            "fQogICAgXQogIH0KfQ=="
        ),
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [
            {
                "sig": (
                    "MGUCMCY+xSOJ/caTdPTtCWQG+viwGMeGG4d1qXtwTRGreznTUjBoF6VLUkEj5GVD12gzMQIxAMJuAUgM4jpx"
                    "ys+lFerUvsUFUo4dwHenn280aUAbFSbHiK7casRq/MZw1M44l+/rYQ=="
                ),
                "keyid": None,
            }
        ],
    },
}
V1_0_1_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEsu6rZGBTjxtvRWPMixT+3HyndV0J0Ybt
aHZUcO4DEK+OJHO/4e32bb/fbJKSpRgcBsIpKLcVijUomyFOERbd7u+BTPSUjGZD
Qq6J7lTvp/EAXQGOKxW9RP0MGX3qAkvi
-----END PUBLIC KEY-----
"""
V1_0_1_FILES = {"signme-1": b"signme-1\n", "signme-2": b"signme-2"}


def test_model_signing_1_0_bundle_verifies_by_its_raw_key(tmp_path: Path) -> None:
    """The real 1.0.1 bundle: the reference accepts it, and so does harness, saying how."""
    folder = tmp_path / "v1.0.1-elliptic-key"
    folder.mkdir()
    for name, data in V1_0_1_FILES.items():
        (folder / name).write_bytes(data)
    sig, public = tmp_path / "model.sig", tmp_path / "signing-key-pub.pem"
    sig.write_text(json.dumps(V1_0_1_BUNDLE))
    public.write_bytes(V1_0_1_PUBLIC_KEY)
    checked = _reference_verify_key(folder, sig, public)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    bundle = oms.parse_bundle(sig.read_bytes())
    oms.check_method(bundle, "key")
    key = oms.load_public_key(V1_0_1_PUBLIC_KEY, "fixture")
    signer, match = oms.verify_with_key(bundle, key)
    assert (signer, match) == (f"key:sha256:{oms.key_hint(key)}", "raw_bytes")
    statement = oms.parse_statement(bundle.payload)
    oms.compare_manifest(
        statement.resources,
        {name: hashlib.sha256(data).hexdigest() for name, data in V1_0_1_FILES.items()},
    )


def _as_1_0(sig: Path, public: Path, encoding: serialization.Encoding) -> None:
    """Rewrite a 1.1.1 key bundle's verification material as 1.0.x wrote it (the DSSE
    signature does not cover verificationMaterial, so it stays valid)."""
    key = serialization.load_pem_public_key(public.read_bytes())
    raw = key.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
    _edit_bundle(
        sig,
        lambda b: b.update(
            verificationMaterial={
                "publicKey": {
                    "rawBytes": base64.b64encode(raw).decode(),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                }
            }
        ),
    )


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_raw_bytes_key_equal_to_the_configured_key_is_accepted(
    model: Path, tmp_path: Path, encoding: serialization.Encoding
) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "ms.sig"
    _reference_sign_key(model, private, sig)
    assert _verify_key(model, sig, public).key_match == "hint"
    _as_1_0(sig, public, encoding)
    checked = _reference_verify_key(model, sig, public)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # still valid to it
    result = _verify_key(model, sig, public)
    assert result.key_match == "raw_bytes"
    cli = run_cli("verify", str(model), "--signature", str(sig), "--public-key", str(public))
    assert cli.returncode == 0, cli.stderr
    assert "(key matched by publicKey.rawBytes)" in cli.stdout


def test_raw_bytes_key_of_another_signer_names_both_fingerprints(
    model: Path, tmp_path: Path
) -> None:
    private, public = keypair(tmp_path)
    _other_private, other_public = keypair(tmp_path, name="other")
    sig = tmp_path / "ms.sig"
    _reference_sign_key(model, private, sig)
    _as_1_0(sig, other_public, serialization.Encoding.DER)
    with pytest.raises(IntegrityError) as info:
        _verify_key(model, sig, public)
    ours = oms.key_hint(serialization.load_pem_public_key(public.read_bytes()))
    theirs = oms.key_hint(serialization.load_pem_public_key(other_public.read_bytes()))
    assert "signed with another key" in info.value.message
    assert f"sha256:{theirs}" in info.value.message and f"sha256:{ours}" in info.value.message
    assert "model.signature.public_key" in (info.value.fix or "")


@pytest.mark.parametrize(
    ("material", "needle"),
    [
        ({"publicKey": {}}, "neither a hint nor rawBytes"),
        ({"publicKey": {"rawBytes": base64.b64encode(b"junk").decode()}}, "not a PEM or DER"),
        ({"publicKey": {"rawBytes": "%%%"}}, "rawBytes is not valid base64"),
    ],
)
def test_unusable_key_material_is_refused(
    model: Path, tmp_path: Path, material: dict, needle: str
) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "model.sig"
    signature.sign_model(model, private, sig)
    _edit_bundle(sig, lambda b: b.update(verificationMaterial=material))
    with pytest.raises(IntegrityError, match=needle):
        _verify_key(model, sig, public)


# -- 2. a bundle checked with another method -----------------------------------------------


@pytest.fixture(scope="module")
def bundles(clean_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One model signed three ways: key and certificate by model_signing 1.1.1, keyless by
    the test Sigstore instance, with the trust each method needs."""
    tmp = tmp_path_factory.mktemp("bundles")
    private, public = keypair(tmp)
    key_sig = tmp / "key.sig"
    _reference_sign_key(clean_model, private, key_sig)
    ca = pki.make_ca("model signing CA", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(1))
    ca.write(tmp / "root.pem")
    leaf = pki.issue(
        ca, "signer", sans=[x509.RFC822Name(SIGNER)], eku=[ExtendedKeyUsageOID.CODE_SIGNING]
    )
    leaf.write(tmp / "leaf.pem", tmp / "leaf-key.pem")
    cert_sig = tmp / "certificate.sig"
    made = _reference(
        "sign",
        "certificate",
        clean_model,
        "--private_key",
        tmp / "leaf-key.pem",
        "--signing_certificate",
        tmp / "leaf.pem",
        "--certificate_chain",
        tmp / "root.pem",
        "--signature",
        cert_sig,
    )
    assert made.returncode == 0, made.stderr
    instance = TestSigstore(tmp / "sigstore", issuer=ISSUER)
    keyless = tmp / "keyless.sig"
    statement = base64.b64decode(json.loads(key_sig.read_text())["dsseEnvelope"]["payload"])
    keyless.write_bytes(instance.sign_dsse(statement, oms.PAYLOAD_TYPE, identity=SIGNER))
    return {
        "model": clean_model,
        "key": key_sig,
        "certificate": cert_sig,
        "sigstore": keyless,
        "trust": {
            "key": signature.KeyTrust(public),
            "certificate": signature.CertificateTrust((tmp / "root.pem",), (SIGNER,)),
            "sigstore": signature.SigstoreTrust(instance.trusted_root_path, (SIGNER,), ISSUER),
        },
    }


CARRIES = {
    "key": "carries a public key",
    "certificate": "carries an X.509 certificate chain",
    "sigstore": "carries a Sigstore certificate and transparency-log entry",
}


@pytest.mark.parametrize("signed", ["key", "certificate", "sigstore"])
@pytest.mark.parametrize("checked", ["key", "certificate", "sigstore"])
def test_a_bundle_checked_with_another_method_says_which_to_use(
    bundles: dict, signed: str, checked: str
) -> None:
    if signed == checked:
        result = signature.verify_model(
            bundles["model"], bundles[signed], bundles["trust"][checked]
        )
        assert result.method == checked
        return
    with pytest.raises(IntegrityError) as info:
        signature.verify_model(bundles["model"], bundles[signed], bundles["trust"][checked])
    message, fix = info.value.message, info.value.fix or ""
    assert CARRIES[signed] in message and f"the {checked!r} method" in message
    assert f'model.signature.method = "{signed}"' in fix
    assert "hint" not in message


def test_cli_names_the_method_of_a_certificate_bundle(bundles: dict) -> None:
    public = bundles["trust"]["key"].public_key
    result = run_cli(
        "verify",
        str(bundles["model"]),
        "--signature",
        str(bundles["certificate"]),
        "--public-key",
        str(public),
    )
    assert result.returncode == 3
    assert "carries an X.509 certificate chain" in result.stderr
    assert "--certificate-chain" in result.stderr


# -- 3. empty files under the shards serialization -----------------------------------------

SHARD = 1 << 20
SMALL = 1000  # model_signing accepts any positive shard size


def _with_empty_file(model: Path) -> Path:
    (model / EMPTY).write_bytes(b"")
    return model


def test_model_signing_shards_with_an_empty_file_verify_with_harness(
    model: Path, tmp_path: Path
) -> None:
    _with_empty_file(model)
    private, public = keypair(tmp_path)
    sig = tmp_path / "ms.sig"
    _reference_sign_shards(model, private, sig, SHARD)
    names = [r["name"] for r in _statement(sig)["predicate"]["resources"]]
    assert not any(name.startswith(EMPTY) for name in names)  # the reference lists no shard
    result = _verify_key(model, sig, public)
    assert result.unsigned_empty_files == (EMPTY,)
    assert EMPTY in result.verified.files and not any(EMPTY in k for k in result.verified.digests)


def test_an_empty_file_added_after_model_signing_shards_is_reported_not_refused(
    model: Path, tmp_path: Path
) -> None:
    """The documented limit: a model_signing shards signature records no empty file, so one
    added later cannot be told from one that was signed. It is reported, as the reference
    accepts it too."""
    private, public = keypair(tmp_path)
    sig = tmp_path / "ms.sig"
    _reference_sign_shards(model, private, sig, SHARD)
    _with_empty_file(model)
    assert _verify_key(model, sig, public).unsigned_empty_files == (EMPTY,)


@pytest.fixture()
def harness_shards(model: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model with an empty file, harness shards signature, public key)."""
    _with_empty_file(model)
    private, public = keypair(tmp_path)
    sig = tmp_path / "shards.sig"
    made = run_cli(
        "sign",
        str(model),
        "--private-key",
        str(private),
        "--signature",
        str(sig),
        "--shard-size",
        str(SHARD),
    )
    assert made.returncode == 0, made.stderr
    return model, sig, public


def test_harness_shards_with_an_empty_file_verify_with_model_signing(
    harness_shards: tuple[Path, Path, Path],
) -> None:
    model, sig, public = harness_shards
    _reference_verify_shards(model, sig, public)
    assert _statement(sig)["predicate"]["empty_files"] == [EMPTY]
    result = _verify_key(model, sig, public)
    assert result.unsigned_empty_files == () and EMPTY in result.verified.files


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda m: (m / "added.txt").write_bytes(b""),
            "added.txt is an empty file that is not in the signed manifest",
        ),
        (lambda m: (m / "sub").mkdir() or (m / "sub" / "x.md").write_bytes(b""), "sub/x.md"),
        (
            lambda m: (m / EMPTY).write_bytes(b"x"),
            f"{EMPTY} was signed as an empty file but now has 1 bytes",
        ),
        (lambda m: (m / EMPTY).unlink(), f"{EMPTY} is in the signed manifest but missing"),
    ],
    ids=["added", "added-in-a-folder", "filled", "removed"],
)
def test_empty_files_changed_after_harness_signed_shards_are_refused(
    harness_shards: tuple[Path, Path, Path], change: Callable[[Path], object], needle: str
) -> None:
    model, sig, public = harness_shards
    change(model)
    with pytest.raises(IntegrityError) as info:
        _verify_key(model, sig, public)
    assert needle in info.value.message and info.value.fix


def test_the_reference_accepts_an_empty_file_added_after_harness_signed(
    harness_shards: tuple[Path, Path, Path],
) -> None:
    """Pins the difference harness claims: model_signing cannot see it, harness refuses it
    (test above)."""
    model, sig, public = harness_shards
    (model / "added.txt").write_bytes(b"")
    _reference_verify_shards(model, sig, public)


def test_earlier_harness_shards_with_an_empty_range_still_verify(
    harness_shards: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Signatures harness wrote before it matched model_signing list 'name:0:0'."""
    model, sig, public = harness_shards
    statement = _statement(sig)
    predicate = statement["predicate"]
    del predicate["empty_files"]
    predicate["resources"].append(
        {
            "name": f"{EMPTY}:0:0",
            "digest": hashlib.sha256(b"").hexdigest(),
            "algorithm": f"sha256-sharded-{SHARD}",
        }
    )
    digests = {r["name"]: r["digest"] for r in predicate["resources"]}
    statement["subject"][0]["digest"]["sha256"] = oms.root_digest(digests)
    private = tmp_path / "k.pem"
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    sig.write_bytes(oms.sign_with_key(json.dumps(statement).encode(), key))  # type: ignore[arg-type]
    assert _verify_key(model, sig, public).unsigned_empty_files == ()
    (model / "added.txt").write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"added\.txt is an empty file that is not in the"):
        _verify_key(model, sig, public)


def test_files_serialization_with_an_empty_file_both_ways(model: Path, tmp_path: Path) -> None:
    _with_empty_file(model)
    private, public = keypair(tmp_path)
    ms_sig, h_sig = tmp_path / "ms.sig", tmp_path / "h.sig"
    _reference_sign_key(model, private, ms_sig)
    assert EMPTY in _verify_key(model, ms_sig, public).verified.digests
    signature.sign_model(model, private, h_sig)
    checked = _reference_verify_key(model, h_sig, public)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (model / "added.txt").write_bytes(b"")
    for sig in (ms_sig, h_sig):
        with pytest.raises(IntegrityError, match=r"added\.txt is not in the signed manifest"):
            _verify_key(model, sig, public)


# -- resource order ---------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [None, SMALL], ids=["files", "shards"])
def test_resource_order_and_subject_digest_match_model_signing(
    model: Path, tmp_path: Path, shard_size: int | None
) -> None:
    """model_signing orders resources by path components ('tokenizer/x' before
    'tokenizer.json', though '.' < '/') and shard offsets as numbers, and its subject digest
    follows that order."""
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "special.txt").write_text("x")
    private, public = keypair(tmp_path)
    ms_sig, h_sig = tmp_path / "ms.sig", tmp_path / "h.sig"
    if shard_size is None:
        _reference_sign_key(model, private, ms_sig)
    else:
        _reference_sign_shards(model, private, ms_sig, shard_size)
    assert (
        _verify_key(model, ms_sig, public).root_digest
        == (_statement(ms_sig)["subject"][0]["digest"]["sha256"])
    )
    digest = signature.sign_model(model, private, h_sig, shard_size=shard_size)
    ours, theirs = _statement(h_sig), _statement(ms_sig)
    assert [r["name"] for r in ours["predicate"]["resources"]] == [
        r["name"] for r in theirs["predicate"]["resources"]
    ]
    assert (
        digest == ours["subject"][0]["digest"]["sha256"] == theirs["subject"][0]["digest"]["sha256"]
    )
    if shard_size is None:
        checked = _reference_verify_key(model, h_sig, public)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    else:
        _reference_verify_shards(model, h_sig, public)


# -- 4. shard sizes -------------------------------------------------------------------------


def test_model_signing_small_shards_verify_with_harness(model: Path, tmp_path: Path) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "ms.sig"
    _reference_sign_shards(model, private, sig, SMALL)
    result = _verify_key(model, sig, public)
    weights = [k for k in result.verified.digests if k.startswith("model.safetensors:")]
    size = (model / "model.safetensors").stat().st_size
    assert len(weights) == -(-size // SMALL)


def test_harness_small_shards_verify_with_model_signing(model: Path, tmp_path: Path) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "h.sig"
    made = run_cli(
        "sign", str(model), "--private-key", str(private), "--signature", str(sig),
        "--shard-size", str(SMALL),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    _reference_verify_shards(model, sig, public)


@pytest.mark.parametrize("size", ["0", "-1", str((1 << 40) + 1)])
def test_harness_sign_refuses_a_shard_size_out_of_range(
    model: Path, tmp_path: Path, size: str
) -> None:
    private, _public = keypair(tmp_path)
    made = run_cli("sign", str(model), "--private-key", str(private), "--shard-size", size)
    assert made.returncode == 2
    assert f"--shard-size {size}: not a size from 1 byte to 1 TiB" in made.stderr


def test_harness_sign_refuses_a_shard_size_that_makes_too_many_shards(
    model: Path, tmp_path: Path
) -> None:
    private, _public = keypair(tmp_path)
    made = run_cli("sign", str(model), "--private-key", str(private), "--shard-size", "1")
    assert made.returncode == 2 and "more than 1000000" in made.stderr
    assert not (model / "model.sig").exists()


def test_a_resized_file_is_refused_before_hashing(model: Path, tmp_path: Path) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "ms.sig"
    _reference_sign_shards(model, private, sig, SMALL)
    signed_size = (model / "tokenizer.json").stat().st_size
    with (model / "tokenizer.json").open("a") as handle:
        handle.write(" " * 5000)  # still valid JSON
    hashed: list[int] = []
    with pytest.raises(IntegrityError) as info:
        signature.verify_model(
            model,
            sig,
            signature.KeyTrust(public),
            progress=lambda done, _n, _b: hashed.append(done),
        )
    assert info.value.message == (
        f"model dir: tokenizer.json is {signed_size + 5000} bytes, the signed manifest "
        f"covers {signed_size}"
    )
    assert hashed == []


def test_a_manifest_missing_a_shard_is_refused_before_hashing(model: Path, tmp_path: Path) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "h.sig"
    signature.sign_model(model, private, sig, shard_size=SHARD)
    statement = _statement(sig)
    resources = statement["predicate"]["resources"]
    resources[:] = [r for r in resources if r["name"] != f"model.safetensors:0:{SHARD}"]
    statement["subject"][0]["digest"]["sha256"] = oms.root_digest(
        {r["name"]: r["digest"] for r in resources}
    )
    key = serialization.load_pem_private_key((tmp_path / "k.pem").read_bytes(), None)
    sig.write_bytes(oms.sign_with_key(json.dumps(statement).encode(), key))  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=r"lists 6 shards of model\.safetensors, whose"):
        _verify_key(model, sig, public)


# -- 5. the Sigstore bundle v0.2 media type --------------------------------------------------

V0_2 = "application/vnd.dev.sigstore.bundle+json;version=0.2"


def _as_v0_2(sig: Path, *, drop_proof: bool = False) -> None:
    """A v0.3 keyless bundle rewritten as v0.2: the leaf as a one-certificate chain."""

    def edit(bundle: dict) -> None:
        material = bundle["verificationMaterial"]
        leaf = material.pop("certificate")
        material["x509CertificateChain"] = {"certificates": [leaf]}
        if drop_proof:
            del material["tlogEntries"][0]["inclusionProof"]
        bundle["mediaType"] = V0_2

    _edit_bundle(sig, edit)


def test_a_sigstore_v0_2_bundle_verifies_with_harness_and_model_signing(
    bundles: dict, tmp_path: Path
) -> None:
    sig = tmp_path / "v02.sig"
    shutil.copy(bundles["sigstore"], sig)
    _as_v0_2(sig)
    trust = bundles["trust"]["sigstore"]
    result = signature.verify_model(bundles["model"], sig, trust)
    assert result.signer == f"sigstore:{SIGNER} (issuer {ISSUER})"
    trust_config = trust.trust_config.with_name("trust_config.json")
    checked = _reference(
        "verify", "sigstore", bundles["model"], "--signature", sig, "--identity", SIGNER,
        "--identity_provider", ISSUER, "--trust_config", trust_config,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_sigstore_v0_2_bundle_is_not_taken_for_a_certificate_signature(
    bundles: dict, tmp_path: Path
) -> None:
    """Its leaf comes as a certificate chain, like a certificate bundle's; the log entry
    tells them apart."""
    sig = tmp_path / "v02.sig"
    shutil.copy(bundles["sigstore"], sig)
    _as_v0_2(sig)
    with pytest.raises(IntegrityError) as info:
        signature.verify_model(bundles["model"], sig, bundles["trust"]["certificate"])
    assert CARRIES["sigstore"] in info.value.message


def test_a_sigstore_v0_2_bundle_without_an_inclusion_proof_is_refused(
    bundles: dict, tmp_path: Path
) -> None:
    """What v0.2 requires is sigstore-python's to enforce: here, the inclusion proof."""
    sig = tmp_path / "v02.sig"
    shutil.copy(bundles["sigstore"], sig)
    _as_v0_2(sig, drop_proof=True)
    with pytest.raises(IntegrityError, match=r"(?s)not a Sigstore keyless bundle.*inclusionProof"):
        signature.verify_model(bundles["model"], sig, bundles["trust"]["sigstore"])


def test_key_bundle_with_the_v0_2_media_type_verifies(bundles: dict, tmp_path: Path) -> None:
    sig = tmp_path / "v02.sig"
    shutil.copy(bundles["key"], sig)
    _edit_bundle(sig, lambda b: b.update(mediaType=V0_2))
    assert signature.verify_model(bundles["model"], sig, bundles["trust"]["key"]).method == "key"


def test_a_v0_1_bundle_is_refused_naming_the_accepted_versions(
    bundles: dict, tmp_path: Path
) -> None:
    sig = tmp_path / "v01.sig"
    shutil.copy(bundles["key"], sig)
    _edit_bundle(
        sig, lambda b: b.update(mediaType="application/vnd.dev.sigstore.bundle+json;version=0.1")
    )
    with pytest.raises(IntegrityError, match=r"v0\.2 and v0\.3 are accepted"):
        signature.verify_model(bundles["model"], sig, bundles["trust"]["key"])


# -- what a failed signature tells the operator ------------------------------------------------


def _flip_payload(sig: Path) -> None:
    def edit(bundle: dict) -> None:
        payload = bytearray(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        payload[-3] ^= 0x01
        bundle["dsseEnvelope"]["payload"] = base64.b64encode(bytes(payload)).decode()

    _edit_bundle(sig, edit)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda m, s: _flip_payload(s), "the DSSE signature does not verify"),
        (lambda m, s: (m / "config.json").open("a").write(" "), "SHA-256 mismatch"),
    ],
    ids=["dsse", "digest"],
)
def test_tampering_is_reported_as_such_not_as_a_reason_to_sign_again(
    model: Path, tmp_path: Path, tamper: Callable[[Path, Path], object], needle: str
) -> None:
    private, public = keypair(tmp_path)
    sig = tmp_path / "model.sig"
    signature.sign_model(model, private, sig)
    tamper(model, sig)
    with pytest.raises(IntegrityError) as info:
        _verify_key(model, sig, public)
    fix = info.value.fix or ""
    assert needle in info.value.message
    assert "treat it as tampering" in fix and "model.signature.*" in fix
    assert "sign the model again" not in fix
