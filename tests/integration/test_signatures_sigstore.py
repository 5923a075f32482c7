"""OMS v1.0 signatures, `sigstore` (keyless) method, verified offline against a pinned trust
root. No public Sigstore is reachable here, so the tests build their own small instance
(tests/support/sigstore_instance.py: a Fulcio-like CA, a CT log key, a Rekor key with a signed
checkpoint and inclusion proof) and sigstore-python verifies its bundles for real."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import IntegrityError
from runtime.integrity import signature
from tests.support import REPO
from tests.support.sigstore_instance import TestSigstore

IDENTITY = "ml-team@example.com"
ISSUER = "https://issuer.example"


@pytest.fixture()
def keyless(clean_model: Path, tmp_path: Path) -> dict:
    """A model, a key signature of it (for its statement), and the same statement signed
    keyless by the test Sigstore instance."""
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    key_sig = tmp_path / "key.sig"
    from cryptography.hazmat.primitives.asymmetric import ec

    from runtime.demo.pki import write_private_key

    write_private_key(ec.generate_private_key(ec.SECP256R1()), tmp_path / "k.pem")
    signature.sign_model(model, tmp_path / "k.pem", key_sig)
    statement = base64.b64decode(json.loads(key_sig.read_text())["dsseEnvelope"]["payload"])
    instance = TestSigstore(tmp_path / "sigstore", issuer=ISSUER)
    sig = tmp_path / "keyless.sig"
    sig.write_bytes(
        instance.sign_dsse(statement, "application/vnd.in-toto+json", identity=IDENTITY)
    )
    return {
        "model": model,
        "sig": sig,
        "instance": instance,
        "statement": statement,
        "tmp": tmp_path,
    }


def _verify(
    k: dict, *, identity: str = IDENTITY, issuer: str = ISSUER, root: Path | None = None
) -> signature.Result:
    trust = signature.SigstoreTrust(root or k["instance"].trusted_root_path, (identity,), issuer)
    return signature.verify_model(k["model"], k["sig"], trust)


def test_keyless_signature_verifies_offline(keyless: dict) -> None:
    result = _verify(keyless)
    assert result.method == "sigstore"
    assert result.signer == f"sigstore:{IDENTITY} (issuer {ISSUER})"
    assert len(result.verified.files) == 4


def test_cli_and_client_trust_config(keyless: dict) -> None:
    for root in (
        keyless["instance"].trusted_root_path,
        keyless["instance"].client_trust_config_path,
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "runtime",
                "verify",
                str(keyless["model"]),
                "--signature",
                str(keyless["sig"]),
                "--sigstore-identity",
                IDENTITY,
                "--sigstore-issuer",
                ISSUER,
                "--trust-config",
                str(root),
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["method"] == "sigstore"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"identity": "someone@example.com"}, "Sigstore verification failed"),
        ({"issuer": "https://other-issuer.example"}, "Sigstore verification failed"),
        ({"other_root": True}, "Sigstore verification failed"),
    ],
)
def test_wrong_identity_issuer_or_root_is_refused(keyless: dict, change: dict, needle: str) -> None:
    kwargs = {k: v for k, v in change.items() if k != "other_root"}
    if change.get("other_root"):
        kwargs["root"] = TestSigstore(keyless["tmp"] / "other", issuer=ISSUER).trusted_root_path
    with pytest.raises(IntegrityError) as info:
        _verify(keyless, **kwargs)
    assert needle in info.value.message and info.value.exit_code == 3


def test_tampered_log_time_is_refused(keyless: dict) -> None:
    keyless["sig"].write_bytes(
        keyless["instance"].sign_dsse(
            keyless["statement"],
            "application/vnd.in-toto+json",
            identity=IDENTITY,
            tamper_integrated_time=True,
        )
    )
    with pytest.raises(IntegrityError, match="Sigstore verification failed"):
        _verify(keyless)


def test_tampered_weights_fail_after_a_valid_keyless_signature(keyless: dict) -> None:
    with (keyless["model"] / "config.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(IntegrityError, match=r"config\.json: SHA-256 mismatch"):
        _verify(keyless)


def test_bad_trust_config_is_a_clear_error(keyless: dict) -> None:
    bad = keyless["tmp"] / "bad.json"
    bad.write_text('{"mediaType": "nope"}')
    with pytest.raises(IntegrityError, match="not a Sigstore trusted root"):
        _verify(keyless, root=bad)


def test_the_reference_tool_agrees(keyless: dict) -> None:
    """model_signing 1.1.1 verifies the same keyless bundle offline with the same trust root."""
    ms = Path(sys.executable).parent / "model_signing"
    result = subprocess.run(
        [
            str(ms),
            "verify",
            "sigstore",
            str(keyless["model"]),
            "--signature",
            str(keyless["sig"]),
            "--identity",
            IDENTITY,
            "--identity_provider",
            ISSUER,
            "--trust_config",
            str(keyless["instance"].client_trust_config_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_config_with_the_sigstore_method(keyless: dict, tmp_path: Path) -> None:
    from runtime.demo import assets

    demo = tmp_path / "demo"
    assets.ensure(demo)
    shutil.rmtree(demo / "model")
    shutil.copytree(keyless["model"], demo / "model")
    config = demo / assets.CONFIG_NAME
    config.write_text(
        config.read_text().replace(
            'path = "model.sig"\nmethod = "key"\npublic_key = "signing-key.pub"\n',
            f'path = "{keyless["sig"]}"\nmethod = "sigstore"\n'
            f'trust_config = "{keyless["instance"].trusted_root_path}"\n'
            f'issuer = "{ISSUER}"\nidentities = ["{IDENTITY}"]\n',
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "check", "--config", str(config), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    weights = json.loads(result.stdout)["controls"]["weight_integrity"]
    assert weights["method"] == "sigstore"
    assert weights["signer"] == f"sigstore:{IDENTITY} (issuer {ISSUER})"
