"""Request limits, enforced on the parsed body before anything reaches the engine. Pure.

vLLM has no body limit and clamps max_tokens silently, and its extensions include parameters
that multiply work (n, best_of, beam search, prompt logprobs, grammar-guided decoding) or
reach outside (media URLs). The front therefore lets through only requests that fit the
positive model in request_model.py, within the caps of `[limits]` and the model's vocabulary,
and forwards its own strict re-serialisation of what it checked, so the engine parses exactly
what was validated.

Why one module of this size: `check` and its steps are one pure function over one body, in
the order they run; kept together, a reviewer sees that every field is checked before
anything is forwarded. It is fuzzed and held against vLLM's own request models
(tests/integration/test_request_model_vllm.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from runtime.config import LimitsSection, StructuredOutputsSection
from runtime.front.flat_requests import fits_flat
from runtime.front.request_model import ALLOWED_PARAMS, MODELS, first_error

MAX_STOP_BYTES = 256
MAX_LOGIT_BIAS = 300
# Built once (json.dumps builds one per call). Not ASCII-escaped, so that a lone surrogate
# (valid in a JSON escape, never in text) fails the UTF-8 encoding of what is forwarded.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


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


def _no_constant(name: str) -> Any:
    raise _bad(f"{name} is not a JSON number", "invalid_json")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python reads it as infinity, JSON cannot say it
        raise _bad(f"{text[:32]} is out of range for a number", "invalid_json")
    return value


_DECODER = json.JSONDecoder(  # json.loads builds one per call
    object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite
)


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
        # the decoder built once; but strict, where json.loads lets encoded surrogates through.
        # (An object's `{` then a byte other than NUL: UTF-8, as detect_encoding says.)
        utf8 = raw[:1] == b"{" and raw[1:2] != b"\x00"
        text = raw.decode("utf-8" if utf8 else json.detect_encoding(raw))
    except UnicodeDecodeError:
        raise _bad("The body is not valid JSON", "invalid_json") from None
    body = _decode(text, "The body", limits.max_json_depth)
    if not isinstance(body, dict):
        raise _bad("The body must be a JSON object", "invalid_json")
    return body


def _decode(text: str, what: str, max_depth: int, param: str | None = None) -> Any:
    """Strict JSON (_DECODER) nested at most `max_depth` deep; errors name `param`, or the
    duplicate key."""
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _bad("JSON is nested too deeply", "json_too_deep", param) from None
    except Rejected as err:
        raise _bad(err.message, err.code, param or err.param) from None
    except ValueError:
        raise _bad(f"{what} is not valid JSON", "invalid_json", param) from None
    if isinstance(value, dict | list) and _depth(value) > max_depth:
        raise _bad(f"JSON is nested deeper than {max_depth}", "json_too_deep", param)
    return value


def check(
    route: bytes,
    content_type: bytes | None,
    raw: bytes,
    limits: LimitsSection,
    served: tuple[str, ...],
    vocab_size: int | None = None,
    tool_parser: bool = False,
) -> Checked:
    """`served`: the names a request may give as `model` (the model's, each LoRA adapter's).
    `vocab_size`: the verified model's (config.json); token ids must be below it. None:
    the model names none, and requests that carry token ids are refused. `tool_parser`: the
    engine parses tool calls out of the model's text (engine.vllm.tool_call_parser)."""
    body = _parse(content_type, raw, limits)
    if not body.keys() <= ALLOWED_PARAMS[route]:
        # Before the model: its error would name only the first, in its own order.
        unknown = sorted(body.keys() - ALLOWED_PARAMS[route])[0]
        raise _bad(f"Unsupported parameter '{unknown}'", "unsupported_parameter", unknown)
    if not fits_flat(route, body):  # most requests fit without asking the model
        try:
            MODELS[route].model_validate(body)
        except ValidationError as err:
            raise _bad(*first_error(err)) from None
    # null means unset; vLLM types some of these parameters as non-nullable: leave them out.
    if None in body.values():
        body = {name: value for name, value in body.items() if value is not None}
    if body.get("model") not in served:  # a tuple: never a substring match
        raise Rejected(
            404,
            f"The model '{body.get('model')}' does not exist; this server serves "
            + ", ".join(f"'{name}'" for name in served),
            "model_not_found",
            "model",
        )
    stream = body.get("stream") is True  # its type is checked above; null is not streamed
    if body.get("stream_options") is not None and not stream:
        raise _bad(
            "'stream_options' goes with stream = true only", "invalid_value", "stream_options"
        )
    asked, allowed = _tokens(route, body, limits)
    _check_caps(route, body, limits, allowed, tool_parser)
    _check_token_ids(body, vocab_size)
    try:
        forwarded = _COMPACT.encode(body).encode()
    except UnicodeEncodeError:
        raise _bad(
            "A string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
            "invalid_string",
        ) from None
    return Checked(forwarded, stream, asked, allowed)


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


