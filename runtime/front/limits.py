"""Request limits, enforced on the parsed body before anything reaches the engine. Pure.

vLLM has no body limit and clamps max_tokens silently, and its extensions include parameters
that multiply work (n, best_of, beam search, prompt logprobs, grammar-guided decoding). The
front therefore lets through only known parameters, within caps, and forwards its own
re-serialisation of what it checked, so the engine parses exactly what was validated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runtime.config import LimitsSection

# OpenAI parameters, plus vLLM sampling extensions that cannot multiply work beyond the caps.
_COMMON = frozenset(
    {
        "model", "stream", "stream_options", "temperature", "top_p", "frequency_penalty",
        "presence_penalty", "seed", "stop", "user", "n", "logit_bias", "max_tokens",
        # vLLM sampling extensions, bounded by the caps below
        "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
        "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    }
)  # fmt: skip
ALLOWED_PARAMS: dict[bytes, frozenset[str]] = {
    b"/v1/completions": _COMMON | {"prompt", "best_of", "echo", "logprobs", "suffix"},
    b"/v1/chat/completions": _COMMON
    | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format"},
}
# The JSON type of each parameter whose value the caps below do not look at; null is always
# allowed (some clients send it for "unset"). The engine then parses only shapes it expects.
_STRING = ((str,), "a string")
_INTEGER = ((int,), "an integer")
_NUMBER = ((int, float), "a number")
_BOOLEAN = ((bool,), "a boolean")
_OBJECT = ((dict,), "an object")
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": _STRING,
    "user": _STRING,
    "suffix": _STRING,
    "seed": _INTEGER,
    "top_k": _INTEGER,
    "stream_options": _OBJECT,
    "response_format": _OBJECT,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "frequency_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "min_p": _NUMBER,
    "repetition_penalty": _NUMBER,
    "stream": _BOOLEAN,
    "ignore_eos": _BOOLEAN,
    "echo": _BOOLEAN,
    "skip_special_tokens": _BOOLEAN,
    "spaces_between_special_tokens": _BOOLEAN,
    "include_stop_str_in_output": _BOOLEAN,
}
MAX_STOP_BYTES = 256
MAX_LOGIT_BIAS = 300
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # built once: json.dumps builds one per call


@dataclass(frozen=True)
class Checked:
    body: bytes  # what is forwarded
    stream: bool
    tokens_asked: int | None
    tokens_allowed: int


class Rejected(Exception):
    """An OpenAI-style error: status, message, machine code, offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after


def _bad(message: str, code: str, param: str | None = None) -> Rejected:
    return Rejected(400, message, code, param)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # parsers disagree on which one wins: refuse the ambiguity
            raise _bad(f"duplicate JSON key {key!r}", "duplicate_key", key)
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)  # json.loads builds one per call


def _depth(value: dict[str, Any] | list[Any]) -> int:
    """Levels of nesting, the values inside counted: {} is 1, {"a": 1} 2, {"a": [1]} 3.
    Iterative: the parser already refused what would overflow Python's stack. Only
    containers are pushed, the values in a flat body are only looked at."""
    deepest, stack = 1, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if children and level >= deepest:
            deepest = level + 1
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
    return deepest


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"'{name}' must be an integer", "invalid_type", name)
    if not low <= value <= high:
        raise _bad(
            f"'{name}' must be between {low} and {high} here; got {value}", "limit_exceeded", name
        )
    return value


