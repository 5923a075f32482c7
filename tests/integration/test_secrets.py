"""Secrets from an in-memory filesystem only, private files only, nothing secret-like in the
environment. Real tmpfs (/dev/shm) and a real on-disk folder; each refusal is exit 4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.config import SecretsSection
from runtime.demo import assets
from runtime.errors import SecretsError
from runtime.secrets import tmpfs
from tests.support import REPO


def _write(path: Path, data: str, mode: int = 0o400) -> Path:
    path.write_text(data)
    os.chmod(path, mode)
    return path


def test_tmpfs_secrets_load_in_all_formats(shm_dir: Path) -> None:
    _write(shm_dir / "tls.key", "-----BEGIN PRIVATE KEY-----\n")
    _write(shm_dir / "otlp.json", json.dumps({"authorization": "Bearer abc"}), 0o600)
    _write(shm_dir / "db.env", "# comment\nUSER=app\nPASSWORD = s3cret\n")
    loaded = tmpfs.load(SecretsSection(dir=shm_dir, required=["tls.key", "db.env:PASSWORD"]))
    assert loaded["otlp.json:authorization"].value == b"Bearer abc"
    assert loaded["db.env:PASSWORD"].value == b"s3cret"
    assert "s3cret" not in repr(loaded) and "Bearer" not in repr(loaded)


Mutation = Callable[[Path], None]
REFUSED: dict[str, tuple[Mutation, str]] = {
    "world-readable": (lambda d: _write(d / "k", "x", 0o604), "readable by others"),
    "group-writable": (lambda d: _write(d / "k", "x", 0o620), "writable by group or others"),
    "symlink": (
        lambda d: (_write(d / "real", "x"), os.symlink(d / "real", d / "k")),
        "k: is a symlink",
    ),
    "oversize": (lambda d: _write(d / "k", "x" * 70000), "over the 65536-byte cap"),
    "a folder": (lambda d: (d / "k").mkdir(), "is not a regular file"),
    "missing required": (lambda d: None, "secret k is missing"),
    "bad JSON": (lambda d: _write(d / "k.json", "{"), "not valid JSON"),
    "JSON not strings": (lambda d: _write(d / "k.json", '{"a": 1}'), "JSON object of strings"),
    "bad env line": (lambda d: _write(d / "k.env", "JUSTAWORD\n"), "line 1 is not KEY=VALUE"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsafe_secret_files_are_refused(shm_dir: Path, case: str) -> None:
    mutate, needle = REFUSED[case]
    mutate(shm_dir)
    with pytest.raises(SecretsError) as info:
        tmpfs.load(
            SecretsSection(dir=shm_dir, required=["k"] if case.startswith("missing") else [])
        )
    assert needle in info.value.message and info.value.exit_code == 4 and info.value.fix


def _kubelet_volume(
    root: Path, files: dict[str, str], version: str = "..2026_11_26_03_00.1"
) -> None:
    """What the kubelet's atomic writer makes of a Secret volume (defaultMode 0400)."""
    (root / version).mkdir(mode=0o755)
    for name, data in files.items():
        _write(root / version / name, data)
        os.symlink(f"..data/{name}", root / name)
    os.symlink(version, root / "..data.tmp")
    os.rename(root / "..data.tmp", root / "..data")


