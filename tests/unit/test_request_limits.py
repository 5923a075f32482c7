"""The front's request limits, as a pure function: each limit's rejection (status, OpenAI error
code and parameter), clamping, default injection, and a fuzz test of the whole validator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.config import LimitsSection, MediaSection, StructuredOutputsSection, ToolsSection
from runtime.front.limits import Rejected, _depth, _json_bytes, check
from tests.support.strategies import json_values

LIMITS = LimitsSection(
    max_tokens=64,
    max_n=2,
    max_logprobs=3,
    max_prompts=2,
    max_prompt_bytes=200,
    max_stop=2,
    max_json_depth=8,
)
VOCAB = 1000  # the model's vocab_size
SCHEMAS = StructuredOutputsSection(allow="json_schema", max_schema_depth=64)
CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
JSON = b"application/json"


def _completion(**extra: Any) -> dict[str, Any]:
    return {"model": "demo", "prompt": "hello", **extra}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **extra}


def _check(
    route: bytes,
    body: Any,
    limits: LimitsSection = LIMITS,
    ctype: bytes = JSON,
    vocab_size: int | None = VOCAB,
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return check(route, ctype, raw, limits, ("demo",), vocab_size)


@pytest.mark.parametrize(
    ("route", "body", "status", "code", "param"),
    [
        (COMPLETIONS, _completion(max_tokens=65), 400, "max_tokens_exceeded", "max_tokens"),
        (
            CHAT,
            _chat(max_completion_tokens=100),
            400,
            "max_tokens_exceeded",
            "max_completion_tokens",
        ),
        (CHAT, _chat(max_tokens=65), 400, "max_tokens_exceeded", "max_tokens"),
        (COMPLETIONS, _completion(max_tokens=0), 400, "limit_exceeded", "max_tokens"),
        (COMPLETIONS, _completion(max_tokens="64"), 400, "invalid_type", "max_tokens"),
        (COMPLETIONS, _completion(max_tokens=True), 400, "invalid_type", "max_tokens"),
        (COMPLETIONS, _completion(n=3), 400, "limit_exceeded", "n"),
        (COMPLETIONS, _completion(best_of=3), 400, "limit_exceeded", "best_of"),
        (COMPLETIONS, _completion(n=2, best_of=1), 400, "invalid_value", "best_of"),
        (COMPLETIONS, _completion(logprobs=4), 400, "limit_exceeded", "logprobs"),
        (CHAT, _chat(logprobs=True, top_logprobs=4), 400, "limit_exceeded", "top_logprobs"),
        (CHAT, _chat(logprobs=3), 400, "invalid_type", "logprobs"),
        (COMPLETIONS, _completion(prompt=["a", "b", "c"]), 400, "limit_exceeded", "prompt"),
        (COMPLETIONS, _completion(prompt="x" * 300), 400, "limit_exceeded", "prompt"),
        (
            CHAT,
            _chat(messages=[{"role": "user", "content": "x" * 300}]),
            400,
            "limit_exceeded",
            "messages",
        ),
        (CHAT, _chat(messages=[]), 400, "invalid_value", "messages"),
        (COMPLETIONS, _completion(prompt={"a": 1}), 400, "invalid_type", "prompt"),
        (COMPLETIONS, _completion(stop=["a", "b", "c"]), 400, "limit_exceeded", "stop"),
        (COMPLETIONS, _completion(stop="x" * 300), 400, "limit_exceeded", "stop"),
        (
            COMPLETIONS,
            _completion(stop_token_ids=[1, 2, 3]),
            400,
            "limit_exceeded",
            "stop_token_ids",
        ),
        (COMPLETIONS, _completion(min_tokens=65), 400, "limit_exceeded", "min_tokens"),
        (COMPLETIONS, _completion(model="other"), 404, "model_not_found", "model"),
        (COMPLETIONS, {"prompt": "hi"}, 404, "model_not_found", "model"),
        (
            COMPLETIONS,
            _completion(use_beam_search=True),
            400,
            "unsupported_parameter",
            "use_beam_search",
        ),
        (
            COMPLETIONS,
            _completion(prompt_logprobs=5),
            400,
            "unsupported_parameter",
            "prompt_logprobs",
        ),
        (CHAT, _chat(guided_regex="a*"), 400, "unsupported_parameter", "guided_regex"),
        (CHAT, _chat(prompt="hi"), 400, "unsupported_parameter", "prompt"),
        (COMPLETIONS, _completion(stream="yes"), 400, "invalid_type", "stream"),
        (COMPLETIONS, _completion(user=["x"]), 400, "invalid_type", "user"),
        (COMPLETIONS, _completion(temperature="0.5"), 400, "invalid_type", "temperature"),
        (COMPLETIONS, _completion(temperature=True), 400, "invalid_type", "temperature"),
        (COMPLETIONS, _completion(seed=1.5), 400, "invalid_type", "seed"),
        (COMPLETIONS, _completion(ignore_eos=1), 400, "invalid_type", "ignore_eos"),
        (CHAT, _chat(response_format="json"), 400, "invalid_type", "response_format"),
        (
            COMPLETIONS,
            _completion(stop_token_ids=["2"]),
            400,
            "invalid_type",
            "stop_token_ids[0]",
        ),
        (COMPLETIONS, _completion(logit_bias={"1": "x"}), 400, "invalid_type", "logit_bias.1"),
        (CHAT, _chat(messages=["hi"]), 400, "invalid_value", "messages[0]"),
        (
            COMPLETIONS,
            b'{"model": "demo", "prompt": "a", "prompt": "b"}',
            400,
            "duplicate_key",
            "prompt",
        ),
        (COMPLETIONS, b"{not json", 400, "invalid_json", None),
        (COMPLETIONS, b"[1, 2]", 400, "invalid_json", None),
        (COMPLETIONS, b"\xff\xfe", 400, "invalid_json", None),
        (COMPLETIONS, _completion(user=[[[[[[[[["deep"]]]]]]]]]), 400, "json_too_deep", None),
        (COMPLETIONS, b"[" * 100000 + b"]" * 100000, 400, "json_too_deep", None),
    ],
)
def test_each_limit_rejects_with_an_openai_error(
    route: bytes, body: Any, status: int, code: str, param: str | None
) -> None:
    with pytest.raises(Rejected) as info:
        _check(route, body)
    assert (info.value.status, info.value.code, info.value.param) == (status, code, param)
    assert info.value.message


@pytest.mark.parametrize("ctype", [b"text/plain", b"", b"application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(ctype: bytes) -> None:
    with pytest.raises(Rejected) as info:
        _check(COMPLETIONS, _completion(), ctype=ctype)
    assert info.value.status == 415


def test_default_is_injected_and_the_body_is_re_serialised() -> None:
    checked = _check(COMPLETIONS, b'{ "model" : "demo", "prompt": "hi" }')
    assert json.loads(checked.body) == {"model": "demo", "prompt": "hi", "max_tokens": 64}
    assert (checked.tokens_asked, checked.tokens_allowed) == (None, 64)
    chat = _check(CHAT, _chat())
    assert json.loads(chat.body)["max_completion_tokens"] == 64
    small = LimitsSection(max_tokens=64, default_max_tokens=16)
    assert json.loads(_check(COMPLETIONS, _completion(), small).body)["max_tokens"] == 16
    with_charset = _check(CHAT, _chat(), ctype=b"application/json; charset=utf-8")
    assert with_charset.tokens_allowed == 64


def test_clamp_policy_lowers_the_request_to_the_cap() -> None:
    clamp = LimitsSection(max_tokens=64, max_tokens_policy="clamp")
    checked = _check(CHAT, _chat(max_tokens=500, max_completion_tokens=1000), clamp)
    body = json.loads(checked.body)
    assert body["max_tokens"] == body["max_completion_tokens"] == 64
    assert (checked.tokens_asked, checked.tokens_allowed) == (1000, 64)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "best_of",
        "logprobs",
        "top_logprobs",
        "stop",
        "stream",
        "min_tokens",
        "stop_token_ids",
        "logit_bias",
        "guided_json",
        "echo",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    route=st.sampled_from([COMPLETIONS, CHAT]),
    body=st.dictionaries(_keys, _values, max_size=8),
    policy=st.sampled_from(["reject", "clamp"]),
)
def test_fuzz_never_crashes_and_never_forwards_a_body_over_a_cap(
    route: bytes, body: dict[str, Any], policy: str
) -> None:
    body.setdefault("model", "demo")
    limits = LimitsSection(
        max_tokens=64,
        max_tokens_policy=policy,
        max_n=2,
        max_logprobs=3,
        max_prompts=2,
        max_prompt_bytes=200,
        max_stop=2,
    )
    try:
        checked = _check(route, body, limits)
    except Rejected as rej:
        assert rej.status in (400, 404, 415)
        return
    sent = json.loads(checked.body)
    for name in ("max_tokens", "max_completion_tokens"):
        assert sent.get(name) is None or 1 <= sent[name] <= 64
    assert any(sent.get(n) for n in ("max_tokens", "max_completion_tokens"))
    assert (sent.get("n") or 1) <= 2 and (sent.get("best_of") or 1) <= 2
    assert sent.get("min_tokens") is None or sent["min_tokens"] <= 64
    stops = sent.get("stop")
    assert stops is None or isinstance(stops, str) or len(stops) <= 2
    assert sent["model"] == "demo"


def _nesting(value: Any) -> int:
    """The plain recursive definition that `_depth` walks iteratively."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    return 1


