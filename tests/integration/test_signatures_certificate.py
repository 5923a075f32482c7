"""OMS v1.0 signatures, `certificate` method: a chain to the configured root, the code-signing
EKU, validity at signing time and now, and an allowed signer identity. Interoperable with
model_signing 1.1.1 both ways; the cases it accepts and we refuse are tested here."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from runtime.demo import assets, pki
from runtime.errors import IntegrityError
from runtime.integrity import signature
from tests.support import REPO
from tests.support.signing import MODEL_SIGNING

SIGNER = "ml-team@example.com"
NOW = dt.datetime.now(dt.UTC)


def _leaf(ca: pki.Issued, folder: Path, name: str, identity: str = SIGNER, **kwargs) -> Path:
    kwargs.setdefault("eku", [ExtendedKeyUsageOID.CODE_SIGNING])
    issued = pki.issue(ca, name, sans=[x509.RFC822Name(identity)], **kwargs)
    issued.write(folder / f"{name}.pem", folder / f"{name}-key.pem")
    return folder / f"{name}.pem"


@pytest.fixture()
def setup(clean_model: Path, tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model"
    shutil.copytree(clean_model, model)
    ca = pki.make_ca("model signing CA", not_before=NOW - dt.timedelta(days=365))
    ca.write(tmp_path / "root.pem")
    other = pki.make_ca("some other CA")
    other.write(tmp_path / "other-root.pem")
    return {
        "model": model,
        "root": tmp_path / "root.pem",
        "other_root": tmp_path / "other-root.pem",
        "good": _leaf(ca, tmp_path, "good"),
        "expired": _leaf(
            ca,
            tmp_path,
            "expired",
            not_before=NOW - dt.timedelta(days=30),
            not_after=NOW - dt.timedelta(days=1),
        ),
        "future": _leaf(
            ca,
            tmp_path,
            "future",
            not_before=NOW + dt.timedelta(days=1),
            not_after=NOW + dt.timedelta(days=30),
        ),
        "tls_only": _leaf(ca, tmp_path, "tls_only", eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "stranger": _leaf(ca, tmp_path, "stranger", identity="intruder@example.com"),
        "dir": tmp_path,
    }


def _sign(s: dict[str, Path], leaf: str) -> Path:
    sig = s["dir"] / f"{leaf}.sig"
    signature.sign_model(
        s["model"], s["dir"] / f"{leaf}-key.pem", sig, certificate=s[leaf], chain=(s["root"],)
    )
    return sig


def _verify(
    s: dict[str, Path],
    sig: Path,
    root: str = "root",
    identities: tuple[str, ...] | None = (SIGNER,),
) -> signature.Result:
    return signature.verify_model(
        s["model"], sig, signature.CertificateTrust((s[root],), identities)
    )


def _reference_tool_accepts(setup: dict[str, Path], sig: Path) -> None:
    checked = subprocess.run(
        [
            str(MODEL_SIGNING),
            "verify",
            "certificate",
            str(setup["model"]),
            "--signature",
            str(sig),
            "--certificate_chain",
            str(setup["root"]),
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_harness_certificate_signature_verifies_both_ways(setup: dict[str, Path]) -> None:
    sig = _sign(setup, "good")
    result = _verify(setup, sig)
    assert result.method == "certificate" and result.identity == SIGNER
    assert result.signer.startswith(f"certificate:{SIGNER} (issuer CN=model signing CA")
    _reference_tool_accepts(setup, sig)


def test_model_signing_certificate_signature_verifies_with_harness(
    setup: dict[str, Path],
) -> None:
    sig = setup["dir"] / "ms.sig"
    made = subprocess.run(
        [
            str(MODEL_SIGNING),
            "sign",
            "certificate",
            str(setup["model"]),
            "--private_key",
            str(setup["dir"] / "good-key.pem"),
            "--signing_certificate",
            str(setup["good"]),
            "--certificate_chain",
            str(setup["root"]),
            "--signature",
            str(sig),
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            "verify",
            str(setup["model"]),
            "--signature",
            str(sig),
            "--certificate-chain",
            str(setup["root"]),
            "--identity",
            SIGNER,
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["identity"] == SIGNER and report["identity_checked"] is True


@pytest.mark.parametrize(
    ("leaf", "root", "identities", "needle"),
    [
        ("good", "other_root", (SIGNER,), "does not chain to the configured root"),
        ("expired", "root", (SIGNER,), "does not chain to the configured root now"),
        ("future", "root", (SIGNER,), "does not chain to the configured root now"),
        (
            "tls_only",
            "root",
            (SIGNER,),
            "not for code signing (its extended key usage: serverAuth)",
        ),
        ("stranger", "root", (SIGNER,), "signer identity not allowed"),
        ("good", "root", ("spiffe://ml-team",), "signer identity not allowed"),
    ],
)
def test_certificates_model_signing_would_accept_are_refused(
    setup: dict[str, Path], leaf: str, root: str, identities: tuple[str, ...], needle: str
) -> None:
    sig = _sign(setup, leaf)
    with pytest.raises(IntegrityError) as info:
        _verify(setup, sig, root, identities)
    assert needle in info.value.message
    assert info.value.exit_code == 3 and info.value.fix


def test_a_key_signature_is_not_a_certificate_signature(setup: dict[str, Path]) -> None:
    sig = setup["dir"] / "key.sig"
    signature.sign_model(setup["model"], setup["dir"] / "good-key.pem", sig)
    with pytest.raises(IntegrityError) as info:
        _verify(setup, sig)
    assert "the bundle carries a public key" in info.value.message
    assert 'model.signature.method = "key"' in (info.value.fix or "")


def test_certificate_that_is_not_the_signing_key_is_refused_at_signing(
    setup: dict[str, Path],
) -> None:
    with pytest.raises(IntegrityError, match="does not belong to the private key"):
        signature.sign_model(
            setup["model"],
            setup["dir"] / "good-key.pem",
            setup["dir"] / "x.sig",
            certificate=setup["stranger"],
        )


def test_serve_config_with_the_certificate_method(setup: dict[str, Path], tmp_path: Path) -> None:
    """Step 2 through `harness check` (the same call `serve` makes)."""
    demo = tmp_path / "demo"
    assets.ensure(demo)
    shutil.rmtree(demo / "model")
    shutil.copytree(setup["model"], demo / "model")
    sig = _sign(setup, "good")
    config = demo / assets.CONFIG_NAME
    text = config.read_text().replace(
        'path = "model.sig"\nmethod = "key"\npublic_key = "signing-key.pub"\n',
        f'path = "{sig}"\nmethod = "certificate"\ncertificate_chain = ["{setup["root"]}"]\n'
        f'identities = ["{SIGNER}"]\n',
    )
    config.write_text(text)
    ok = subprocess.run(
        [sys.executable, "-m", "runtime", "check", "--config", str(config), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["controls"]["weight_integrity"]["method"] == "certificate"
    config.write_text(text.replace(SIGNER, "someone@example.com"))
    refused = subprocess.run(
        [sys.executable, "-m", "runtime", "check", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 3 and "signer identity not allowed" in refused.stderr


@pytest.mark.parametrize("leaf", ["expired", "tls_only", "stranger"])
def test_the_reference_tool_accepts_what_harness_refuses(setup: dict[str, Path], leaf: str) -> None:
    """model_signing 1.1.1 accepts an expired leaf, a TLS-only leaf and any signer of the CA;
    harness refuses each (test above). This pins the difference we claim."""
    sig = _sign(setup, leaf)
    _reference_tool_accepts(setup, sig)
