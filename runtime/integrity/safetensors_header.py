"""Strict validation of a safetensors header. Pure: bytes and sizes in, facts or an error out.

Stricter than loaders need to be, because the header is attacker-controlled input parsed by
several readers (ours, safetensors' Rust, vLLM's own): any ambiguity one of them resolves
differently is refused. Duplicate JSON keys, for one, are refused rather than "last wins".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from runtime.errors import IntegrityError

MAX_HEADER_BYTES = 100_000_000  # the Rust safetensors limit

# Bits per element; sub-byte types must pack into whole bytes.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

_FIX = "re-export the weights with the safetensors library, then sign them again"


@dataclass(frozen=True)
class Header:
    header_len: int
    tensors: int
    data_bytes: int


def _fail(name: str, what: str) -> IntegrityError:
    return IntegrityError(f"{name}: invalid safetensors header: {what}", fix=_FIX)


def header_length(first8: bytes, file_size: int, name: str) -> int:
    """The header's declared length, checked against the file before anything else is read."""
    if len(first8) < 8 or file_size < 8:
        raise _fail(name, f"file is {file_size} bytes, shorter than the 8-byte length prefix")
    length = int.from_bytes(first8[:8], "little")
    if length < 2:
        raise _fail(name, f"header length {length} is too small")
    if length > MAX_HEADER_BYTES:
        raise _fail(name, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > file_size:
        raise _fail(name, f"header length {length} runs past the end of the {file_size}-byte file")
    return length


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(raw: bytes, data_size: int, name: str) -> Header:
    """Validate the JSON header `raw` for a data section of `data_size` bytes."""
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("does not start with '{'")
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(name, f"not a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise _fail(name, "not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _fail(name, "__metadata__ must map strings to strings")
    spans = []
    for tensor, info in doc.items():
        spans.append((*_tensor_span(tensor, info, name), tensor))
    spans.sort()
    position = 0
    for begin, end, tensor in spans:
        if begin != position:
            kind = "overlaps the previous one" if begin < position else "leaves a gap before it"
            raise _fail(name, f"tensor {tensor!r} at byte {begin} {kind} (expected {position})")
        position = end
    if position != data_size:
        raise _fail(
            name, f"tensors cover {position} bytes but the data section is {data_size} bytes"
        )
    return Header(header_len=len(raw), tensors=len(spans), data_bytes=data_size)


def _tensor_span(tensor: str, info: Any, name: str) -> tuple[int, int]:
    if not tensor:
        raise _fail(name, "empty tensor name")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _fail(name, f"tensor {tensor!r}: expected exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(name, f"tensor {tensor!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise _fail(name, f"tensor {tensor!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise _fail(name, f"tensor {tensor!r}: data_offsets must be [begin, end]")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise _fail(name, f"tensor {tensor!r}: {dtype} x {shape} is not a whole number of bytes")
    if end - begin != bits // 8:
        raise _fail(
            name,
            f"tensor {tensor!r}: {dtype} x {shape} needs {bits // 8} bytes, "
            f"data_offsets span {end - begin}",
        )
    return begin, end


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