_json = json_values(max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.text(max_size=3), _json, max_size=4) | st.lists(_json, max_size=4))
def test_depth_counts_every_level_of_nesting(value: dict[str, Any] | list[Any]) -> None:
    assert _depth(value) == _nesting(value)


@pytest.mark.parametrize("depth", [7, 8, 9])
def test_the_depth_cap_is_exact(depth: int) -> None:
    """max_json_depth=8 here: a body nested 8 deep passes, 9 deep is refused (a JSON schema
    is the one place where a request may nest at will)."""
    limits = LIMITS.model_copy(update={"structured_outputs": SCHEMAS})
    nested: Any = "x"
    while True:
        body = _chat(
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": nested}}
        )
        if _nesting(body) >= depth:
            break
        nested = {"a": nested}
    assert _nesting(body) == depth
    if depth <= 8:
        assert _check(CHAT, body, limits).body
    else:
        with pytest.raises(Rejected) as err:
            _check(CHAT, body, limits)
        assert err.value.code == "json_too_deep"


@pytest.mark.parametrize(
    "encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"]
)
def test_json_in_any_encoding_that_json_loads_reads_is_read(encoding: str) -> None:
    body = json.dumps({"model": "demo", "prompt": "h\u00e9"}, ensure_ascii=False)
    checked = check(COMPLETIONS, b"application/json", body.encode(encoding), LIMITS, "demo")
    assert json.loads(checked.body)["prompt"] == "h\u00e9"