def _parse(content_type: bytes | None, raw: bytes, limits: LimitsSection) -> dict[str, Any]:
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        raise Rejected(415, "Content-Type must be application/json", "unsupported_media_type")
    try:
        # What json.loads does with bytes (UTF-8, -16 or -32, a UTF-8 BOM skipped), with
        # the decoder built once.
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise _bad("JSON is nested too deeply", "json_too_deep") from None
    except (UnicodeDecodeError, ValueError):
        raise _bad("The body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("The body must be a JSON object", "invalid_json")
    if _depth(body) > limits.max_json_depth:
        raise _bad(f"JSON is nested deeper than {limits.max_json_depth}", "json_too_deep")
    return body


def check(
    route: bytes, content_type: bytes | None, raw: bytes, limits: LimitsSection, served: str
) -> Checked:
    body = _parse(content_type, raw, limits)
    unknown = sorted(body.keys() - ALLOWED_PARAMS[route])
    if unknown:
        raise _bad(f"Unsupported parameter '{unknown[0]}'", "unsupported_parameter", unknown[0])
    _check_types(body)
    if body.get("model") != served:
        raise Rejected(
            404,
            f"The model '{body.get('model')}' does not exist; this server serves '{served}'",
            "model_not_found",
            "model",
        )
    stream = body.get("stream") is True  # its type is checked above; null is not streamed
    asked, allowed = _tokens(route, body, limits)
    _check_caps(route, body, limits, allowed)
    return Checked(_COMPACT.encode(body).encode(), stream, asked, allowed)


def _check_types(body: dict[str, Any]) -> None:
    for name, value in body.items():
        expected = _TYPES.get(name)
        if expected is None or value is None:
            continue
        kinds, described = expected
        # true is an int to Python, but never a number to JSON
        if not isinstance(value, kinds) or (isinstance(value, bool) and expected is not _BOOLEAN):
            raise _bad(f"'{name}' must be {described} or null", "invalid_type", name)


def _tokens(route: bytes, body: dict[str, Any], limits: LimitsSection) -> tuple[int | None, int]:
    cap = limits.max_tokens
    names = ["max_tokens"] + (["max_completion_tokens"] if route == b"/v1/chat/completions" else [])
    asked_values = [v for n in names if (v := _int(body, n, 1, 1 << 31)) is not None]
    asked = max(asked_values) if asked_values else None
    if asked is not None and asked > cap:
        if limits.max_tokens_policy == "reject":
            param = next(n for n in names if body.get(n) == asked)
            raise _bad(
                f"'{param}' is {asked}; this server allows at most {cap}",
                "max_tokens_exceeded",
                param,
            )
        for name in names:
            if name in body and body[name] is not None:
                body[name] = min(body[name], cap)
    allowed = min(asked, cap) if asked is not None else min(limits.default_max_tokens or cap, cap)
    if asked is None:  # inject the default: the engine never picks its own
        body[names[-1]] = allowed
    _int(body, "min_tokens", 0, allowed)
    return asked, allowed


def _check_caps(route: bytes, body: dict[str, Any], limits: LimitsSection, allowed: int) -> None:
    n = _int(body, "n", 1, limits.max_n) or 1
    best_of = _int(body, "best_of", 1, limits.max_n)
    if best_of is not None and best_of < n:
        raise _bad("'best_of' must be at least 'n'", "invalid_value", "best_of")
    if route == b"/v1/completions":
        _int(body, "logprobs", 0, limits.max_logprobs)
        prompt = body.get("prompt")
        prompts = _prompt_count(prompt)
        if prompts > limits.max_prompts:
            raise _bad(
                f"{prompts} prompts; this server allows at most {limits.max_prompts}",
                "limit_exceeded",
                "prompt",
            )
        size = len(json.dumps(prompt).encode())
    else:
        if not isinstance(body.get("logprobs", False), bool):
            raise _bad("'logprobs' must be a boolean", "invalid_type", "logprobs")
        _int(body, "top_logprobs", 0, limits.max_logprobs)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise _bad("'messages' must be a non-empty list of objects", "invalid_type", "messages")
        size = len(json.dumps(messages).encode())
    if size > limits.max_prompt_bytes:
        param = "prompt" if route == b"/v1/completions" else "messages"
        raise _bad(
            f"The prompt is {size} bytes; this server allows at most {limits.max_prompt_bytes}",
            "limit_exceeded",
            param,
        )
    _check_stop(body, limits)
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS):
        raise _bad(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} entries",
            "limit_exceeded",
            "logit_bias",
        )
    if bias and not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in bias.values()
    ):
        raise _bad("'logit_bias' values must be numbers", "invalid_type", "logit_bias")


def _prompt_count(prompt: Any) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return len(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return 1  # one prompt as token ids
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return len(prompt)
    raise _bad(
        "'prompt' must be a string, a list of strings, or token ids", "invalid_type", "prompt"
    )


def _check_stop(body: dict[str, Any], limits: LimitsSection) -> None:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or a list of strings", "invalid_type", "stop")
    if len(stops) > limits.max_stop or any(len(s.encode()) > MAX_STOP_BYTES for s in stops):
        raise _bad(
            f"at most {limits.max_stop} stop strings of {MAX_STOP_BYTES} bytes each",
            "limit_exceeded",
            "stop",
        )
    ids = body.get("stop_token_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) > limits.max_stop):
        raise _bad(f"at most {limits.max_stop} stop_token_ids", "limit_exceeded", "stop_token_ids")
    if ids and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise _bad("'stop_token_ids' must be integers", "invalid_type", "stop_token_ids")
