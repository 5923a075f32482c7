"""What a request may contain: every parameter and every nested field, typed and ranged. Pure.

The front forwards only requests that fit these models, so the engine parses nothing it was
not expected to: no unknown key at any level, no message role or content part beyond the ones
named here, numbers finite and within vLLM's own ranges (SamplingParams._verify_args) or, where
vLLM has none, a bound that no real request reaches. Strict: `true` is not an integer, `1` is a
number but not a string. What depends on the deployment (the caps in `[limits]`, the model's
vocabulary, the structured-output and media switches) is checked in limits.py on top.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

_INT64 = (-(1 << 63), (1 << 63) - 1)
# Counts and token numbers: far above any cap, below anything that would overflow a C int.
_COUNT = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


# -- chat messages -------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Url(_Strict):
    url: str


class _ImageUrl(_Url):
    detail: Literal["auto", "low", "high"] | None = None


class _InputAudio(_Strict):
    data: str  # base64
    format: Literal["wav", "mp3"]


# Media parts are typed here so that a refusal can name the switch (limits.media) rather than
# call them unknown; whether one may be forwarded is limits.py's decision.
class ImageUrlPart(_Strict):
    type: Literal["image_url"]
    image_url: _ImageUrl


class AudioUrlPart(_Strict):
    type: Literal["audio_url"]
    audio_url: _Url


class VideoUrlPart(_Strict):
    type: Literal["video_url"]
    video_url: _Url


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: _InputAudio


def _tagged(key: str, cases: dict[str, Any], expected: str) -> Any:
    """A union chosen by the value of `key` (a part's `type`, a message's `role`). Its tags
    read `key=value`, so that error paths can leave them out (see _path)."""

    def tag(value: Any) -> str | None:
        found = value.get(key) if isinstance(value, dict) else None
        return f"{key}={found}" if isinstance(found, str) and found in cases else None

    members = tuple(Annotated[model, Tag(f"{key}={name}")] for name, model in cases.items())
    return Annotated[
        Union[members],  # noqa: UP007 - a union built from a tuple
        Discriminator(tag, custom_error_type="invalid_tag", custom_error_message=expected),
    ]


def _content(parts: dict[str, Any]) -> Any:
    """A message's content: a string, or a non-empty list of parts tagged by their `type`."""
    names = ", ".join(parts)
    part = _tagged("type", parts, f"each content part must be an object whose 'type' is {names}")

    def tag(value: Any) -> str | None:
        return (
            "content=text"
            if isinstance(value, str)
            else "content=parts"
            if isinstance(value, list)
            else None
        )

    return Annotated[
        Annotated[str, Tag("content=text")]
        | Annotated[list[part], Field(min_length=1), Tag("content=parts")],  # type: ignore[valid-type]
        Discriminator(
            tag,
            custom_error_type="invalid_content",
            custom_error_message="'content' must be a string or a list of content parts",
        ),
    ]


MEDIA_PARTS: dict[str, type[_Strict]] = {
    "image_url": ImageUrlPart,
    "audio_url": AudioUrlPart,
    "video_url": VideoUrlPart,
    "input_audio": InputAudioPart,
}
_Name = Annotated[str, Field(max_length=64)]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: _content({"text": TextPart})  # type: ignore[valid-type]
    name: _Name | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: _content({"text": TextPart, **MEDIA_PARTS})  # type: ignore[valid-type]
    name: _Name | None = None


# OpenAI's rule for function names; vLLM has none.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_CallId = Annotated[str, Field(min_length=1, max_length=128)]


class _FunctionCall(_Strict):
    name: FunctionName
    arguments: str  # a JSON object as text; limits.py parses it


class ToolCall(_Strict):
    id: _CallId
    type: Literal["function"]
    function: _FunctionCall


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    # Absent or null only in a message that makes tool calls (checked below).
    content: _content({"text": TextPart}) | None = None  # type: ignore[valid-type]
    name: _Name | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and self.tool_calls is None:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: _content({"text": TextPart})  # type: ignore[valid-type]
    tool_call_id: _CallId