@given(st.one_of(st.none(), st.text(), st.lists(st.text(), max_size=3), json_values(8)))
def test_the_prompt_size_is_its_json_size(value: Any) -> None:
    """The quick count for plain strings agrees with the JSON that max_prompt_bytes means
    (quotes, backslashes, control and non-ASCII characters escaped)."""
    assert _json_bytes(value) == len(json.dumps(value).encode())


def test_type_and_model_errors_say_what_to_send() -> None:
    with pytest.raises(Rejected) as info:
        _check(COMPLETIONS, _completion(temperature="0.5"))
    assert info.value.message == "'temperature' must be a number or null"
    with pytest.raises(Rejected) as info:
        _check(COMPLETIONS, _completion(model="gpt-4"))
    assert "'gpt-4'" in info.value.message and "serves 'demo'" in info.value.message


def test_every_typed_parameter_passes_with_its_type_or_null() -> None:
    """The type checks refuse only wrong types: integers are numbers, null is unset."""
    body = _completion(
        user="u",
        suffix="s",
        seed=1,
        top_k=-1,
        stream=True,
        stream_options={"include_usage": True},
        temperature=1,
        top_p=0.9,
        frequency_penalty=0.0,
        presence_penalty=None,
        min_p=0.1,
        repetition_penalty=1.1,
        ignore_eos=False,
        echo=None,
        skip_special_tokens=True,
        spaces_between_special_tokens=True,
        include_stop_str_in_output=False,
        stop_token_ids=[2],
        logit_bias={"1": -100},
    )
    sent = json.loads(_check(COMPLETIONS, body).body)
    # null is unset: it is not forwarded, and the engine's default applies
    assert {k: v for k, v in sent.items() if k != "max_tokens"} == {
        k: v for k, v in body.items() if v is not None
    }
    chat = _chat(response_format={"type": "json_object"}, seed=None, stream=None)
    checked = _check(CHAT, chat, LIMITS.model_copy(update={"structured_outputs": SCHEMAS}))
    assert json.loads(checked.body)["response_format"] == {"type": "json_object"}
    assert checked.stream is False  # null: not streamed, as vLLM reads it


# -- the positive model: what a request may contain, at every level -------------------------
MEDIA = LIMITS.model_copy(
    update={
        "max_prompt_bytes": 1 << 20,
        "media": MediaSection(parts=["image_url", "input_audio"], max_parts=2, max_part_bytes=2048),
    }
)
STRUCTURED = LIMITS.model_copy(
    update={
        "max_prompt_bytes": 4096,
        "max_json_depth": 32,
        "structured_outputs": StructuredOutputsSection(
            allow="json_schema", max_schema_bytes=512, max_schema_depth=5, max_schema_properties=4
        ),
    }
)
PNG = "data:image/png;base64," + "iVBORw0KGgo" + "A" * 49  # 60 base64 characters