def _check_caps(
    route: bytes, body: dict[str, Any], limits: LimitsSection, allowed: int, tool_parser: bool
) -> None:
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
        size = _json_bytes(prompt) + _json_bytes(body.get("suffix"))
        param = "prompt"
    else:
        _int(body, "top_logprobs", 0, limits.max_logprobs)
        param = "messages"
        size = _json_bytes(body["messages"])
        # A response format's schema and the tools' may end up in one grammar (a strict tool
        # under "auto"): the caps hold for all of them. The schema is prompt too: the engine
        # compiles it before the first token; the tools, the chat template writes out.
        schemas = _check_response_format(body, limits)
        tools, tool_schemas = _check_tools(body, limits, tool_parser)
        sizes = _check_schemas(schemas + tool_schemas, limits.structured_outputs)
        size += sum(sizes[: len(schemas)])  # the tools' are in `tools`
        if size <= limits.max_prompt_bytes < size + tools:
            param = "tools"  # the tools are what does not fit
        size += tools
        _check_media(body["messages"], limits)
    if size > limits.max_prompt_bytes:
        raise _bad(
            f"The prompt is {size} bytes; this server allows at most {limits.max_prompt_bytes}",
            "limit_exceeded",
            param,
        )
    _check_stop(body, limits)
    bias = body.get("logit_bias")
    if bias is not None and len(bias) > MAX_LOGIT_BIAS:
        raise _bad(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} entries",
            "limit_exceeded",
            "logit_bias",
        )


def _json_bytes(value: Any) -> int:
    """The size that counts against limits.max_prompt_bytes: the value as JSON (json.dumps).
    A printable ASCII string without quotes or backslashes is itself plus its quotes."""
    if value is None:
        return 4  # null
    if (
        isinstance(value, str)
        and value.isascii()
        and value.isprintable()
        and '"' not in value
        and "\\" not in value
    ):
        return len(value) + 2
    return len(json.dumps(value).encode())


def _prompt_count(prompt: Any) -> int:
    if prompt == "":
        raise _bad("'prompt' is empty", "invalid_value", "prompt")  # vLLM refuses it too
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return len(prompt)
        if all(type(t) is int for t in prompt):  # exactly int: true is not a token
            return 1  # one prompt as token ids
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            return len(prompt)
    raise _bad(
        "'prompt' must be a string, a list of strings, or token ids", "invalid_type", "prompt"
    )


def _check_stop(body: dict[str, Any], limits: LimitsSection) -> None:
    if "stop" not in body and "stop_token_ids" not in body:
        return
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or a list of strings", "invalid_type", "stop")
    if not all(stops):
        raise _bad("'stop' holds an empty string", "invalid_value", "stop")  # as vLLM says
    if len(stops) > limits.max_stop or any(len(s.encode()) > MAX_STOP_BYTES for s in stops):
        raise _bad(
            f"at most {limits.max_stop} stop strings of {MAX_STOP_BYTES} bytes each",
            "limit_exceeded",
            "stop",
        )
    ids = body.get("stop_token_ids")
    if ids is not None and len(ids) > limits.max_stop:
        raise _bad(f"at most {limits.max_stop} stop_token_ids", "limit_exceeded", "stop_token_ids")


