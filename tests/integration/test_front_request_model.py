"""The request model through the real front (mTLS, uvicorn, the recording stand-in engine of
tests/support/front.py): each class of hostile body gets its status and error code, leaves a
`request_rejected` audit event naming the reason, and the engine receives nothing; what the
model holds reaches the engine as strict JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.front import Front, audit_events

VOCAB = 100
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="
MEDIA_ON = {"media": {"parts": ["image_url"]}, "structured_outputs": {"allow": "json_object"}}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **extra}


def _user_parts(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": list(parts)}]}


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _post(front: Front, route: str, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(verify=front.ctx(), timeout=10) as client:
        return client.post(
            f"{front.url}{route}", content=content, headers={"content-type": "application/json"}
        )


@pytest.mark.parametrize(
    ("route", "body", "code"),
    [
        (
            "/v1/chat/completions",
            _chat(response_format={"type": "json_object"}),
            "structured_outputs_not_allowed",
        ),
        (
            "/v1/chat/completions",
            _chat(response_format={"type": "structural_tag", "format": {"type": "grammar"}}),
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            _user_parts(_image("http://169.254.169.254/latest/meta-data/")),
            "media_not_allowed",
        ),
        (
            "/v1/chat/completions",
            _user_parts({"type": "image_embeds", "image_embeds": "AAAA"}),
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            _chat(messages=[{"role": "user", "content": "x", "unknown": 1}]),
            "unsupported_parameter",
        ),
        ("/v1/completions", b'{"model":"demo","prompt":"a","temperature":NaN}', "invalid_json"),
        ("/v1/completions", b'{"model":"demo","prompt":"a","min_p":1e400}', "invalid_json"),
        (
            "/v1/completions",
            {"model": "demo", "prompt": "a", "presence_penalty": 1e308},
            "invalid_value",
        ),
        ("/v1/completions", {"model": "demo", "prompt": [-1, 10**30]}, "invalid_value"),
        (
            "/v1/completions",
            {"model": "demo", "prompt": [1, 2], "stop_token_ids": [VOCAB]},
            "invalid_value",
        ),
        (
            "/v1/completions",
            {"model": "demo", "prompt": "a", "logit_bias": {"abc": 1}},
            "invalid_value",
        ),
        ("/v1/completions", {"model": "demo", "prompt": [[1, True]]}, "invalid_type"),
        ("/v1/completions", b'{"model":"demo","prompt":"\\ud800"}', "invalid_string"),
        ("/v1/completions", b'{"model":"demo","prompt":"\xed\xa0\x80"}', "invalid_json"),
    ],
)
def test_hostile_bodies_are_refused_audited_and_never_reach_the_engine(
    make_front: Callable[..., Front], route: str, body: bytes | dict[str, Any], code: str
) -> None:
    front = make_front(vocab_size=VOCAB)
    response = _post(front, route, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert front.upstream.seen == []
    [event] = audit_events(front, "request_rejected")
    assert event["reason"] == code and event["status"] == 400 and event["route"] == route


def test_media_off_means_refused_and_on_means_inline_data_only(
    make_front: Callable[..., Front],
) -> None:
    front = make_front(vocab_size=VOCAB, limits=MEDIA_ON)
    for url in ("http://169.254.169.254/", "file:///etc/passwd", "data:text/html;base64,AAAA"):
        response = _post(front, "/v1/chat/completions", _user_parts(_image(url)))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "media_url_not_allowed"
    assert front.upstream.seen == []
    body = _user_parts({"type": "text", "text": "what is this?"}, _image(PNG))
    body["response_format"] = {"type": "json_object"}
    front.upstream.gate.set()  # the stand-in engine streams its whole answer at once
    assert _post(front, "/v1/chat/completions", body).status_code == 200
    [seen] = front.upstream.seen
    sent = json.loads(seen["body"], parse_constant=lambda name: pytest.fail(name))
    assert sent["messages"] == body["messages"]
    assert sent["response_format"] == {"type": "json_object"}


def test_token_ids_of_the_vocabulary_are_forwarded_unchanged(
    make_front: Callable[..., Front],
) -> None:
    front = make_front(vocab_size=VOCAB)
    body = {"model": "demo", "prompt": [0, VOCAB - 1], "logit_bias": {"5": -100}}
    assert _post(front, "/v1/completions", body).status_code == 200
    [seen] = front.upstream.seen
    sent = json.loads(seen["body"])
    assert sent["prompt"] == [0, VOCAB - 1] and sent["logit_bias"] == {"5": -100}
