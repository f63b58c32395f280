"""Tests of the OpenAI-compatible test double, driven by a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.doubles.openai_double import Fault, OpenAIDouble

pytestmark = pytest.mark.asyncio

MODEL = "double-model"
HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there you"}]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_server_errors() -> Iterator[None]:
    # Faults must not make aiohttp log tracebacks: that would be a bug in the
    # double. A handler of our own (rather than caplog, which is per phase)
    # also sees what the double logs while it is being stopped.
    logger, collect = logging.getLogger("aiohttp"), _Collect()
    logger.addHandler(collect)
    try:
        yield
    finally:
        logger.removeHandler(collect)
    assert not collect.records, [r.getMessage() for r in collect.records]


@pytest_asyncio.fixture
async def double() -> AsyncIterator[OpenAIDouble]:
    """Overrides conftest's `double` on purpose: one model and four-token answers, short enough to read whole."""
    async with OpenAIDouble(completion_tokens=4) as d:
        yield d


def chat(double: OpenAIDouble, http: aiohttp.ClientSession, **body: Any) -> Any:
    body.setdefault("model", MODEL)
    body.setdefault("messages", HELLO)
    return http.post(f"{double.base_url}/chat/completions", json=body)


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE response, in arrival order."""
    events: list[str] = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            events.append(line[len(b"data: "):].decode().rstrip("\n"))
    return events


async def test_models_list_follows_mutations(double: OpenAIDouble,
                                             http: aiohttp.ClientSession) -> None:
    assert double.base_url == f"http://127.0.0.1:{double.port}/v1"
    assert double.port != 0
    double.models.append("late-model")
    async with http.get(f"{double.base_url}/models") as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [MODEL, "late-model"]
    assert listing["data"][0] == {"id": MODEL, "object": "model", "created": 0,
                                  "owned_by": "double"}
    async with http.get(f"http://127.0.0.1:{double.port}/health") as resp:
        assert await resp.json() == {"status": "ok"}


async def test_non_stream_completion_shape_and_usage(double: OpenAIDouble,
                                                     http: aiohttp.ClientSession) -> None:
    async with chat(double, http, max_tokens=3) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["id"].startswith("chatcmpl-double-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["choices"] == [{"index": 0,
                                "message": {"role": "assistant", "content": "tok0 tok1 tok2 "},
                                "finish_reason": "length"}]
    # 2 + 3 words of prompt, 3 pieces of completion.
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert double.requests[-1]["max_tokens"] == 3
    assert double.completed == 1 and double.in_flight == 0

    async with chat(double, http, max_tokens=4) as resp:  # == completion_tokens: not cut
        body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4


async def test_stream_with_usage(double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    async with chat(double, http, stream=True,
                    stream_options={"include_usage": True}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:5]]
    assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:5])
    assert chunks[5]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[6]["choices"] == []
    assert chunks[6]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert len(chunks) == 7
    assert double.completed == 1


async def test_stream_without_include_usage_sends_no_usage(
        double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    async with chat(double, http, stream=True, max_tokens=2) as resp:
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 1 + 2 + 1


async def test_stream_chunks_arrive_one_by_one(double: OpenAIDouble,
                                               http: aiohttp.ClientSession) -> None:
    double.faults.append(Fault.slow(0.05))
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    async with chat(double, http, stream=True) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(loop.time())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) == 7 and min(gaps) > 0.03


async def test_api_key_required(http: aiohttp.ClientSession) -> None:
    async with OpenAIDouble(api_key="sekret") as double:
        async with http.get(f"{double.base_url}/models") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with chat(double, http) as resp:
            assert resp.status == 401
            error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_api_key"
        async with http.post(f"{double.base_url}/chat/completions",
                             json={"model": MODEL, "messages": HELLO},
                             headers={"Authorization": "Bearer sekret"}) as resp:
            assert resp.status == 200
        assert double.request_headers[-1]["Authorization"] == "Bearer sekret"


async def test_bad_requests(double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    async with chat(double, http, model="nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == {
            "message": "The model 'nope' does not exist", "type": "invalid_request_error",
            "param": None, "code": "model_not_found"}
    async with chat(double, http, messages=[]) as resp:
        assert resp.status == 400
    async with http.post(f"{double.base_url}/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert "message" in (await resp.json())["error"]


async def test_status_fault_keeps_retry_after(double: OpenAIDouble,
                                              http: aiohttp.ClientSession) -> None:
    double.faults.append(Fault.status(429, "slow down", headers={"Retry-After": "7"},
                                      error_code="rate_limit_exceeded"))
    async with chat(double, http) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        error = (await resp.json())["error"]
    assert error["message"] == "slow down" and error["code"] == "rate_limit_exceeded"


async def test_reset_mid_stream(double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    double.faults.append(Fault.reset(after_chunks=2))
    events: list[str] = []
    with pytest.raises(aiohttp.ClientError):
        async with chat(double, http, stream=True) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line.decode())
    assert len(events) == 3  # role chunk + 2 content chunks, never [DONE]
    assert double.disconnects == 0 and double.completed == 0


async def test_reset_before_response(double: OpenAIDouble,
                                     http: aiohttp.ClientSession) -> None:
    double.faults.append(Fault.reset())
    with pytest.raises(aiohttp.ClientError):
        async with chat(double, http) as resp:
            await resp.read()


async def test_broken_bodies(double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    double.faults += [Fault.malformed_json(), Fault.wrong_shape(), Fault.truncated()]
    async with chat(double, http) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        with pytest.raises(ValueError):
            json.loads(await resp.read())
    async with chat(double, http) as resp:
        assert await resp.json() == {"hello": "world"}
    with pytest.raises(aiohttp.ClientPayloadError):
        async with chat(double, http) as resp:
            assert resp.status == 200
            await resp.read()


async def test_malformed_sse_and_no_usage(double: OpenAIDouble,
                                          http: aiohttp.ClientSession) -> None:
    double.faults += [Fault.malformed_sse(after_chunks=1), Fault.no_usage()]
    async with chat(double, http, stream=True) as resp:
        events = await sse_events(resp)
    assert events[2] == "{not json"
    async with chat(double, http, stream=True,
                    stream_options={"include_usage": True}) as resp:
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e).get("usage") is None for e in events[:-1])


async def test_stall_then_client_timeout_is_a_disconnect(
        double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    double.faults.append(Fault.stall())
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{double.base_url}/chat/completions",
                             json={"model": MODEL, "messages": HELLO},
                             timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    await asyncio.wait_for(double.disconnected.wait(), 2)
    assert double.disconnects == 1
    assert double.in_flight == 0 and double.completed == 0


async def test_slow_stream_abandoned_by_client(double: OpenAIDouble,
                                               http: aiohttp.ClientSession) -> None:
    double.faults.append(Fault.slow(0.05))
    async with chat(double, http, stream=True) as resp:
        await resp.content.readline()
    await asyncio.wait_for(double.disconnected.wait(), 2)
    assert double.disconnects == 1 and double.completed == 0


async def test_faults_fifo_then_sticky_then_normal(double: OpenAIDouble,
                                                   http: aiohttp.ClientSession) -> None:
    double.faults += [Fault.status(500), Fault.status(503)]
    double.fault = Fault.status(502)
    statuses = []
    for _ in range(4):
        async with chat(double, http) as resp:
            statuses.append(resp.status)
    assert statuses == [500, 503, 502, 502]
    double.fault = None
    async with chat(double, http) as resp:
        assert resp.status == 200
    assert len(double.requests) == 5


async def test_stop_does_not_hang_on_a_stall(http: aiohttp.ClientSession) -> None:
    double = OpenAIDouble(completion_tokens=4)
    await double.start()
    double.fault = Fault.stall()

    async def call() -> None:
        async with chat(double, http) as resp:
            await resp.read()

    pending = asyncio.create_task(call())
    await asyncio.wait_for(double.started.wait(), 2)
    await asyncio.wait_for(double.stop(), 2)
    await double.stop()  # idempotent
    with pytest.raises(aiohttp.ClientError):
        await pending
    assert double.disconnects == 0  # the server left, not the client


# -- as strict as api.openai.com ---------------------------------------------------------


def _openai_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


@pytest.mark.parametrize(("path", "body"), [
    ("chat/completions", {"model": MODEL, "messages": HELLO, "cache": True}),
    ("completions", {"model": MODEL, "prompt": "hi", "cache": True}),
    ("embeddings", {"model": MODEL, "input": ["hi"], "cache": True}),
], ids=["chat", "completions", "embeddings"])  # fmt: skip
async def test_lloom_only_arguments_get_openais_400(
    double: OpenAIDouble, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    async with http.post(f"{double.base_url}/{path}", json=body) as resp:
        assert resp.status == 400
        assert await resp.json() == _openai_error("Unrecognized request argument supplied: cache")
    del body["cache"]
    async with http.post(f"{double.base_url}/{path}", json=body) as resp:
        assert resp.status == 200


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("fields", "says"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "schema must be a JSON Schema of 'type: \"object\"'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "does not match pattern"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "auto"}, "only allowed when 'tools' are specified"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not one of the tools"),
    ({"response_format": {"type": "xml"}}, "Invalid value: 'xml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "json_schema.name"),
    ({"messages": [{"role": "tool", "content": "1"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "Invalid value: 'video'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "Invalid value: 'wizard'"),
    ({"top_logprobs": 2}, "'logprobs' must be set to true"),
])  # fmt: skip
async def test_malformed_tools_formats_and_messages_are_refused(
    double: OpenAIDouble, http: aiohttp.ClientSession, fields: dict[str, Any], says: str
) -> None:
    async with chat(double, http, **fields) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"


async def test_well_formed_tools_and_images_are_accepted(double: OpenAIDouble, http: aiohttp.ClientSession) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x.invalid/a.png"}}]
    async with chat(double, http, tools=[TOOL], tool_choice="required", parallel_tool_calls=True,
                    response_format={"type": "json_object"}, messages=[{"role": "user", "content": parts}]) as resp:
        assert resp.status == 200, await resp.text()