def _user(*parts: dict[str, Any]) -> dict[str, Any]:
    return _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, *parts]}])


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _schema(schema: Any) -> dict[str, Any]:
    return _chat(
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )


@pytest.mark.parametrize(
    ("route", "body", "limits", "code", "param"),
    [
        # numbers: JSON's, finite, in vLLM's ranges
        (
            COMPLETIONS,
            b'{"model":"demo","prompt":"a","temperature":NaN}',
            LIMITS,
            "invalid_json",
            None,
        ),
        (
            COMPLETIONS,
            b'{"model":"demo","prompt":"a","top_p":Infinity}',
            LIMITS,
            "invalid_json",
            None,
        ),
        (
            COMPLETIONS,
            b'{"model":"demo","prompt":"a","top_p":-Infinity}',
            LIMITS,
            "invalid_json",
            None,
        ),
        (COMPLETIONS, b'{"model":"demo","prompt":"a","min_p":1e400}', LIMITS, "invalid_json", None),
        (
            COMPLETIONS,
            b'{"model":"demo","prompt":"a","seed":' + b"9" * 4000 + b"}",
            LIMITS,
            "invalid_value",
            "seed",
        ),
        (
            COMPLETIONS,
            b'{"model":"demo","prompt":"a","seed":' + b"9" * 5000 + b"}",
            LIMITS,
            "invalid_json",
            None,
        ),
        (COMPLETIONS, _completion(seed=1 << 64), LIMITS, "invalid_value", "seed"),
        (COMPLETIONS, _completion(min_p=-5), LIMITS, "invalid_value", "min_p"),
        (
            COMPLETIONS,
            _completion(presence_penalty=1e308),
            LIMITS,
            "invalid_value",
            "presence_penalty",
        ),
        (
            COMPLETIONS,
            _completion(frequency_penalty=-2.5),
            LIMITS,
            "invalid_value",
            "frequency_penalty",
        ),
        (COMPLETIONS, _completion(temperature=2.01), LIMITS, "invalid_value", "temperature"),
        (COMPLETIONS, _completion(top_p=0), LIMITS, "invalid_value", "top_p"),
        (COMPLETIONS, _completion(top_k=-2), LIMITS, "invalid_value", "top_k"),
        (
            COMPLETIONS,
            _completion(repetition_penalty=0),
            LIMITS,
            "invalid_value",
            "repetition_penalty",
        ),
        (COMPLETIONS, _completion(logit_bias={"1": 101}), LIMITS, "invalid_value", "logit_bias.1"),
        (
            COMPLETIONS,
            _completion(stream_options={"include_usage": 1}),
            LIMITS,
            "invalid_type",
            "stream_options.include_usage",
        ),
        (
            COMPLETIONS,
            _completion(stream_options={"x": True}),
            LIMITS,
            "unsupported_parameter",
            "stream_options.x",
        ),
        # token ids: integers (never booleans) of the model's vocabulary
        (COMPLETIONS, _completion(prompt=[-1]), LIMITS, "invalid_value", "prompt"),
        (COMPLETIONS, _completion(prompt=[10**30]), LIMITS, "invalid_value", "prompt"),
        (COMPLETIONS, _completion(prompt=[VOCAB]), LIMITS, "invalid_value", "prompt"),
        (COMPLETIONS, _completion(prompt=[[1, True]]), LIMITS, "invalid_type", "prompt"),
        (COMPLETIONS, _completion(prompt=[True]), LIMITS, "invalid_type", "prompt"),
        (COMPLETIONS, _completion(prompt=[[]]), LIMITS, "invalid_type", "prompt"),
        (
            COMPLETIONS,
            _completion(stop_token_ids=[-1]),
            LIMITS,
            "invalid_value",
            "stop_token_ids[0]",
        ),
        (
            COMPLETIONS,
            _completion(stop_token_ids=[VOCAB]),
            LIMITS,
            "invalid_value",
            "stop_token_ids",
        ),
        (COMPLETIONS, _completion(logit_bias={"-5": 1}), LIMITS, "invalid_value", "logit_bias"),
        (COMPLETIONS, _completion(logit_bias={"abc": 1}), LIMITS, "invalid_value", "logit_bias"),
        (COMPLETIONS, _completion(logit_bias={"01": 1}), LIMITS, "invalid_value", "logit_bias"),
        (
            COMPLETIONS,
            _completion(logit_bias={str(VOCAB): 1}),
            LIMITS,
            "invalid_value",
            "logit_bias",
        ),
        # strings: text, never a lone surrogate, escaped or raw
        (COMPLETIONS, b'{"model":"demo","prompt":"a\\ud800"}', LIMITS, "invalid_string", None),
        (
            CHAT,
            b'{"model":"demo","messages":[{"role":"user","content":"\\udfff"}]}',
            LIMITS,
            "invalid_string",
            None,
        ),
        (COMPLETIONS, b'{"model":"demo","prompt":"a\xed\xa0\x80"}', LIMITS, "invalid_json", None),
        # messages: known roles and keys only
        (
            CHAT,
            _chat(messages=[{"role": "function", "content": "x", "name": "f"}]),
            LIMITS,
            "invalid_value",
            "messages[0]",
        ),
        (
            CHAT,
            _chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
            LIMITS,
            "unsupported_parameter",
            "messages[0].tool_calls",
        ),
        (
            CHAT,
            _chat(messages=[{"role": "user", "content": "x", "x": 1}]),
            LIMITS,
            "unsupported_parameter",
            "messages[0].x",
        ),
        (CHAT, _chat(messages=[{"role": "user"}]), LIMITS, "invalid_value", "messages[0].content"),
        (
            CHAT,
            _chat(messages=[{"role": "user", "content": None}]),
            LIMITS,
            "invalid_value",
            "messages[0].content",
        ),
        (
            CHAT,
            _chat(messages=[{"role": "user", "content": []}]),
            LIMITS,
            "invalid_value",
            "messages[0].content",
        ),
        (
            CHAT,
            _chat(messages=[{"role": "user", "content": "x", "name": "n" * 65}]),
            LIMITS,
            "invalid_value",
            "messages[0].name",
        ),
        (
            CHAT,
            _user({"type": "text", "text": "x", "cache": 1}),
            LIMITS,
            "unsupported_parameter",
            "messages[0].content[1].cache",
        ),
        # media: off by default; when on, inline data of the right kind, within caps
        (CHAT, _user(_image(PNG)), LIMITS, "media_not_allowed", "messages[0].content[1]"),
        (
            CHAT,
            _user({"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}),
            MEDIA,
            "media_not_allowed",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user({"type": "image_embeds", "image_embeds": "AAAA"}),
            MEDIA,
            "invalid_value",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user({"type": "file", "file": {"file_data": "AAAA"}}),
            MEDIA,
            "invalid_value",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image("http://169.254.169.254/latest/meta-data")),
            MEDIA,
            "media_url_not_allowed",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image("file:///etc/passwd")),
            MEDIA,
            "media_url_not_allowed",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image("data:text/html;base64,AAAA")),
            MEDIA,
            "media_url_not_allowed",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image("data:image/png,notbase64")),
            MEDIA,
            "media_url_not_allowed",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image("data:image/png;base64,A*AA")),
            MEDIA,
            "invalid_value",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image("data:image/png;base64," + "A" * 4096)),
            MEDIA,
            "limit_exceeded",
            "messages[0].content[1]",
        ),
        (
            CHAT,
            _user(_image(PNG), _image(PNG), _image(PNG)),
            MEDIA,
            "limit_exceeded",
            "messages[0].content[3]",
        ),
        (
            CHAT,
            _user({"type": "image_url", "image_url": {"url": PNG, "x": 1}}),
            MEDIA,
            "unsupported_parameter",
            "messages[0].content[1].image_url.x",
        ),
        (
            CHAT,
            _chat(messages=[{"role": "system", "content": [_image(PNG)]}]),
            MEDIA,
            "invalid_value",
            "messages[0].content[0]",
        ),
        # structured outputs: off by default; when on, bounded schemas and no regexes
        (
            CHAT,
            _chat(response_format={"type": "json_object"}),
            LIMITS,
            "structured_outputs_not_allowed",
            "response_format",
        ),
        (
            CHAT,
            _schema({"type": "object"}),
            LIMITS.model_copy(
                update={"structured_outputs": StructuredOutputsSection(allow="json_object")}
            ),
            "structured_outputs_not_allowed",
            "response_format",
        ),
        (
            CHAT,
            _chat(response_format={"type": "structural_tag", "format": {}}),
            STRUCTURED,
            "invalid_value",
            "response_format.type",
        ),
        (
            CHAT,
            _chat(response_format={"type": "json_schema"}),
            STRUCTURED,
            "invalid_value",
            "response_format.json_schema",
        ),
        (
            CHAT,
            _chat(
                response_format={"type": "json_object", "json_schema": {"name": "s", "schema": {}}}
            ),
            STRUCTURED,
            "invalid_value",
            "response_format.json_schema",
        ),
        (
            CHAT,
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {}, "x": 1},
                }
            ),
            STRUCTURED,
            "unsupported_parameter",
            "response_format.json_schema.x",
        ),
        (
            CHAT,
            _schema({"type": "string", "pattern": "(a+)+$"}),
            STRUCTURED,
            "structured_outputs_not_allowed",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"type": "object", "patternProperties": {"^a": {}}}),
            STRUCTURED,
            "structured_outputs_not_allowed",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"items": [{"pattern": "x"}]}),
            STRUCTURED,
            "structured_outputs_not_allowed",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"properties": {f"p{i}": {} for i in range(5)}}),
            STRUCTURED,
            "limit_exceeded",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"$defs": {"a": {"properties": {f"p{i}": {} for i in range(5)}}}}),
            STRUCTURED,
            "limit_exceeded",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"a": {"b": {"c": {"d": {"e": 1}}}}}),
            STRUCTURED,
            "limit_exceeded",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"description": "x" * 600}),
            STRUCTURED,
            "limit_exceeded",
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            _schema({"type": "integer", "multipleOf": 3, "x-guidance": {"item_separator": ","}}),
            STRUCTURED,
            "structured_outputs_not_allowed",
            "response_format.json_schema.schema",
        ),
    ],
)
def test_what_the_model_of_a_request_does_not_hold_is_refused(
    route: bytes, body: Any, limits: LimitsSection, code: str, param: str | None
) -> None:
    with pytest.raises(Rejected) as info:
        _check(route, body, limits)
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)
    assert info.value.message


