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


def test_tool_calls_reasoning_and_logprobs_map_to_openai_shapes_the_sdk_parses() -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from executor.gateway.openai_types import encoder
    from executor.gateway.sse import ChunkWriter
    from protocol.chat_types import FunctionCall, FunctionCallDelta, TokenLogprob, ToolCall, ToolCallDelta
    from protocol.messages import ChatResponse, FinishReason, StreamChunk, Usage

    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    reply = ChatResponse(job_id="j1", executor_id="e1", model="m", content="", finish_reason=FinishReason.TOOL_CALLS,
                         usage=Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8, reasoning_tokens=2),
                         tool_calls=[call], reasoning_content="thinking",
                         logprobs=[TokenLogprob(token="a", logprob=-0.5)])  # fmt: skip
    parsed = ChatCompletion.model_validate_json(encoder.encode(convert.chat_completion(reply)))
    message = parsed.choices[0].message
    assert message.content is None and message.tool_calls[0].function.name == "get_weather"
    assert message.model_extra["reasoning_content"] == "thinking"
    assert parsed.choices[0].finish_reason == "tool_calls" and parsed.choices[0].logprobs.content[0].token == "a"
    assert parsed.usage.completion_tokens_details.reasoning_tokens == 2

    writer = ChunkWriter("j1", "m")
    events = [
        writer.chunk(StreamChunk(seq=0, delta="", reasoning="hmm")),
        writer.chunk(StreamChunk(seq=1, delta="", tool_calls=[ToolCallDelta(
            index=0, id="call_1", type="function", function=FunctionCallDelta(name="get_weather", arguments="{"))])),
        writer.chunk(StreamChunk(seq=2, delta="plain")),
    ]  # fmt: skip
    chunks = [ChatCompletionChunk.model_validate_json(e.removeprefix(b"data: ").strip()) for e in events]
    assert chunks[0].choices[0].delta.model_extra["reasoning_content"] == "hmm"
    assert chunks[1].choices[0].delta.tool_calls[0].function.name == "get_weather"
    assert chunks[2].choices[0].delta.content == "plain"
