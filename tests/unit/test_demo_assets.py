from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from safetensors import safe_open

from runtime import config
from runtime.demo import assets
from runtime.demo.model import HEADS, HIDDEN, write_model
from runtime.integrity import signature


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_model_is_deterministic_and_servable_shape(tmp_path: Path) -> None:
    a, b = write_model(tmp_path / "a"), write_model(tmp_path / "b")
    assert _digests(a) == _digests(b)
    assert sorted(_digests(a)) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == HIDDEN // HEADS >= 32
    assert "auto_map" not in cfg
    assert "chat_template" in json.loads((a / "tokenizer_config.json").read_text())
    with safe_open(str(a / "model.safetensors"), "np") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype.name == "float32"


def test_ensure_builds_the_demo_contract_and_only_what_is_missing(tmp_path: Path) -> None:
    made = assets.ensure(tmp_path)
    assert len(made) == 9
    for name in (
        "model/model.safetensors",
        "model.sig",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter.sig",
        "draft/model.safetensors",
        "draft.sig",
        "signing-key.pub",
        "signing-key.pem",
        "pki/ca.pem",
        "pki/server.pem",
        "pki/client.pem",
        "pki/client-key.pem",
        "demo.toml",
    ):
        assert (tmp_path / name).is_file(), name
    assert assets.ensure(tmp_path) == []
    # tmpfs is emptied at boot: only the server key and certificate are made again.
    (assets.secrets_dir(tmp_path) / "server-key.pem").unlink()
    assert assets.ensure(tmp_path) == [
        f"demo: wrote the server certificate, its key in memory at {assets.secrets_dir(tmp_path)}"
    ]
    before = (tmp_path / "pki" / "ca.pem").read_bytes()
    (tmp_path / "model" / "model.safetensors").unlink()
    assert assets.ensure(tmp_path) == [
        f"demo: wrote tiny Llama to {tmp_path / 'model'}",
        f"demo: signed {tmp_path / 'model'} -> {tmp_path / 'model.sig'}",
    ]
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == before
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    assert assets.ensure(tmp_path) == [
        f"demo: wrote the demo adapter to {tmp_path / 'adapter'}",
        f"demo: signed {tmp_path / 'adapter'} -> {tmp_path / 'adapter.sig'}",
    ]
    for name in ("adapter", "draft"):
        signature.verify_model(
            tmp_path / name,
            tmp_path / f"{name}.sig",
            signature.KeyTrust(tmp_path / "signing-key.pub"),
            kind="adapter" if name == "adapter" else "model",
        )
    result = signature.verify_model(
        tmp_path / "model", tmp_path / "model.sig", signature.KeyTrust(tmp_path / "signing-key.pub")
    )
    assert result.method == "key" and len(result.verified.files) == 4

    cfg = config.load(tmp_path / assets.CONFIG_NAME)
    assert cfg.model.served_name == "demo" and cfg.limits.max_tokens == 64
    assert cfg.front.listen == "127.0.0.1:8443"


def test_demo_pki_identities_and_key_modes(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    pki = tmp_path / "pki"
    for key in ("ca-key.pem", "client-key.pem"):
        assert stat.S_IMODE(os.stat(pki / key).st_mode) == 0o600
    # The front's private key is a secret: in memory, private to this uid.
    secrets = assets.secrets_dir(tmp_path)
    assert stat.S_IMODE(os.stat(secrets).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(secrets / "server-key.pem").st_mode) == 0o600
    assert not (pki / "server-key.pem").exists()
    client = x509.load_pem_x509_certificate((pki / "client.pem").read_bytes())
    sans = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [assets.CLIENT_IDENTITY]
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