def test_token_ids_are_refused_when_the_model_names_no_vocabulary() -> None:
    for body in (_completion(prompt=[1, 2]), _completion(stop_token_ids=[1])):
        with pytest.raises(Rejected) as info:
            _check(COMPLETIONS, body, vocab_size=None)
        assert "names no vocab_size" in info.value.message
    assert _check(COMPLETIONS, _completion(prompt="text"), vocab_size=None).body


def test_refusals_of_a_switched_off_feature_name_the_switch() -> None:
    with pytest.raises(Rejected) as info:
        _check(CHAT, _user(_image(PNG)))
    assert "limits.media.parts" in info.value.message
    with pytest.raises(Rejected) as info:
        _check(CHAT, _schema({"type": "object"}))
    assert "limits.structured_outputs.allow" in info.value.message


def test_what_the_model_holds_is_forwarded_as_strict_json() -> None:
    accepted = [
        (COMPLETIONS, _completion(prompt=[0, VOCAB - 1], logit_bias={"0": -100, "999": 100.0})),
        (
            COMPLETIONS,
            _completion(prompt=[[1, 2], [3]], stop_token_ids=[VOCAB - 1], seed=-(1 << 63)),
        ),
        (COMPLETIONS, _completion(prompt="\U0001f600 \u2028 é", suffix="end", top_k=0)),
        (
            CHAT,
            _chat(
                messages=[
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": "\U0001f600", "name": "u"},
                    {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                ]
            ),
        ),
        (
            CHAT,
            _user(
                _image(PNG),
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ),
        ),
        (
            CHAT,
            _schema(
                {
                    "type": "object",
                    "properties": {
                        "pattern": {"type": "string"},
                        "b": {"type": "integer", "maximum": 10},
                    },
                }
            ),
        ),
        (
            CHAT,
            _chat(
                response_format={"type": "text"},
                stream=True,
                stream_options={"include_usage": True},
            ),
        ),
    ]
    limits = STRUCTURED.model_copy(update={"media": MEDIA.media, "max_prompt_bytes": 1 << 20})
    for route, body in accepted:
        sent = _check(route, body, limits).body
        strict = json.loads(sent, parse_constant=lambda name: pytest.fail(name))
        assert {k: v for k, v in strict.items() if not k.startswith("max_")} == body
        sent.decode("utf-8")  # raises on a lone surrogate
    # A surrogate pair, escaped, is one character: it passes, forwarded as UTF-8.
    sent = _check(COMPLETIONS, b'{"model":"demo","prompt":"\\ud83d\\ude00"}').body
    assert json.loads(sent)["prompt"] == "\U0001f600" and "\U0001f600".encode() in sent


def test_the_schema_counts_in_the_prompt_budget() -> None:
    schema = {"type": "object", "description": "x" * 350}
    small = STRUCTURED.model_copy(update={"max_prompt_bytes": 400})
    assert _check(CHAT, _schema(schema), STRUCTURED).body
    with pytest.raises(Rejected) as info:
        _check(CHAT, _schema(schema), small)
    assert (info.value.code, info.value.param) == ("limit_exceeded", "messages")


# -- function calling: limits.tools --------------------------------------------------------
TOOLS = STRUCTURED.model_copy(
    update={"tools": ToolsSection(allow=True, max_tools=2), "max_prompt_bytes": 2048}
)
NO_GRAMMAR = TOOLS.model_copy(update={"structured_outputs": StructuredOutputsSection()})
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def _called(arguments: str = '{"city": "Oslo"}', answers: str = "call_1") -> dict[str, Any]:
    """A conversation in which the model called a tool and the tool answered."""
    return _chat(
        messages=[
            {"role": "user", "content": "weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "content": "12 C, rain", "tool_call_id": answers},
        ],
        tools=[WEATHER],
        tool_choice="none",
    )


def _properties(count: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(count)}}


def _nested(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


@pytest.mark.parametrize(
    ("body", "limits", "code", "param"),
    [
        # off unless limits.tools.allow, whichever part of it a request uses
        (_chat(tools=[WEATHER], tool_choice="none"), STRUCTURED, "tools_not_allowed", "tools"),
        (_chat(tool_choice="none"), STRUCTURED, "tools_not_allowed", "tool_choice"),
        (_called(), STRUCTURED, "tools_not_allowed", "tools"),
        (
            {**_called(), "tools": None, "tool_choice": None},
            STRUCTURED,
            "tools_not_allowed",
            "messages[1]",
        ),
        # the tools
        (_chat(tools=[]), TOOLS, "invalid_value", "tools"),
        (_chat(tools=[WEATHER] * 3, tool_choice="none"), TOOLS, "limit_exceeded", "tools"),
        (
            _chat(tools=[WEATHER, WEATHER], tool_choice="none"),
            TOOLS,
            "invalid_value",
            "tools[1].function.name",
        ),
        (_chat(tools=[_tool("get weather")]), TOOLS, "invalid_value", "tools[0].function.name"),
        (
            _chat(tools=[{"type": "custom", "function": {"name": "f"}}]),
            TOOLS,
            "invalid_value",
            "tools[0].type",
        ),
        (
            _chat(tools=[{**WEATHER, "defer_loading": True}]),
            TOOLS,
            "unsupported_parameter",
            "tools[0].defer_loading",
        ),
        (
            _chat(tools=[_tool("f", {"type": "string", "pattern": "(a+)+$"})], tool_choice="none"),
            TOOLS,
            "structured_outputs_not_allowed",
            "tools[0].function.parameters",
        ),
        (
            _chat(tools=[_tool("f", json.loads(_nested(6)))], tool_choice="none"),
            TOOLS,
            "limit_exceeded",
            "tools[0].function.parameters",
        ),
        (
            _chat(tools=[_tool("f", {"description": "x" * 2000})], tool_choice="none"),
            TOOLS.model_copy(update={"structured_outputs": SCHEMAS}),
            "limit_exceeded",
            "tools",  # the tools are prompt: they count in max_prompt_bytes
        ),
        # the choice among them
        (_chat(tool_choice="required"), TOOLS, "invalid_value", "tool_choice"),
        (_chat(parallel_tool_calls=False), TOOLS, "invalid_value", "parallel_tool_calls"),
        (_chat(tools=[WEATHER], tool_choice="any"), TOOLS, "invalid_value", "tool_choice"),
        (
            _chat(tools=[WEATHER], tool_choice="required"),
            NO_GRAMMAR,
            "structured_outputs_not_allowed",
            "tool_choice",
        ),
        (
            _chat(
                tools=[WEATHER, {"type": "function", "function": {"name": "f", "strict": True}}],
                tool_choice="none",
            ),
            NO_GRAMMAR,
            "structured_outputs_not_allowed",
            "tools[1].function.strict",
        ),
        # vLLM's parsers build grammars for "auto" too (parallel_tool_calls = false; glm47)
        (_chat(tools=[WEATHER]), NO_GRAMMAR, "structured_outputs_not_allowed", "tools"),
        (
            _chat(tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False),
            NO_GRAMMAR,
            "structured_outputs_not_allowed",
            "tool_choice",
        ),
        # extension keywords steer the grammar compiler (llguidance's x-guidance: regexes)
        (
            _chat(
                tools=[_tool("f", {"type": "integer", "x-guidance": {"whitespace_pattern": "a+"}})]
            ),
            TOOLS,
            "structured_outputs_not_allowed",
            "tools[0].function.parameters",
        ),
        # a response format's schema and the tools' end up in one grammar: capped together
        (
            _chat(
                tools=[_tool("f", _properties(3))],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": _properties(3)},
                },
            ),
            TOOLS,
            "limit_exceeded",
            "tools[0].function.parameters",
        ),
        (
            _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "f"}}),
            TOOLS,
            "invalid_value",
            "tool_choice.function.name",
        ),
        (
            _chat(
                tools=[WEATHER],
                tool_choice="required",
                response_format={"type": "json_object"},
            ),
            TOOLS,
            "invalid_value",
            "response_format",
        ),
        # the conversation: calls made, results given
        (
            _chat(messages=[{"role": "assistant", "content": None}]),
            TOOLS,
            "invalid_value",
            "messages[0]",
        ),
        (
            _called("not json"),
            TOOLS,
            "invalid_json",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            _called('["Oslo"]'),
            TOOLS,
            "invalid_value",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            _called('{"city": "Oslo", "city": "Bergen"}'),
            TOOLS,
            "duplicate_key",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            _called(_nested(40)),
            TOOLS,
            "json_too_deep",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            _called('{"t": NaN}'),
            TOOLS,
            "invalid_json",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (_called(answers="call_2"), TOOLS, "invalid_value", "messages[2].tool_call_id"),
        (
            {**_called(), "messages": [*_called()["messages"][:2], *_called()["messages"][1:]]},
            TOOLS,
            "invalid_value",
            "messages[2].tool_calls[0].id",
        ),
        (
            _called('{"city": "\\ud800"}'),  # escaped in the arguments' own JSON
            TOOLS,
            "invalid_string",
            "messages[1].tool_calls[0].function.arguments",
        ),
        # "required" joins every tool's schema into one grammar: the caps hold for all of them
        (
            _chat(
                tools=[_tool("f", _properties(3)), _tool("g", _properties(3))],
                tool_choice="required",
            ),
            TOOLS,
            "limit_exceeded",
            "tools[1].function.parameters",
        ),
        (
            _chat(
                tools=[
                    _tool("f", {"description": "x" * 300}),
                    _tool("g", {"description": "y" * 300}),
                ],
                tool_choice="none",
            ),
            TOOLS,
            "limit_exceeded",
            "tools[1].function.parameters",
        ),
    ],
)
def test_tool_calling_is_refused_outside_limits_tools(
    body: dict[str, Any], limits: LimitsSection, code: str, param: str
) -> None:
    """With the engine's tool-call parser on (engine.vllm.tool_call_parser)."""
    with pytest.raises(Rejected) as info:
        check(CHAT, JSON, json.dumps(body).encode(), limits, ("demo",), VOCAB, True)
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)