Message = _tagged(
    "role",
    {
        "system": SystemMessage,
        "developer": SystemMessage,
        "user": UserMessage,
        "assistant": AssistantMessage,
        "tool": ToolMessage,
    },
    "each message must be an object whose 'role' is system, developer, user, assistant or tool",
)


# -- tools ---------------------------------------------------------------------------------
class _Function(_Strict):
    name: FunctionName
    description: Annotated[str, Field(max_length=4096)] | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema: limits.py checks it
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: _Function


class _Named(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _Named


def _tool_choice(value: Any) -> str | None:
    return "choice=mode" if isinstance(value, str) else "choice=named" if value else None


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("choice=mode")]
    | Annotated[NamedToolChoice, Tag("choice=named")],
    Discriminator(
        _tool_choice,
        custom_error_type="invalid_tool_choice",
        custom_error_message="'tool_choice' must be none, auto, required or "
        '{"type": "function", "function": {"name": ...}}',
    ),
]


# -- response_format -----------------------------------------------------------------------
class _JsonSchema(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, Field(max_length=1024)] | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    # `structural_tag` is not here: its `format` may be a grammar or a regex.
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


# -- the two routes ------------------------------------------------------------------------
_Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
_TopP = Annotated[float, Field(gt=0.0, le=1.0)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
_Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# vLLM only asks for > 0; above 10 every repeated token is all but forbidden.
_RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
_Bias = Annotated[float, Field(ge=-100.0, le=100.0)]  # OpenAI's range; vLLM clamps to it


class _Common(_Strict):
    model: Annotated[str, Field(max_length=256)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    frequency_penalty: _Penalty | None = None
    presence_penalty: _Penalty | None = None
    seed: Annotated[int, Field(ge=_INT64[0], le=_INT64[1])] | None = None
    stop: Any = None  # a string or strings: limits.py counts and sizes them
    user: Annotated[str, Field(max_length=256)] | None = None
    n: _COUNT | None = None
    logit_bias: dict[str, _Bias] | None = None  # keys: token ids, checked in limits.py
    max_tokens: Any = None  # limits.py: the token cap and its policy
    # vLLM's sampling extensions
    top_k: Annotated[int, Field(ge=-1, le=(1 << 31) - 1)] | None = None
    min_p: _Probability | None = None
    repetition_penalty: _RepetitionPenalty | None = None
    min_tokens: _COUNT | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[_COUNT] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


class CompletionRequest(_Common):
    prompt: Any = None  # a string, strings, or token ids: limits.py counts and checks them
    best_of: _COUNT | None = None
    echo: bool | None = None
    logprobs: _COUNT | None = None
    suffix: str | None = None  # fill-in-the-middle; counted with the prompt in limits.py


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: _COUNT | None = None
    max_completion_tokens: Any = None
    response_format: ResponseFormat | None = None
    # Whether these may be used, and how, is limits.tools (limits.py).
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


MODELS: dict[bytes, type[_Common]] = {
    b"/v1/completions": CompletionRequest,
    b"/v1/chat/completions": ChatRequest,
}
ALLOWED_PARAMS: dict[bytes, frozenset[str]] = {
    route: frozenset(field.alias or name for name, field in model.model_fields.items())
    for route, model in MODELS.items()
}

_DESCRIBED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
}


def first_error(err: ValidationError) -> tuple[str, str, str]:
    """(message, code, param) for the first thing wrong, param as a path such as
    `messages[0].content[1].type`."""
    detail = err.errors(include_url=False, include_context=False)[0]
    param = _path(detail["loc"])
    kind = detail["type"]
    if kind == "extra_forbidden":
        return f"Unsupported parameter '{param}'", "unsupported_parameter", param
    if kind in _DESCRIBED:
        nullable = len(detail["loc"]) == 1  # top-level parameters may be null (unset)
        described = _DESCRIBED[kind] + (" or null" if nullable else "")
        return f"'{param}' must be {described}", "invalid_type", param
    if kind == "missing":
        return f"'{param}' is required", "invalid_value", param
    message = detail["msg"].removeprefix("Value error, ")  # a model's own check
    return f"'{param}': {message}", "invalid_value", param


def _path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "=" in part:
            continue  # a union's tag, not a key of the request
        else:
            path += f".{part}" if path else part
    return path
