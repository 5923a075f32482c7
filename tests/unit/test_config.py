from __future__ import annotations

from pathlib import Path

import pytest

from runtime import config
from runtime.errors import ConfigError
from tests.support.configs import VALID, write_toml


def test_valid_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    cfg = config.load(write_toml(tmp_path, VALID))
    assert cfg.model.dir == tmp_path / "model"
    assert cfg.front.tls.client_ca == tmp_path / "pki" / "ca.pem"
    assert cfg.limits.max_tokens == 256
    assert cfg.sandbox.namespaces == "auto"
    assert cfg.model.signature is not None
    assert cfg.model.signature.public_key == tmp_path / "signer.pub"
    assert cfg.model.signature.method == "key"


def test_unsigned_model_must_be_said_explicitly(tmp_path: Path) -> None:
    unsigned = VALID.replace(
        '[model.signature]\npath = "model.sig"\npublic_key = "signer.pub"\n', ""
    )
    with pytest.raises(ConfigError, match=r"\[signature\] is missing"):
        config.load(write_toml(tmp_path, unsigned))
    cfg = config.load(write_toml(tmp_path, unsigned), ["model.unsafe_unsigned=true"])
    assert cfg.model.signature is None and cfg.model.unsafe_unsigned
    with pytest.raises(ConfigError, match="not both"):
        config.load(write_toml(tmp_path, VALID), ["model.unsafe_unsigned=true"])


def test_overrides_use_toml_syntax(tmp_path: Path) -> None:
    cfg = config.load(
        write_toml(tmp_path, VALID),
        ["limits.max_tokens=32", 'front.listen="[::1]:9443"', "engine.device=cuda"],
    )
    assert cfg.limits.max_tokens == 32
    assert cfg.front.listen == "[::1]:9443"
    assert cfg.engine.device == "cuda"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("[front]", "[front]\nlissten = 1"), "unknown key 'front.lissten'"),
        (("[model]", "[model]\nauto_map = 1"), "unknown key 'model.auto_map'"),
        (('public_key = "signer.pub"', 'method = "gpg"'), "'model.signature.method'"),
        (('served_name = "demo"', ""), "missing required key 'model.served_name'"),
        (('"127.0.0.1:8443"', '"0.0.0.0"'), "'front.listen'"),
        (('"127.0.0.1:8443"', '"example.com:443"'), "'front.listen'"),
        (('"127.0.0.1:8443"', '"127.0.0.1:99999"'), "out of range"),
        (('["spiffe://cluster.local/ns/gw/sa/gateway"]', "[]"), "'front.allowed_identities'"),
        (('["spiffe://cluster.local/ns/gw/sa/gateway"]', '["spiffe://*"]'), "wildcards"),
        (('served_name = "demo"', 'served_name = "../x y"'), "'model.served_name'"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, edit: tuple[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write_toml(tmp_path, VALID.replace(*edit, 1)))
    assert needle in info.value.message
    assert str(tmp_path / "harness.toml") in info.value.message
    assert info.value.exit_code == 2 and info.value.fix


def test_bad_values_in_sections_with_defaults(tmp_path: Path) -> None:
    for extra, needle in [
        ("[limits]\nmax_tokens = 0", "'limits.max_tokens'"),
        ("[engine]\ndevice = 'tpu'", "'engine.device'"),
        ("[sandbox]\nnamespaces = 'maybe'", "'sandbox.namespaces'"),
        ("[engine]\nmax_rss_bytes = 1000", "at least 16 MiB"),
        ("[engine]\nmax_rss_bytes = 'lots'", "'engine.max_rss_bytes'"),
        ("[engine]\nnetwork_namespace = 'auto'", "it is now 'sandbox.namespaces'"),
        ("[engine]\nenv_passthrough = ['AWS_SECRET_ACCESS_KEY']", "looks like a secret"),
        ("[engine]\nenv_passthrough = ['HF_TOKEN']", "looks like a secret"),
        ("[engine]\nenv_passthrough = ['OPENAI_API_KEY']", "looks like a secret"),
        ("[engine]\nenv_passthrough = ['A=B']", "not an environment variable name"),
    ]:
        with pytest.raises(ConfigError) as info:
            config.load(write_toml(tmp_path, VALID + "\n" + extra + "\n"))
        assert needle in info.value.message, extra


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write_toml(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        config.load(write_toml(tmp_path, VALID), ["limits.max_tokens"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:443", ("::1", 443)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_split_listen(value: str, expected: tuple[str, int]) -> None:
    assert config.split_listen(value) == expected


def test_metrics_endpoint_must_be_loopback(tmp_path: Path) -> None:
    path = write_toml(tmp_path, VALID)
    assert config.load(path, ['front.metrics_listen="127.0.0.1:9464"']).front.metrics_listen
    with pytest.raises(ConfigError, match="must listen on loopback"):
        config.load(path, ['front.metrics_listen="0.0.0.0:9464"'])
