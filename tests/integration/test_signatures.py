"""OMS v1.0 signatures, `key` method: interoperable with the reference `model_signing` 1.1.1
in both directions, and stricter than it. Hostile cases are refused with exit 3."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runtime.errors import IntegrityError
from runtime.integrity import oms, signature
from tests.support import run_cli
from tests.support.signing import MODEL_SIGNING, keypair


@pytest.fixture()
def signed(clean_model: Path, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(model dir, signature outside it, private key, public key), signed by harness."""
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    private, public = keypair(tmp_path)
    sig = tmp_path / "model.sig"
    signature.sign_model(model, private, sig)
    return model, sig, private, public


def _verify(model: Path, sig: Path, public: Path) -> signature.Result:
    return signature.verify_model(model, sig, signature.KeyTrust(public))


# -- interoperability -------------------------------------------------------------------


def test_model_signing_signature_verifies_with_harness(clean_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    private, public = keypair(tmp_path)
    sig = tmp_path / "ms.sig"
    made = subprocess.run(
        [
            str(MODEL_SIGNING),
            "sign",
            "key",
            str(model),
            "--private_key",
            str(private),
            "--signature",
            str(sig),
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    result = run_cli(
        "verify", str(model), "--signature", str(sig), "--public-key", str(public), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    statement = json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))
    assert report["root_digest"] == statement["subject"][0]["digest"]["sha256"]
    assert sorted(report["files"]) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize(
    "curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=["P-256", "P-384", "P-521"]
)
@pytest.mark.parametrize("inside", [True, False], ids=["sig-inside", "sig-outside"])
def test_harness_signature_verifies_with_model_signing(
    clean_model: Path, tmp_path: Path, curve: ec.EllipticCurve, inside: bool
) -> None:
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    private, public = keypair(tmp_path, curve)
    args = ["sign", str(model), "--private-key", str(private)]
    sig = model / "model.sig" if inside else tmp_path / "out.sig"
    if not inside:
        args += ["--signature", str(sig)]
    made = run_cli(*args)
    assert made.returncode == 0, made.stderr
    assert sig.is_file()
    checked = subprocess.run(
        [
            str(MODEL_SIGNING),
            "verify",
            "key",
            str(model),
            "--signature",
            str(sig),
            "--public_key",
            str(public),
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert _verify(model, sig, public).verified.excluded == (
        frozenset({"model.sig"}) if inside else frozenset()
    )


def test_harness_refuses_to_sign_an_unacceptable_model(clean_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    (model / "extra.bin").write_bytes(b"\x80")
    private, _ = keypair(tmp_path)
    result = run_cli("sign", str(model), "--private-key", str(private))
    assert result.returncode == 3 and "extra.bin: refused" in result.stderr
    assert not (model / "model.sig").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("sign", str(empty), "--private-key", str(private))
    assert result.returncode == 3 and "empty model is refused" in result.stderr


# -- hostile cases ----------------------------------------------------------------------


def _resign(sig: Path, private: Path, edit: Callable[[dict], None]) -> None:
    """Re-sign an edited statement with the right key: only the statement checks can catch it."""
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    edit(statement)
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    sig.write_bytes(oms.sign_with_key(json.dumps(statement).encode(), key))  # type: ignore[arg-type]


def _flip_bit(model: Path) -> None:
    with (model / "model.safetensors").open("r+b") as handle:
        handle.seek(-100, os.SEEK_END)
        byte = handle.read(1)[0]
        handle.seek(-100, os.SEEK_END)
        handle.write(bytes([byte ^ 0x01]))


def _tamper_payload(sig: Path) -> None:
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))


def _forge_hint(sig: Path, public: Path) -> None:
    """Signed by another key, but claiming to be ours."""
    bundle = json.loads(sig.read_text())
    key = serialization.load_pem_public_key(public.read_bytes())
    bundle["verificationMaterial"]["publicKey"]["hint"] = oms.key_hint(key)  # type: ignore[arg-type]
    sig.write_text(json.dumps(bundle))


def _replace_public_key(public: Path) -> None:
    keypair(public.parent, name=public.stem)  # a new pair over the configured one


def _sign_with_other_key_and_forge_hint(model: Path, sig: Path, public: Path) -> None:
    other, _ = keypair(sig.parent, name="other")
    signature.sign_model(model, other, sig)
    _forge_hint(sig, public)


def _rename(model: Path) -> None:
    os.rename(model / "tokenizer.json", model / "tokenizer2.json")


HOSTILE: dict[str, tuple[Callable[[Path, Path, Path, Path], None], str]] = {
    "one flipped bit": (lambda m, s, k, p: _flip_bit(m), "model.safetensors: SHA-256 mismatch"),
    "extra file": (
        lambda m, s, k, p: (m / "notes.txt").write_text("x"),
        "notes.txt is not in the signed manifest",
    ),
    "missing file": (
        lambda m, s, k, p: (m / "tokenizer.json").unlink(),
        "tokenizer.json is in the signed manifest but missing",
    ),
    "renamed file": (
        lambda m, s, k, p: _rename(m),
        "tokenizer2.json is not in the signed manifest",
    ),
    "appended bytes to a JSON": (
        lambda m, s, k, p: (m / "config.json").open("a").write(" "),
        "config.json: SHA-256 mismatch",
    ),
    "wrong key": (lambda m, s, k, p: _replace_public_key(p), "signed with another key"),
    "forged key hint": (
        lambda m, s, k, p: _sign_with_other_key_and_forge_hint(m, s, p),
        "does not verify with the configured public key",
    ),
    "tampered DSSE payload": (lambda m, s, k, p: _tamper_payload(s), "does not verify"),
    "tampered subject digest": (
        lambda m, s, k, p: _resign(
            s, k, lambda st: st["subject"][0]["digest"].update(sha256="1" * 64)
        ),
        "subject digest",
    ),
    "../ resource name": (
        lambda m, s, k, p: _resign(
            s, k, lambda st: st["predicate"]["resources"][0].update(name="../etc/passwd")
        ),
        "is not a plain relative path",
    ),
    "absolute resource name": (
        lambda m, s, k, p: _resign(
            s, k, lambda st: st["predicate"]["resources"][0].update(name="/etc/passwd")
        ),
        "is not a plain relative path",
    ),
    "duplicate resource": (
        lambda m, s, k, p: _resign(
            s, k, lambda st: st["predicate"]["resources"].append(st["predicate"]["resources"][0])
        ),
        "listed twice",
    ),
    "empty manifest": (
        lambda m, s, k, p: _resign(s, k, lambda st: st["predicate"].update(resources=[])),
        "lists no files",
    ),
    "unknown serialization method": (
        lambda m, s, k, p: _resign(
            s, k, lambda st: st["predicate"]["serialization"].update(method="digests")
        ),
        "'digests' is not supported",
    ),
    "shards without a shard size": (
        lambda m, s, k, p: _resign(
            s, k, lambda st: st["predicate"]["serialization"].update(method="shards")
        ),
        "shard_size None is not a whole number",
    ),
    "empty_files outside shards": (
        lambda m, s, k, p: _resign(s, k, lambda st: st["predicate"].update(empty_files=[])),
        "only used with the shards serialization",
    ),
    "other predicate": (
        lambda m, s, k, p: _resign(s, k, lambda st: st.update(predicateType="x")),
        "predicateType",
    ),
    "not JSON": (lambda m, s, k, p: s.write_text("not json"), "not JSON"),
    "two signatures": (
        lambda m, s, k, p: s.write_text(
            json.dumps(
                {
                    **json.loads(s.read_text()),
                    "dsseEnvelope": {
                        **json.loads(s.read_text())["dsseEnvelope"],
                        "signatures": json.loads(s.read_text())["dsseEnvelope"]["signatures"] * 2,
                    },
                }
            )
        ),
        "exactly one signature",
    ),
    "missing signature file": (lambda m, s, k, p: s.unlink(), "cannot read"),
    "RSA public key": (
        lambda m, s, k, p: p.write_bytes(
            rsa.generate_private_key(65537, 2048)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ),
        "not an ECDSA key",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_signature_cases_are_refused(
    signed: tuple[Path, Path, Path, Path], case: str
) -> None:
    model, sig, private, public = signed
    mutate, needle = HOSTILE[case]
    mutate(model, sig, private, public)
    with pytest.raises(IntegrityError) as info:
        _verify(model, sig, public)
    assert needle in info.value.message, info.value.message
    assert info.value.exit_code == 3 and info.value.fix


def test_digest_mismatch_names_the_file_and_both_digests_in_hex(
    signed: tuple[Path, Path, Path, Path],
) -> None:
    model, sig, _private, public = signed
    signed_digest = _verify(model, sig, public).verified.digests["model.safetensors"]
    _flip_bit(model)
    result = run_cli("verify", str(model), "--signature", str(sig), "--public-key", str(public))
    assert result.returncode == 3
    line = next(x for x in result.stderr.splitlines() if "SHA-256 mismatch" in x)
    assert f"signed {signed_digest}, actual " in line
    actual = line.rsplit("actual ", 1)[1]
    assert len(actual) == 64 and actual != signed_digest and "fix:" in result.stderr


def test_pae_matches_the_dsse_spec() -> None:
    assert oms.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


# -- the shards serialization ----------------------------------------------------------

SHARD = 1 << 20


def test_model_signing_shards_signature_verifies_with_harness(
    clean_model: Path, tmp_path: Path
) -> None:
    from model_signing import hashing, signing

    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    private, public = keypair(tmp_path)
    sig = tmp_path / "shards.sig"
    config = signing.Config().use_elliptic_key_signer(private_key=private)
    config.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=SHARD))
    config.sign(model, sig)
    result = _verify(model, sig, public)
    weights = sorted(k for k in result.verified.digests if k.startswith("model.safetensors:"))
    assert len(weights) == 7 and weights[0] == f"model.safetensors:0:{SHARD}"


def test_harness_shards_signature_verifies_with_model_signing(
    clean_model: Path, tmp_path: Path
) -> None:
    from model_signing import hashing, verifying

    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
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
    config = verifying.Config().use_elliptic_key_verifier(public_key=public)
    config.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=SHARD))
    config.verify(model, sig)  # raises on failure
    _flip_bit(model)
    with pytest.raises(IntegrityError) as info:
        _verify(model, sig, public)
    assert "model.safetensors:6291456:6298" in info.value.message  # the last shard, named
    assert "SHA-256 mismatch" in info.value.message


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda st: st["predicate"]["serialization"].update(shard_size=1000.5),
            "not a whole number",
        ),
        (
            lambda st: st["predicate"]["serialization"].update(shard_size=0),
            "shard_size 0 is not a whole number of bytes from 1 to 1099511627776 (1 TiB)",
        ),
        (
            lambda st: st["predicate"].update(empty_files=["../x"]),
            "empty_files is not a list of plain relative paths",
        ),
        (
            lambda st: st["predicate"].update(empty_files=["a.txt", "a.txt"]),
            "empty_files lists a file twice",
        ),
        (
            lambda st: st["predicate"].update(empty_files=["config.json"]),
            "config.json is recorded as an empty file and also has shards",
        ),
        (
            lambda st: st["predicate"]["resources"][0].update(name="config.json:1:2"),
            "is not a plain relative path",
        ),
        (
            lambda st: st["predicate"]["resources"][0].update(name="../x:0:10"),
            "is not a plain relative path",
        ),
        (
            lambda st: st["predicate"]["resources"][0].update(algorithm="sha256"),
            "expected a sha256-sharded-1048576 hex digest",
        ),
    ],
)
def test_hostile_shard_statements_are_refused(
    clean_model: Path, tmp_path: Path, edit: Callable[[dict], None], needle: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    private, public = keypair(tmp_path)
    sig = tmp_path / "shards.sig"
    signature.sign_model(model, private, sig, shard_size=SHARD)
    _resign(sig, private, edit)
    with pytest.raises(IntegrityError) as info:
        _verify(model, sig, public)
    assert needle in info.value.message
