"""The quick path for flat requests (request_model.fits_flat) against the models it is derived
from: it may say "fits" only where the models accept the body."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.front.flat_requests import _scalar_checks, fits_flat
from runtime.front.request_model import ALLOWED_PARAMS, MODELS, CompletionRequest

COMPLETIONS = b"/v1/completions"
CHAT = b"/v1/chat/completions"
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-3, max_value=3),
    st.sampled_from([0.0, 1.0, 2.0, -2.0, 10.0, 100.0, -100.0, 2**63, -(2**63), 2**31 - 1]),
    st.text(max_size=300),
    st.lists(st.integers(), max_size=2),
)


def _accepted(route: bytes, body: dict[str, Any]) -> bool:
    try:
        MODELS[route].model_validate(body)
    except ValidationError:
        return False
    return True


@settings(max_examples=400)
@given(
    st.sampled_from([COMPLETIONS, CHAT]).flatmap(
        lambda route: st.tuples(
            st.just(route),
            st.dictionaries(st.sampled_from(sorted(ALLOWED_PARAMS[route])), SCALARS, max_size=6),
        )
    )
)
def test_the_quick_path_says_fits_only_where_the_model_accepts(case: Any) -> None:
    route, body = case
    if fits_flat(route, body):
        assert _accepted(route, body), body


@pytest.mark.parametrize(
    "body",
    [
        {"model": "demo", "prompt": "hello", "max_tokens": 16, "stream": False},
        {"model": "demo", "prompt": [1, 2], "temperature": 0, "top_p": 1, "seed": -5, "n": 2},
        {"prompt": "x", "stop": ["a"], "ignore_eos": True, "user": "u" * 256, "min_p": 0.5},
    ],
)
def test_flat_completions_take_the_quick_path(body: dict[str, Any]) -> None:
    assert _accepted(COMPLETIONS, body)
    assert fits_flat(COMPLETIONS, body)


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 2.5},  # out of range
        {"top_p": 0},  # gt, not ge
        {"n": True},  # a boolean is not an integer
        {"temperature": "1"},  # a string is not a number
        {"user": "u" * 257},  # too long
        {"seed": 1 << 63},  # past int64
        {"stream_options": {"include_usage": True}},  # an object: the model's to check
        {"logit_bias": {"1": 1}},
        {"unknown": 1},
    ],
)
def test_anything_else_goes_to_the_model(body: dict[str, Any]) -> None:
    assert not fits_flat(COMPLETIONS, body)


def test_chat_requests_always_go_to_the_model() -> None:
    """`messages` is required and a list of objects: never flat."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    assert _accepted(CHAT, body)
    assert not fits_flat(CHAT, body)


def test_a_field_or_model_with_a_validator_of_its_own_is_left_to_the_model() -> None:
    """The quick path knows types and bounds only: what a validator checks, it cannot."""

    class Checked(CompletionRequest):
        @field_validator("temperature")
        @classmethod
        def _temperature(cls, value: float) -> float:
            return value

    class Whole(CompletionRequest):
        @model_validator(mode="after")
        def _whole(self) -> Whole:
            return self

    checks = _scalar_checks(Checked)
    assert checks is not None and "temperature" not in checks and "top_p" in checks
    assert _scalar_checks(Whole) is None


def test_an_integer_in_a_number_field_bounded_one_way_is_left_to_the_model() -> None:
    """The models refuse an integer too large for a float (2**1024); the quick path takes
    integers as numbers only where both bounds keep them small."""

    class LowerOnly(BaseModel):
        model_config = ConfigDict(strict=True, allow_inf_nan=False)
        weight: Annotated[float, Field(ge=0, gt=-1)] | None = None

    checks = _scalar_checks(LowerOnly)
    assert checks is not None and checks["weight"][0] == (float,)
    with pytest.raises(ValidationError):
        LowerOnly.model_validate({"weight": 2**1024})
    # The models' own numbers are bounded both ways: integers there take the quick path.
    completions = _scalar_checks(CompletionRequest)
    assert completions is not None and int in completions["temperature"][0]