def _check_token_ids(body: dict[str, Any], vocab_size: int | None) -> None:
    """Token ids in the prompt, stop_token_ids and logit_bias's keys name tokens of the
    model's vocabulary: [0, vocab_size). Types are checked already."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) and "stop_token_ids" not in body and "logit_bias" not in body:
        return  # no token ids (a chat request has no prompt: it goes on below)
    named: list[tuple[str, list[int]]] = []
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        rows = prompt if isinstance(prompt[0], list) else [prompt]
        named += [("prompt", row) for row in rows]
    if body.get("stop_token_ids"):
        named.append(("stop_token_ids", body["stop_token_ids"]))
    if body.get("logit_bias"):
        keys = list(body["logit_bias"])
        if not all(_TOKEN_KEY.fullmatch(key) for key in keys):
            raise _bad(
                "'logit_bias' keys must be token ids written as decimal integers",
                "invalid_value",
                "logit_bias",
            )
        named.append(("logit_bias", [int(key) for key in keys]))
    for param, ids in named:
        if vocab_size is None:
            raise _bad(
                "This model's config.json names no vocab_size, so token ids are not accepted",
                "invalid_value",
                param,
            )
        if min(ids) < 0 or max(ids) >= vocab_size:
            bad = next(i for i in ids if not 0 <= i < vocab_size)
            raise _bad(
                f"'{param}' holds token id {bad}; this model's token ids are 0 to {vocab_size - 1}",
                "invalid_value",
                param,
            )


_TOKEN_KEY = re.compile(r"0|[1-9][0-9]{0,9}")
# JSON-schema keywords whose value is a regex: the engine would compile it into the grammar.
_REGEX_KEYWORDS = frozenset({"pattern", "patternProperties"})
# Keywords whose value is a map of names to schemas: its keys are names, not keywords.
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "dependentSchemas"})


def _check_response_format(
    body: dict[str, Any], limits: LimitsSection
) -> list[tuple[str, dict[str, Any]]]:
    """What `response_format` may ask of the engine (limits.structured_outputs); returns its
    schema with its parameter path, if it has one, for _check_schemas."""
    form = body.get("response_format")
    kind = form["type"] if form else "text"
    if form and form.get("json_schema") is not None and kind != "json_schema":
        raise _bad(
            "'response_format.json_schema' goes with type json_schema only",
            "invalid_value",
            "response_format.json_schema",
        )
    if kind == "text":
        return []
    policy = limits.structured_outputs
    if policy.allow == "off" or (kind == "json_schema" and policy.allow != "json_schema"):
        raise _bad(
            f"response_format {kind} is not enabled on this server "
            f"(limits.structured_outputs.allow = {policy.allow!r})",
            "structured_outputs_not_allowed",
            "response_format",
        )
    if kind == "json_object":
        return []
    spec = form.get("json_schema")
    if spec is None:
        raise _bad(
            "response_format json_schema needs 'json_schema' with a 'name' and a 'schema'",
            "invalid_value",
            "response_format.json_schema",
        )
    return [("response_format.json_schema.schema", spec["schema"])]


def _check_schemas(
    schemas: list[tuple[str, dict[str, Any]]], policy: StructuredOutputsSection
) -> list[int]:
    """JSON schemas the engine may compile into one grammar (a response format, or every
    tool's parameters: tool_choice "required" joins them), each given with its parameter
    path: each within the depth cap and free of regexes, all of them together within the
    bytes and properties caps of `policy`. Returns the bytes of each."""
    sizes: list[int] = []
    size = properties = 0
    for where, schema in schemas:
        sizes.append(len(_COMPACT.encode(schema).encode(errors="surrogatepass")))
        size += sizes[-1]
        if size > policy.max_schema_bytes:
            raise _bad(
                f"{size} bytes of schema in this request; this server allows at most "
                f"{policy.max_schema_bytes} (limits.structured_outputs.max_schema_bytes)",
                "limit_exceeded",
                where,
            )
        if _depth(schema) > policy.max_schema_depth:
            raise _bad(
                f"The schema is nested deeper than {policy.max_schema_depth} "
                "(limits.structured_outputs.max_schema_depth)",
                "limit_exceeded",
                where,
            )
        stack: list[Any] = [schema]
        while stack:  # every schema object, at every level
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
                continue
            if not isinstance(node, dict):
                continue
            for key, value in node.items():
                if key in _REGEX_KEYWORDS:
                    raise _bad(
                        f"The schema uses '{key}': regular expressions are not accepted here",
                        "structured_outputs_not_allowed",
                        where,
                    )
                if key.startswith("x-"):  # llguidance reads x-guidance: regexes, separators
                    raise _bad(
                        f"The schema uses '{key}': extension keywords steer the grammar "
                        "compiler itself and are not accepted here",
                        "structured_outputs_not_allowed",
                        where,
                    )
                if key in _NAMED_SCHEMAS and isinstance(value, dict):
                    properties += len(value) if key == "properties" else 0
                    stack.extend(value.values())  # the named schemas, not their names
                else:
                    stack.append(value)
        if properties > policy.max_schema_properties:
            raise _bad(
                f"{properties} properties in the schemas of this request; this server allows "
                f"at most {policy.max_schema_properties} "
                "(limits.structured_outputs.max_schema_properties)",
                "limit_exceeded",
                where,
            )
    return sizes


# data:<type>/<subtype>[;param=value]*;base64,<base64>: the media inline, nothing fetched.
_DATA_URL = re.compile(r"data:([a-z]+)/[a-z0-9.+-]+(?:;[a-z0-9-]+=[a-z0-9.+-]+)*;base64,")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_MEDIA_KIND = {"image_url": "image", "audio_url": "audio", "video_url": "video"}


def _check_media(messages: list[dict[str, Any]], limits: LimitsSection) -> None:
    """Media parts (the model typed them; user messages only) under limits.media."""
    policy = limits.media
    count = 0
    for i, message in enumerate(messages):
        content = message.get("content")  # absent from a message that only calls tools
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part["type"]
            if kind == "text":
                continue
            where = f"messages[{i}].content[{j}]"
            if kind not in policy.parts:
                raise _bad(
                    f"'{kind}' content parts are not accepted by this server "
                    f"(limits.media.parts = {policy.parts!r})",
                    "media_not_allowed",
                    where,
                )
            count += 1
            if count > policy.max_parts:
                raise _bad(
                    f"more than {policy.max_parts} media parts (limits.media.max_parts)",
                    "limit_exceeded",
                    where,
                )
            if kind == "input_audio":
                data, prefix = part["input_audio"]["data"], None
            else:
                url = part[kind]["url"]
                found = _DATA_URL.match(url)
                if found is None or found.group(1) != _MEDIA_KIND[kind]:
                    raise _bad(
                        f"'{kind}' must be a data:{_MEDIA_KIND[kind]}/...;base64, URL: this "
                        "server fetches and opens nothing on a request's behalf",
                        "media_url_not_allowed",
                        where,
                    )
                data, prefix = url[found.end() :], found
            size = len(data) + (prefix.end() if prefix else 0)
            if size > policy.max_part_bytes:
                raise _bad(
                    f"a media part of {size} bytes; this server allows at most "
                    f"{policy.max_part_bytes} (limits.media.max_part_bytes)",
                    "limit_exceeded",
                    where,
                )
            if not _BASE64.fullmatch(data) or len(data) % 4:
                raise _bad(f"'{kind}' data is not base64", "invalid_value", where)


def _check_tools(
    body: dict[str, Any], limits: LimitsSection, tool_parser: bool
) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    """Function calling (limits.tools): the tools, the choice among them, and the tool calls
    and results of the conversation so far. Returns the tools' bytes (prompt, like the
    messages) and their schemas with their parameter paths. The model has checked every
    type."""
    messages = body["messages"]
    used = next((p for p in ("tools", "tool_choice", "parallel_tool_calls") if p in body), None)
    for i, message in enumerate(messages):
        if used is None and (message["role"] == "tool" or message.get("tool_calls")):
            used = f"messages[{i}]"
    if used is None:
        return 0, []
    policy = limits.tools
    if not policy.allow:
        raise _bad(
            "Tool calling is not enabled on this server (limits.tools.allow = false)",
            "tools_not_allowed",
            used,
        )
    _check_conversation(messages, limits)
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None or "parallel_tool_calls" in body:
            param = "tool_choice" if choice is not None else "parallel_tool_calls"
            raise _bad(f"'{param}' needs 'tools'", "invalid_value", param)
        return 0, []
    if len(tools) > policy.max_tools:
        raise _bad(
            f"{len(tools)} tools; this server allows at most {policy.max_tools} "
            "(limits.tools.max_tools)",
            "limit_exceeded",
            "tools",
        )
    names: set[str] = set()
    schemas: list[tuple[str, dict[str, Any]]] = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        if function["name"] in names:  # which one a call means would be a guess
            raise _bad(
                f"two tools are named {function['name']!r}",
                "invalid_value",
                f"tools[{i}].function.name",
            )
        names.add(function["name"])
        if function.get("parameters") is not None:
            schemas.append((f"tools[{i}].function.parameters", function["parameters"]))
    if choice is None:
        asked, choice, param = "'tools' without a tool_choice (that is \"auto\")", "auto", "tools"
    else:
        asked = f"tool_choice {choice!r}" if isinstance(choice, str) else "a named tool_choice"
        param = "tool_choice"
    if choice != "none" and not tool_parser:
        # Without it vLLM answers every choice, "required" too, with text and no tool call.
        raise _bad(
            f"{asked} needs the engine's tool-call parser, which this server does not run "
            "(engine.vllm.enable_auto_tool_choice and tool_call_parser); send "
            "tool_choice 'none'",
            "tool_choice_not_allowed",
            param,
        )
    strict = next((i for i, t in enumerate(tools) if t["function"].get("strict")), None)
    if (choice != "none" or strict is not None) and (
        limits.structured_outputs.allow != "json_schema"
    ):
        # vLLM's tool parsers build grammars from the tools: for "required" and named choices,
        # strict tools, parallel_tool_calls = false, and some parsers for every "auto".
        raise _bad(
            "tool calls (any tool_choice but 'none') and tools with strict = true make the "
            "engine compile the tools' schemas into a grammar, which needs "
            "limits.structured_outputs.allow = 'json_schema'",
            "structured_outputs_not_allowed",
            param if choice != "none" else f"tools[{strict}].function.strict",
        )
    if choice not in ("auto", "none"):
        if body.get("response_format", {"type": "text"})["type"] != "text":
            # vLLM would drop response_format without a word.
            raise _bad(
                "'response_format' and tool_choice 'required' or a named function both "
                "constrain the output; send one of them",
                "invalid_value",
                "response_format",
            )
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise _bad(
                f"tool_choice names {choice['function']['name']!r}, which is not in 'tools'",
                "invalid_value",
                "tool_choice.function.name",
            )
    return len(_COMPACT.encode(tools).encode(errors="surrogatepass")), schemas


def _check_conversation(messages: list[dict[str, Any]], limits: LimitsSection) -> None:
    """Earlier tool calls carry their arguments as JSON text, which the engine decodes for
    the chat template (and quietly replaces with {} when it is not an object); each tool
    result answers a call made before it."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            where = f"messages[{i}].tool_calls[{j}].function.arguments"
            text = call["function"]["arguments"]
            arguments = _decode(text, "The arguments", limits.max_json_depth, where)
            if not isinstance(arguments, dict):
                raise _bad("the arguments must be a JSON object", "invalid_value", where)
            try:  # an escaped lone surrogate is valid JSON and never text
                _COMPACT.encode(arguments).encode()
            except UnicodeEncodeError:
                raise _bad(
                    "A string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
                    "invalid_string",
                    where,
                ) from None
            if call["id"] in calls:  # which call a result answers would be a guess
                raise _bad(
                    f"two tool calls have the id {call['id']!r}",
                    "invalid_value",
                    f"messages[{i}].tool_calls[{j}].id",
                )
            calls.add(call["id"])
        if message["role"] == "tool" and message["tool_call_id"] not in calls:
            raise _bad(
                f"tool_call_id {message['tool_call_id']!r} answers no tool call of an earlier "
                "assistant message",
                "invalid_value",
                f"messages[{i}].tool_call_id",
            )