def test_a_kubernetes_secret_volume_is_read_from_its_current_version(shm_dir: Path) -> None:
    _kubelet_volume(shm_dir, {"server-key.pem": "old", "otlp.json": '{"a": "b"}'})
    # An update: a new version beside the old, then ..data swapped to it.
    (shm_dir / "..2026_11_26_04_00.2").mkdir(mode=0o755)
    _write(shm_dir / "..2026_11_26_04_00.2" / "server-key.pem", "new")
    _write(shm_dir / "..2026_11_26_04_00.2" / "otlp.json", '{"a": "c"}')
    os.symlink("..2026_11_26_04_00.2", shm_dir / "..data.tmp")
    os.rename(shm_dir / "..data.tmp", shm_dir / "..data")
    loaded = tmpfs.load(SecretsSection(dir=shm_dir, required=["server-key.pem"]))
    assert loaded["server-key.pem"].value == b"new"
    assert loaded["otlp.json:a"].value == b"c"
    assert sorted(loaded) == ["otlp.json:a", "server-key.pem"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: _write(d / "extra", "x"), "extra is not a link to ..data/extra"),
        (lambda d: os.symlink("/etc/hostname", d / "k"), "k is not a link to ..data/k"),
        (lambda d: os.chmod(d / "..2026_11_26_03_00.1" / "key", 0o444), "readable by others"),
        (
            lambda d: (os.remove(d / "..data"), os.symlink("/etc", d / "..data")),
            "..data points to '/etc'",
        ),
    ],
    ids=["a plain file beside", "a link elsewhere", "a world-readable version", "..data away"],
)
def test_a_kubernetes_secret_volume_out_of_shape_is_refused(
    shm_dir: Path, mutate: Mutation, needle: str
) -> None:
    _kubelet_volume(shm_dir, {"key": "v"})
    mutate(shm_dir)
    with pytest.raises(SecretsError) as info:
        tmpfs.load(SecretsSection(dir=shm_dir))
    assert needle in info.value.message and info.value.exit_code == 4


