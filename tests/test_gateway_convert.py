"""The HTTP bodies map every field of the protocol's request, and each error lands on its status."""

from __future__ import annotations

import msgspec
import pytest

from executor.gateway import convert
from executor.gateway.errors import error_body
from executor.gateway.openai_types import ChatCompletionBody
from executor.gateway.routing import plan, split_suffix
from protocol import errors as e
from protocol.messages import ChatRequest


def test_every_chat_request_field_is_in_the_http_body_and_mapped() -> None:
    request_fields = set(ChatRequest.__struct_fields__)
    assert request_fields == convert.MAPPED_FIELDS  # a new wire field must be mapped in convert.chat_request
    assert request_fields <= set(ChatCompletionBody.__struct_fields__)


def test_gateway_only_fields_never_reach_the_executor() -> None:
    body = convert.decode_chat(msgspec.json.encode({
        "model": "m:floor", "messages": [{"role": "user", "content": "x"}], "stop": "END",
        "provider": {"sort": "price"}, "models": ["n"], "stream_options": {"include_usage": True},
    }))  # fmt: skip
    job = convert.chat_request(body, "m")
    wire = msgspec.json.decode(msgspec.json.encode(job))
    assert wire == {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["END"]}
    p = plan(body, job)
    assert p.models == ("m", "n") and p.sort == "price" and not p.direct


def test_a_colon_in_a_model_name_is_not_a_suffix() -> None:
    assert split_suffix("qwen2.5:7b") == ("qwen2.5:7b", None)
    assert split_suffix("qwen2.5:7b:nitro") == ("qwen2.5:7b", "throughput")


@pytest.mark.parametrize(("err", "status", "retry"), [
    (e.InvalidRequest("x"), 400, None),
    (e.UnsupportedFeature("x"), 422, None),
    (e.ModelNotFound("x"), 404, None),
    (e.NoExecutors("x", available_models=["a"]), 503, 1),  # no model named: not a 404
    (e.ExecutorBusy("x", retry_after_s=2.5), 503, 2.5),
    (e.RateLimited("x", retry_after_s=7), 429, 7),
    (e.DeadlineExceeded("x"), 504, None),
    (e.BackendUnavailable("x"), 502, None),
    (e.PayloadTooLarge("x"), 413, None),
    (e.InternalError("secret detail"), 500, None),
])  # fmt: skip
def test_each_error_has_its_status(err: e.LloomError, status: int, retry: float | None) -> None:
    got, body, retry_after = error_body(err)
    assert (got, retry_after) == (status, retry)
    if status == 500:
        assert "secret" not in body.error.message


def test_a_model_nobody_serves_is_404_naming_the_served_ones() -> None:
    status, body, _ = error_body(e.NoExecutors("no executor serves model 'x'", available_models=["a", "b"]), "x")
    assert status == 404 and "a, b" in body.error.message and body.error.code == "model_not_found"