@pytest.mark.parametrize(
    "choice", [None, "auto", "required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_choices_other_than_none_need_the_engine_s_tool_call_parser(choice: Any) -> None:
    """Without it, vLLM answers every tool_choice with text and no tool call."""
    body = _chat(tools=[WEATHER], **({} if choice is None else {"tool_choice": choice}))
    with pytest.raises(Rejected) as info:
        _check(CHAT, body, TOOLS)
    param = "tools" if choice is None else "tool_choice"  # what the client sent
    assert (info.value.code, info.value.param) == ("tool_choice_not_allowed", param)
    assert "engine.vllm.enable_auto_tool_choice" in info.value.message
    _check(CHAT, {**body, "tool_choice": "none"}, TOOLS)


@pytest.mark.parametrize(
    ("body", "limits", "tool_parser"),
    [
        (_called(), TOOLS, False),
        (_chat(tools=[WEATHER]), TOOLS, True),  # "auto" by default, the engine parses
        (_chat(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False), NO_GRAMMAR, False),
        (_chat(tools=[WEATHER, _tool("now")], tool_choice="required"), TOOLS, True),
        (
            _chat(
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
            ),
            TOOLS,
            True,
        ),
    ],
)
def test_tool_calling_within_limits_tools_is_forwarded_as_sent(
    body: dict[str, Any], limits: LimitsSection, tool_parser: bool
) -> None:
    raw = json.dumps(body).encode()
    checked = check(CHAT, JSON, raw, limits, ("demo",), VOCAB, tool_parser)
    forwarded = json.loads(checked.body)
    del forwarded["max_completion_tokens"]  # the cap, injected
    assert forwarded == body
