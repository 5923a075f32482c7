"""Weight integrity without signatures: the model-dir policy, strict safetensors headers and the
fingerprint re-check. Every hostile case is refused with an IntegrityError (exit 3)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import IntegrityError
from runtime.integrity import model_dir
from runtime.integrity.safetensors_header import DTYPE_BITS, header_length, parse_header
from tests.support.strategies import json_values


@pytest.fixture()
def model(clean_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(clean_model, target)
    return target


def _safetensors(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _rewrite_weights(model: Path, blob: bytes) -> None:
    (model / "model.safetensors").write_bytes(blob)


def _f32(name: str, begin: int, count: int) -> dict:
    return {name: {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}}


def test_the_demo_model_passes(model: Path) -> None:
    verified = model_dir.verify(model)
    assert sorted(verified.files) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert verified.tensors == 21 and verified.total_bytes > 6_000_000
    model_dir.recheck(verified)


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "pickle weights": (
        lambda m: (m / "pytorch_model.bin").write_bytes(b"\x80\x04."),
        "pytorch_model.bin: refused: PyTorch pickle",
    ),
    "pickle": (lambda m: (m / "x.pkl").write_bytes(b"\x80"), "x.pkl: refused: pickle"),
    "python code": (
        lambda m: (m / "modeling_evil.py").write_text("import os"),
        "modeling_evil.py: refused: Python code",
    ),
    "checkpoint": (lambda m: (m / "a.ckpt").write_bytes(b""), "a.ckpt: refused"),
    "torch file in a subfolder": (
        lambda m: (m / "sub").mkdir() or (m / "sub" / "w.pt").write_bytes(b""),
        "sub/w.pt: refused",
    ),
    "unknown kind": (
        lambda m: (m / "run.sh").write_text("#!/bin/sh"),
        "run.sh: not an allowed kind",
    ),
    "hidden file": (lambda m: (m / ".cache").mkdir(), ".cache: hidden"),
    "auto_map in config.json": (
        lambda m: (m / "config.json").write_text(
            json.dumps(
                {
                    **json.loads((m / "config.json").read_text()),
                    "auto_map": {"AutoModel": "modeling_evil.Model"},
                }
            )
        ),
        "config.json: has 'auto_map'",
    ),
    "auto_map in tokenizer_config.json": (
        lambda m: (m / "tokenizer_config.json").write_text('{"auto_map": {}}'),
        "tokenizer_config.json: has 'auto_map'",
    ),
    "config not JSON": (lambda m: (m / "config.json").write_text("{"), "not valid JSON"),
    "symlink inside": (
        lambda m: os.symlink("config.json", m / "link.json"),
        "link.json: is a symlink",
    ),
    "symlink escaping": (
        lambda m: os.symlink("/etc/passwd", m / "passwd.txt"),
        "passwd.txt: is a symlink",
    ),
    "symlinked weights": (
        lambda m: (
            os.rename(m / "model.safetensors", m.parent / "w"),
            os.symlink(m.parent / "w", m / "model.safetensors"),
        ),
        "model.safetensors: is a symlink",
    ),
    "fifo": (lambda m: os.mkfifo(m / "pipe.txt"), "pipe.txt: is not a regular file"),
    "no weights": (lambda m: (m / "model.safetensors").unlink(), "no .safetensors weights"),
    "no config": (lambda m: (m / "config.json").unlink(), "config.json is missing"),
    "truncated weights": (
        lambda m: os.truncate(
            m / "model.safetensors", os.path.getsize(m / "model.safetensors") - 1
        ),
        "data section is",
    ),
    "appended bytes": (
        lambda m: (m / "model.safetensors").open("ab").write(b"\0" * 4),
        "data section is",
    ),
    "huge header length": (
        lambda m: _rewrite_weights(m, struct.pack("<Q", 2**63) + b"{}"),
        "exceeds the 100000000-byte limit",
    ),
    "header past EOF": (
        lambda m: _rewrite_weights(m, struct.pack("<Q", 1000) + b"{}"),
        "runs past the end",
    ),
    "header not JSON": (
        lambda m: _rewrite_weights(m, _safetensors(b"{not json}", b"")),
        "not a JSON object",
    ),
    "header not an object": (
        lambda m: _rewrite_weights(m, _safetensors(b"[1, 2]", b"")),
        "not a JSON object",
    ),
    "overlapping spans": (
        lambda m: _rewrite_weights(
            m, _safetensors({**_f32("a", 0, 2), **_f32("b", 4, 2)}, b"\0" * 12)
        ),
        "overlaps the previous one",
    ),
    "gap between spans": (
        lambda m: _rewrite_weights(
            m, _safetensors({**_f32("a", 0, 1), **_f32("b", 8, 1)}, b"\0" * 12)
        ),
        "leaves a gap",
    ),
    "span past EOF": (
        lambda m: _rewrite_weights(m, _safetensors(_f32("a", 0, 4), b"\0" * 8)),
        "data section is 8 bytes",
    ),
    "wrong dtype size": (
        lambda m: _rewrite_weights(
            m,
            _safetensors(
                {"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16
            ),
        ),
        "needs 8 bytes, data_offsets span 16",
    ),
    "unknown dtype": (
        lambda m: _rewrite_weights(
            m,
            _safetensors(
                {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16
            ),
        ),
        "unknown dtype 'F128'",
    ),
    "duplicate tensor name": (
        lambda m: _rewrite_weights(
            m,
            _safetensors(
                b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
                b"\0\0",
            ),
        ),
        "duplicate key 'a'",
    ),
    "extra field in a tensor": (
        lambda m: _rewrite_weights(
            m,
            _safetensors(
                {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"\0"
            ),
        ),
        "expected exactly dtype, shape, data_offsets",
    ),
    "bad metadata": (
        lambda m: _rewrite_weights(
            m, _safetensors({"__metadata__": {"a": 1}, **_f32("a", 0, 1)}, b"\0" * 4)
        ),
        "__metadata__ must map strings",
    ),
    "shorter than the prefix": (
        lambda m: _rewrite_weights(m, b"\0\0\0"),
        "shorter than the 8-byte",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_model_dir_is_refused(model: Path, case: str) -> None:
    mutate, needle = HOSTILE[case]
    mutate(model)
    with pytest.raises(IntegrityError) as info:
        model_dir.verify(model)
    assert needle in info.value.message
    assert info.value.exit_code == 3


@pytest.mark.parametrize("change", ["flip a bit", "replace", "add", "remove", "touch"])
def test_change_after_verification_is_caught(model: Path, change: str) -> None:
    verified = model_dir.verify(model)
    weights = model / "model.safetensors"
    if change == "flip a bit":
        with weights.open("r+b") as handle:
            handle.seek(4096)
            byte = handle.read(1)[0]
            handle.seek(4096)
            handle.write(bytes([byte ^ 1]))
    elif change == "replace":
        data = weights.read_bytes()
        weights.unlink()
        weights.write_bytes(data)  # same bytes, new inode
    elif change == "add":
        (model / "notes.txt").write_text("x")
    elif change == "remove":
        (model / "tokenizer.json").unlink()
    else:
        os.utime(weights, ns=(1, 1))
    with pytest.raises(IntegrityError, match="after verification"):
        model_dir.recheck(verified)


def test_writable_model_dir_is_reported(model: Path) -> None:
    reason = model_dir.writable_reason(model)
    if os.geteuid() == 0 or os.access(model, os.W_OK):
        assert reason is not None and "not on a read-only mount" in reason


# -- property tests on the header validator ----------------------------------------------

_dtypes = st.sampled_from(sorted(DTYPE_BITS))
_tensor = st.fixed_dictionaries(
    {
        "dtype": st.one_of(_dtypes, st.text(max_size=5)),
        "shape": st.lists(st.integers(-2, 6), max_size=3),
        "data_offsets": st.lists(st.integers(-2, 200), min_size=0, max_size=3),
    }
)
_json = json_values(max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(
    header=st.dictionaries(st.text(max_size=4), st.one_of(_tensor, _json), max_size=4),
    data_size=st.integers(0, 300),
)
def test_header_validator_never_crashes_and_accepts_only_consistent_layouts(
    header: dict, data_size: int
) -> None:
    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(raw, data_size, "w.safetensors")
    except IntegrityError:
        return
    # Accepted: every tensor's bytes match its dtype and shape, and the spans tile the data.
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        begin, end = info["data_offsets"]
        assert end - begin == count * DTYPE_BITS[info["dtype"]] // 8
        spans.append((begin, end))
    spans.sort()
    if spans:
        assert [b for b, _ in spans] == [0, *[e for _, e in spans[:-1]]]
    assert (spans[-1][1] if spans else 0) == data_size == parsed.data_bytes


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=64), size=st.integers(0, 1 << 40))
def test_header_length_never_crashes(blob: bytes, size: int) -> None:
    try:
        length = header_length(blob, size, "w.safetensors")
    except IntegrityError:
        return
    assert 2 <= length <= 100_000_000 and 8 + length <= size


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), data_size=st.integers(0, 64))
def test_header_parser_survives_arbitrary_bytes(raw: bytes, data_size: int) -> None:
    with contextlib.suppress(IntegrityError):
        parse_header(raw, data_size, "w.safetensors")
