"""The front's model of a request against vLLM's own: whatever the front accepts is strict JSON
that vLLM's request models parse and turn into sampling parameters that pass vLLM's own range
checks, with the values the client sent; whatever the front cannot model is refused. vLLM's
models are imported from the installed vLLM (CPU build); no engine is started."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from vllm.entrypoints.openai.chat_completion import protocol as chat_protocol
from vllm.entrypoints.openai.completion import protocol

from runtime.config import LimitsSection, MediaSection, StructuredOutputsSection, ToolsSection
from runtime.front.limits import Rejected, check

VOCAB = 512
LIMITS = LimitsSection(
    max_tokens=64,
    max_n=2,
    max_logprobs=3,
    max_stop=3,
    structured_outputs=StructuredOutputsSection(allow="json_schema"),
    media=MediaSection(parts=["image_url", "input_audio"]),
    tools=ToolsSection(allow=True, max_tools=3),
)
ROUTES = {
    b"/v1/completions": protocol.CompletionRequest,
    b"/v1/chat/completions": chat_protocol.ChatCompletionRequest,
}

# Values near and past each range's edges, of the right type and of others.
_any_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_edgy_float = st.sampled_from(
    [-1e308, -2.5, -2.0, -0.5, 0.0, 1e-9, 0.5, 1.0, 2.0, 2.01, 10.0, 11.0]
)
_edgy_int = st.sampled_from(
    [-(1 << 63) - 1, -(1 << 63), -2, -1, 0, 1, 2, VOCAB - 1, VOCAB, 1 << 63]
)
_token = st.integers(-2, VOCAB + 1)
_text = st.text(max_size=8)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": st.sampled_from(["data:image/png;base64,AAAA", "http://x/i.png"])}
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["image_embeds", "file", "text"]), "data": _text}
    ),
)
_function_name = st.sampled_from(["f", "g", "bad name", ""])
_call_id = st.sampled_from(["c1", "c2", ""])
_tool_call = st.fixed_dictionaries(
    {
        "id": _call_id,
        "type": st.sampled_from(["function", "custom"]),
        "function": st.fixed_dictionaries(
            {
                "name": _function_name,
                "arguments": st.sampled_from(["{}", '{"a": [1]}', "x", "[]", '{"a":1,"a":2}']),
            }
        ),
    }
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "x"]),
        "content": _text | st.lists(_part, max_size=3) | _any_json,
    },
    optional={
        "name": _text,
        "tool_calls": st.lists(_tool_call, max_size=2) | _any_json,
        "tool_call_id": _call_id,
    },
)
_tool = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["function", "function", "custom"]),
        "function": st.fixed_dictionaries(
            {"name": _function_name},
            optional={
                "description": _text,
                "parameters": st.sampled_from(
                    [
                        {"type": "object"},
                        {"type": "object", "properties": {"a": {"type": "string"}}},
                        {"type": "string", "pattern": "a+"},
                    ]
                ),
            },
        ),
    }
)
_values: dict[str, st.SearchStrategy[Any]] = {
    "temperature": _edgy_float,
    "top_p": _edgy_float,
    "min_p": _edgy_float,
    "presence_penalty": _edgy_float,
    "frequency_penalty": _edgy_float,
    "repetition_penalty": _edgy_float,
    "seed": _edgy_int,
    "top_k": _edgy_int,
    "n": st.integers(0, 3),
    "max_tokens": st.integers(0, 70),
    "min_tokens": st.integers(-1, 70),
    "stop": _text | st.lists(_text, max_size=4),
    "stop_token_ids": st.lists(_token, max_size=3),
    "logit_bias": st.dictionaries(
        st.sampled_from(["0", "1", "511", "512", "-1", "x"]), _edgy_float, max_size=3
    ),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "user": _text,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
_completion_values = {
    **_values,
    "prompt": _text
    | st.lists(_text, min_size=1, max_size=3)
    | st.lists(_token, min_size=1, max_size=4)
    | st.lists(st.lists(_token, min_size=1, max_size=3), min_size=1, max_size=3),
    "echo": st.booleans(),
    "logprobs": st.integers(-1, 4),
}
_chat_values = {
    **_values,
    "messages": st.lists(_message, min_size=1, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 4),
    "response_format": st.sampled_from(
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
            {"type": "structural_tag", "format": {}},
        ]
    ),
    "tools": st.lists(_tool, max_size=4),
    "tool_choice": st.sampled_from(
        [
            "none",
            "auto",
            "required",
            "any",
            {"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "h"}},
            {"function": {"name": "f"}},
        ]
    ),
    "parallel_tool_calls": st.booleans(),
}


def _requests(values: dict[str, st.SearchStrategy[Any]], required: str) -> st.SearchStrategy:
    keys = sorted(values)
    return st.fixed_dictionaries(
        {required: values[required]},
        optional={k: values[k] | _any_json for k in keys if k != required}
        | {"guided_json": _any_json, "best_of": st.integers(0, 3)},
    )


@settings(max_examples=600, deadline=None)
@given(
    route_body=st.one_of(
        st.tuples(st.just(b"/v1/completions"), _requests(_completion_values, "prompt")),
        st.tuples(st.just(b"/v1/chat/completions"), _requests(_chat_values, "messages")),
    )
)
@example(
    route_body=(
        b"/v1/chat/completions",
        {"messages": [{"role": "assistant", "content": "", "tool_calls": None}]},
    )
)
def test_what_the_front_forwards_vllm_parses_and_accepts(route_body: tuple[bytes, Any]) -> None:
    route, body = route_body
    body["model"] = "demo"
    try:
        raw = json.dumps(body).encode()
        checked = check(route, b"application/json", raw, LIMITS, ("demo",), VOCAB, True)
    except Rejected as rej:
        assert rej.status == 400 and rej.code and rej.message
        return
    # Strict JSON: no NaN/Infinity, valid UTF-8.
    sent = json.loads(checked.body.decode("utf-8"), parse_constant=lambda c: pytest.fail(c))
    request = ROUTES[route].model_validate_json(checked.body)
    params = request.to_sampling_params(checked.tokens_allowed, {})  # vLLM's range checks
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "seed", "top_k"):
        if sent.get(name) is not None:
            expected = sent[name]
            if name == "temperature" and 0 < expected < 0.01:
                expected = 0.01  # vLLM raises a tiny temperature to 0.01, and says so
            assert math.isclose(getattr(params, name), expected)
    if sent.get("stop_token_ids"):
        assert all(0 <= t < VOCAB for t in params.stop_token_ids)
    prompt = sent.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int | list):
        rows = prompt if isinstance(prompt[0], list) else [prompt]
        assert all(type(t) is int and 0 <= t < VOCAB for row in rows for t in row)
    if sent.get("tools"):  # vLLM's reading of them is the one the front checked
        assert [t.function.name for t in request.tools] == [
            t["function"]["name"] for t in sent["tools"]
        ]
    for message in sent.get("messages", []):
        for call in message.get("tool_calls") or []:  # null is valid
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part["type"] == "image_url":
                assert part["image_url"]["url"].startswith("data:image/")


_USER = {"role": "user", "content": "hi"}
_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}
_RESULT = {"role": "tool", "content": "done", "tool_call_id": "c1"}
_conversation = st.sampled_from(
    [
        [_USER],
        [_USER, _CALL, _RESULT],
        [_USER, _CALL, _RESULT, {"role": "assistant", "content": "ok"}, _USER],
        [_USER, _RESULT],  # answers no call: refused
        [_USER, {**_CALL, "content": "calling"}, _RESULT],
    ]
)


_good_tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["f", "g", "h"])},
            optional={
                "description": _text,
                "strict": st.booleans(),
                "parameters": st.sampled_from(
                    [
                        {"type": "object"},
                        {"type": "object", "properties": {"a": {"type": "string"}}},
                    ]
                ),
            },
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    messages=_conversation,
    tools=st.lists(_good_tool, min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"])
    | st.lists(_tool, min_size=1, max_size=3)
    | st.none(),
    choice=_chat_values["tool_choice"] | st.none(),
    parallel=st.booleans() | st.none(),
)
def test_tool_requests_the_front_forwards_vllm_reads_the_same_way(
    messages: list[dict[str, Any]], tools: Any, choice: Any, parallel: bool | None
) -> None:
    """Requests that only vary in their function calling: what the front accepts, vLLM's
    model accepts with the same tools, and for the choices that constrain the output vLLM
    derives its grammar from exactly the schemas the front checked."""
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    body: dict[str, Any] = {"model": "demo", "messages": messages}
    for key, value in (
        ("tools", tools),
        ("tool_choice", choice),
        ("parallel_tool_calls", parallel),
    ):
        if value is not None:
            body[key] = value
    try:
        checked = check(
            b"/v1/chat/completions", b"application/json", json.dumps(body).encode(), LIMITS,
            ("demo",), VOCAB, True,
        )  # fmt: skip
    except Rejected as rej:
        assert rej.status == 400 and rej.code and rej.message
        return
    request = chat_protocol.ChatCompletionRequest.model_validate_json(checked.body)
    request.to_sampling_params(checked.tokens_allowed, {})
    sent = json.loads(checked.body)
    if not request.tools:
        assert "tools" not in sent
        return
    assert [t.function.name for t in request.tools] == [
        t["function"]["name"] for t in sent["tools"]
    ]
    schema = get_json_schema_from_tools(
        request.tool_choice, request.tools, request.parallel_tool_calls
    )
    if isinstance(choice, dict):  # named: that tool's own parameters, or any object
        [tool] = [t for t in sent["tools"] if t["function"]["name"] == choice["function"]["name"]]
        # (none given, or {}: any object)
        expected = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        assert schema == expected
    elif choice == "required":  # a list of calls to the tools the front checked
        assert isinstance(schema, dict) and schema["type"] == "array"
        assert json.dumps(sent["tools"][0]["function"]["name"]) in json.dumps(schema)
    else:
        assert schema is None  # auto, none: nothing compiled for the choice
