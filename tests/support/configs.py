"""Configs the unit and integration tests build on: a valid harness.toml, and a valid
config object with `[engine]` settings of the test's choosing."""

from __future__ import annotations

from pathlib import Path

from runtime.config import Config

VALID = """
[model]
dir = "model"
served_name = "demo"

[model.signature]
path = "model.sig"
public_key = "signer.pub"

[front]
listen = "127.0.0.1:8443"
allowed_identities = ["spiffe://cluster.local/ns/gw/sa/gateway"]

[front.tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
"""


def write_toml(tmp_path: Path, text: str) -> Path:
    """The config text as harness.toml in this folder."""
    path = tmp_path / "harness.toml"
    path.write_text(text)
    return path


def engine_config(**engine: object) -> Config:
    """A valid config from a dict (an unsigned model, nothing on disk), with these `[engine]`
    settings."""
    return Config.model_validate(
        {
            "model": {"dir": "/models/m", "served_name": "demo", "unsafe_unsigned": True},
            "front": {
                "allowed_identities": ["x.example"],
                "tls": {"cert": "/c", "key": "/k", "client_ca": "/ca"},
            },
            "limits": {"max_tokens": 48},
            "engine": {"kv_cache_memory_bytes": 1 << 26, "max_model_len": 256, **engine},
        }
    )