def test_a_version_removed_while_read_is_a_clear_refusal(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet deletes the old version right after swapping ..data: if that happens
    between finding the version and reading it, the start fails with exit 4, not a trace."""
    _kubelet_volume(shm_dir, {"key": "v"})
    real = tmpfs._version_dir

    def swapped_away(root: str) -> str:
        folder = real(root)
        shutil.rmtree(folder)
        return folder

    monkeypatch.setattr(tmpfs, "_version_dir", swapped_away)
    with pytest.raises(SecretsError, match="went away while it was read") as info:
        tmpfs.load(SecretsSection(dir=shm_dir))
    assert info.value.exit_code == 4


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_secret_owned_by_another_user_is_refused(shm_dir: Path) -> None:
    os.chown(_write(shm_dir / "k", "x"), 12345, 12345)
    with pytest.raises(SecretsError, match="owned by uid 12345"):
        tmpfs.load(SecretsSection(dir=shm_dir))


def test_secrets_dir_on_disk_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "k", "x")
    with pytest.raises(SecretsError) as info:
        tmpfs.load(SecretsSection(dir=tmp_path))
    assert "not in memory: a secret there has reached a disk" in info.value.message
    with pytest.raises(SecretsError, match="No such file"):
        tmpfs.load(SecretsSection(dir=tmp_path / "absent"))


def test_filesystem_of_reads_mountinfo() -> None:
    mountinfo = (
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 22 0:5 / /dev/shm rw - tmpfs tmpfs rw\n"
        "40 22 0:6 / /vault/secrets rw - tmpfs tmpfs rw\n"
        "41 22 0:7 / /mnt/my\\040secrets rw - ramfs none rw\n"
        "42 40 8:1 /x /vault/secrets/sub rw - ext4 /dev/sda1 rw\n"
    )
    assert tmpfs.filesystem_of("/vault/secrets", mountinfo) == ("/vault/secrets", "tmpfs")
    assert tmpfs.filesystem_of("/vault/secretsX", mountinfo) == ("/", "ext4")
    assert tmpfs.filesystem_of("/vault/secrets/sub/a", mountinfo) == (
        "/vault/secrets/sub",
        "ext4",
    )
    assert tmpfs.filesystem_of("/mnt/my secrets", mountinfo) == ("/mnt/my secrets", "ramfs")


@pytest.mark.parametrize(
    "name",
    [
        "VAULT_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "OPENAI_API_KEY",
        "GITHUB_TOKEN",
        "DB_PASSWORD",
        "HF_TOKEN",
        "APP_SECRET",
    ],
)
def test_secret_like_environment_variables_are_refused(name: str) -> None:
    with pytest.raises(SecretsError) as info:
        tmpfs.check_environment({"PATH": "/bin", name: "value-not-shown"}, [])
    assert name in info.value.message and "value-not-shown" not in info.value.message
    tmpfs.check_environment({name: "x"}, [name])  # allowlisted: fine
    tmpfs.check_environment({"PATH": "/bin", "TOKENIZERS_PARALLELISM": "false"}, [])


def test_serve_refuses_a_secret_in_the_environment_with_exit_4(tmp_path: Path) -> None:
    assets.ensure(tmp_path)
    env = dict(os.environ, VAULT_TOKEN="hvs.not-a-real-token")
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "serve", "--config", str(tmp_path / assets.CONFIG_NAME)],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 4
    assert "VAULT_TOKEN" in result.stderr and "hvs.not-a-real-token" not in result.stderr
    assert "hvs.not-a-real-token" not in result.stdout
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert [e["event_type"] for e in events][-2:] == ["secret_injection", "shutdown"]
    assert "engine_start" not in {e["event_type"] for e in events}


def test_a_private_file_the_engine_could_read_is_refused(shm_dir: Path, tmp_path: Path) -> None:
    """In a pod the engine keeps harness's uid: the secrets dir, or the TLS key, within a path
    the engine may open (links resolved, either way round) and readable by its uid or groups
    is refused, naming the file, the setting and the path; covered by its mount namespace,
    out of its paths or unreadable to its uid, it is fine."""
    key = _write(shm_dir / "server-key.pem", "key", 0o600)
    me, groups = os.geteuid(), {os.getegid()}
    parent = str(shm_dir.parent)
    link = tmp_path / "data"
    link.symlink_to(parent)  # sandbox.extra_read_paths = ["<link>"]
    private = [("secrets.dir", shm_dir)]
    for reach, uid, gids in (
        ([parent, "/usr"], me, groups),  # the folder holding the dir is the engine's
        ([str(link)], me, groups),  # the same, named through a link
        ([str(shm_dir / "server-key.pem")], me, groups),  # a path inside the dir
        (None, me, groups),  # no Landlock: any path
        ([str(shm_dir)], 54321, {os.stat(key).st_gid}),  # group-readable below
    ):
        key.chmod(0o640 if uid != me else 0o600)
        with pytest.raises(SecretsError) as info:
            tmpfs.check_engine_cannot_read(private, reach, uid, gids)
        assert "server-key.pem: the engine could read it: secrets.dir" in info.value.message
        assert info.value.exit_code == 4 and "secrets.dir" in info.value.fix
    key.chmod(0o600)
    with pytest.raises(SecretsError, match=r"front\.tls\.key"):
        tmpfs.check_engine_cannot_read([("front.tls.key", key)], [parent], me, groups)
    # Out of the engine's paths, covered, or unreadable by its uid (root mode): fine.
    tmpfs.check_engine_cannot_read(private, ["/usr", "/etc"], me, groups)
    tmpfs.check_engine_cannot_read(private, [parent], me, groups, hidden=[str(shm_dir)])
    tmpfs.check_engine_cannot_read(private, [parent], 54321, {54321})
    tmpfs.check_engine_cannot_read([("front.tls.key", tmp_path / "nope")], None, me, groups)


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo's secrets are root's")
def test_serve_refuses_secrets_in_the_engine_s_dev_shm_with_exit_4(tmp_path: Path) -> None:
    """The demo keeps its secrets in /dev/shm. Without a mount namespace the engine shares
    that /dev/shm, and kept as root (development only) it could read them: exit 4 before the
    engine starts."""
    assets.ensure(tmp_path)
    result = subprocess.run(
        [
            *[sys.executable, "-m", "runtime", "serve"],
            *["--config", str(tmp_path / assets.CONFIG_NAME)],
            *["--set", "sandbox.namespaces=off", "--set", "engine.unsafe_run_as_root=true"],
        ],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 4, result.stderr
    assert "the engine could read it" in result.stderr and "/dev/shm" in result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert [e["event_type"] for e in events][-2:] == ["secret_injection", "shutdown"]
    assert events[-2]["outcome"] == "blocked"
    assert "engine_start" not in {e["event_type"] for e in events}
