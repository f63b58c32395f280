"""The full OpenAI chat surface end to end: a client, a real nats-server, a real node and the strict
OpenAI double: tools and tool messages, streamed tool-call pieces, structured output, images, every
sampling option under the name each backend takes, reasoning, logprobs; and the typed errors for
what cannot be served."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from executor.cache.memory import cache_key
from executor.jobs.node import ExecutorNode
from protocol import subjects as subj
from protocol.chat_types import FunctionCall, ToolCall
from protocol.client import LloomClient
from protocol.errors import InvalidRequest, PayloadTooLarge, StreamInterrupted, UnsupportedFeature
from protocol.messages import ChatRequest, ErrorReply, FinishReason, Message, Role, StreamChunk, encoder
from protocol.messages import unary_reply_decoder
from tests.conftest import NodeFactory
from tests.doubles.openai_double import OpenAIDouble
from tests.doubles.openai_script import Answer, ScriptedCall
from tests.helpers.jobs import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PARIS = ScriptedCall("call_paris", "get_weather", '{"city": "Paris"}')
TOKYO = ScriptedCall("call_tokyo", "get_time", '{"zone": "Asia/Tokyo", "format": "24h"}')
ASK = [{"role": "user", "content": "weather in Paris?"}]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()


@pytest.fixture
def node(capable_node: ExecutorNode) -> ExecutorNode:
    return capable_node


def req(messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatRequest:
    return msgspec.convert({"model": MODEL, "messages": messages or ASK, **fields}, ChatRequest)


async def run(client: LloomClient, request: ChatRequest, stream: bool) -> tuple[str, Any, list[StreamChunk]]:
    """(content, the final message, the chunks) of `request`, unary or streamed."""
    if not stream:
        reply = await client.complete(request)
        return reply.content, reply, []
    async with client.stream(request) as s:
        chunks = [c async for c in s]
    return "".join(c.delta for c in chunks), s, chunks


def sent(double: OpenAIDouble) -> dict[str, Any]:
    """The body of the one chat request the backend got."""
    [body] = double.requests
    return body


async def raw_job(nc: NATS, body: dict[str, Any]) -> ErrorReply:
    msg = await nc.request(subj.complete_subject(MODEL), encoder.encode(body), timeout=5)
    reply = unary_reply_decoder.decode(msg.data)
    assert isinstance(reply, ErrorReply)
    return reply


# -- tools ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_tools_and_tool_choice_reach_the_backend_and_the_call_comes_back(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, stream: bool
) -> None:
    double.answers = [Answer(tool_calls=(PARIS,))]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    content, end, _ = await run(client, req(tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False),
                                stream)  # fmt: skip
    body = sent(double)
    assert body["tools"] == [WEATHER, TIME]
    assert body["tool_choice"] == choice and body["parallel_tool_calls"] is False
    want = [ToolCall(id="call_paris", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]
    assert content == ""
    if stream:
        assert end.end.finish_reason is FinishReason.TOOL_CALLS
        assert end.tool_calls == want
    else:
        assert end.finish_reason is FinishReason.TOOL_CALLS
        assert end.tool_calls == want


async def test_a_conversation_with_tool_calls_and_tool_results_reaches_the_backend_as_written(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    history = [
        {"role": "developer", "content": "use the tools"},
        *ASK,
        {"role": "assistant", "tool_calls": [{"type": "function", "id": "call_paris",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_paris", "content": '{"celsius": 21}'},
    ]  # fmt: skip
    reply = await client.complete(req(history, tools=[WEATHER], tool_choice="auto"))
    assert reply.content.startswith("tok0") and reply.finish_reason is FinishReason.STOP
    assert sent(double)["messages"] == history


async def test_interleaved_parallel_tool_call_pieces_arrive_in_order_and_assemble(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.answers = [Answer(tool_calls=(PARIS, TOKYO), interleave=True, fragment=5)]
    _, stream, chunks = await run(client, req(tools=[WEATHER, TIME], parallel_tool_calls=True), True)
    pieces = [p for c in chunks for p in c.tool_calls or ()]
    assert all(c.delta == "" for c in chunks)
    indexes = [p.index for p in pieces]
    assert indexes[:4] == [0, 1, 0, 1]  # interleaved as the backend sent them
    firsts = [p for p in pieces if p.id is not None]
    assert [(p.index, p.id, p.function.name) for p in firsts] == [(0, "call_paris", "get_weather"),
                                                                  (1, "call_tokyo", "get_time")]  # fmt: skip
    assert [(c.id, c.function.name, c.function.arguments) for c in stream.tool_calls] == [
        (PARIS.id, PARIS.name, PARIS.arguments), (TOKYO.id, TOKYO.name, TOKYO.arguments)]  # fmt: skip
    assert stream.end.usage.completion_tokens > 0


async def test_a_stream_cut_mid_tool_call_is_interrupted_and_billed_for_what_it_produced(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.answers = [Answer(tool_calls=(PARIS,), fragment=2, cut_after_tool_pieces=3)]
    chunks = []
    with pytest.raises(StreamInterrupted) as caught:
        async with client.stream(req(tools=[WEATHER])) as stream:
            async for chunk in stream:
                chunks.append(chunk)
    assert len(chunks) == 3 and chunks[0].tool_calls[0].id == "call_paris"
    receipt = caught.value.receipt
    assert receipt is not None and receipt.receipt.outcome == "failed"
    assert receipt.receipt.usage.completion_tokens == 3
    with pytest.raises(StreamInterrupted, match="mid tool call"):
        stream.tool_calls
    assert (await client.complete(req())).content.startswith("tok0")  # the node serves on


# -- structured output, images ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}},
], ids=["json_object", "json_schema"])  # fmt: skip
async def test_response_format_reaches_the_backend_exactly(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, fmt: dict[str, Any], stream: bool
) -> None:
    double.answers = [Answer(content='{"city": "Paris"}')]
    content, _, _ = await run(client, req(response_format=fmt), stream)
    assert sent(double)["response_format"] == fmt
    assert msgspec.json.decode(content) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("capable_node", ["any"], indirect=True)  # image_urls: the default takes data: URLs only
async def test_image_parts_reach_the_backend_unchanged_and_the_executor_fetches_nothing(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, stream: bool
) -> None:
    # `.invalid` never resolves: a job that fetched the URL itself would fail.
    parts = [{"type": "text", "text": "what are these?"},
             {"type": "image_url", "image_url": {"url": PNG}},
             {"type": "image_url", "image_url": {"url": "https://images.invalid/cat.png", "detail": "low"}}]  # fmt: skip
    content, _, _ = await run(client, req([{"role": "user", "content": parts}]), stream)
    assert content.startswith("tok0")
    assert sent(double)["messages"] == [{"role": "user", "content": parts}]


async def test_an_image_over_max_payload_is_refused_by_the_client_naming_the_sizes(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    big = "data:image/png;base64," + base64.b64encode(bytes(800_000)).decode()
    request = req([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}])
    with pytest.raises(PayloadTooLarge) as caught:
        await client.complete(request)
    message = caught.value.message
    assert "at most 1048576" in message and "http(s) URLs" in message
    assert int(message.split()[2]) > 1048576  # "request is N bytes ..."
    assert double.requests == []


# -- sampling options, reasoning, logprobs -------------------------------------------------


SAMPLING = {"seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"50256": -100.0},
            "user": "alice", "stop": ["\n\n"], "top_p": 0.9, "temperature": 0.2}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("preset", "limit_field"), [
    ("openai", "max_completion_tokens"), ("llamacpp", "max_tokens"), ("ollama", "max_tokens"),
    ("vllm", "max_tokens"), ("lmstudio", "max_tokens"),
])  # fmt: skip
@pytest.mark.parametrize("asked", ["max_tokens", "max_completion_tokens"])
async def test_sampling_options_reach_the_backend_under_the_names_it_takes(
    make_node: NodeFactory, client: LloomClient, double: OpenAIDouble, preset: str, limit_field: str, asked: str,
    stream: bool,
) -> None:
    await make_node(preset=preset)
    content, _, _ = await run(client, req(**SAMPLING, **{asked: 5}, cache=False), stream)
    assert content == "tok0 tok1 tok2 tok3 tok4 "
    body = sent(double)
    expected = {"model": MODEL, "messages": ASK, **SAMPLING, limit_field: 5}
    if stream:
        expected |= {"stream": True, "stream_options": {"include_usage": True}}
    assert body == expected  # nothing lloom-only (no cache), no nulls, no n, the limit under one name


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_reasoning_comes_apart_from_the_answer_and_is_counted(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, stream: bool, field: str
) -> None:
    double.answers = [Answer(content="Paris", reasoning="the capital of France", reasoning_field=field)]
    content, end, chunks = await run(client, req(reasoning_effort="low"), stream)
    assert sent(double)["reasoning_effort"] == "low"
    assert content.strip() == "Paris"
    if stream:
        thinking = [c for c in chunks if c.reasoning is not None]
        assert len(thinking) == 4 and all(c.delta == "" for c in thinking)
        assert chunks.index(thinking[-1]) < min(i for i, c in enumerate(chunks) if c.delta)
        assert end.reasoning.strip() == "the capital of France"
        usage = end.end.usage
    else:
        assert end.reasoning_content == "the capital of France"
        usage = end.usage
    assert usage.reasoning_tokens == 4 and usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_logprobs_come_back_per_token(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, stream: bool
) -> None:
    _, end, chunks = await run(client, req(logprobs=True, top_logprobs=2, max_tokens=3), stream)
    body = sent(double)
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    probs = [lp for c in chunks for lp in c.logprobs or ()] if stream else end.logprobs
    assert [lp.token for lp in probs] == ["tok0 ", "tok1 ", "tok2 "]
    assert all(len(lp.top_logprobs) == 2 and lp.logprob < 0 for lp in probs)


# -- what is refused ----------------------------------------------------------------------


async def test_n_over_1_is_refused_as_unsupported_locally_and_on_the_wire(
    node: ExecutorNode, client: LloomClient, nc: NATS, double: OpenAIDouble
) -> None:
    with pytest.raises(UnsupportedFeature, match="n>1 is not served"):
        await client.complete(req(n=2))
    reply = await raw_job(nc, {"model": MODEL, "messages": ASK, "n": 3})
    assert reply.code == "unsupported_feature" and "send n requests" in reply.message
    assert double.requests == []
    assert (await client.complete(req(n=1))).content.startswith("tok0")
    assert "n" not in double.requests[-1]


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
]  # fmt: skip
BAD_IDS = ["schema-not-object", "tool-message-without-id", "image-url-scheme", "choice-without-tools",
           "choice-unknown-function", "top-logprobs-alone", "both-limits", "schema-missing", "user-no-content"]  # fmt: skip


@pytest.mark.parametrize(("fields", "names"), BAD, ids=BAD_IDS)
async def test_bad_chat_requests_get_typed_errors_locally_and_on_the_wire(
    node: ExecutorNode, client: LloomClient, nc: NATS, double: OpenAIDouble, fields: dict[str, Any], names: str
) -> None:
    body = {"model": MODEL, "messages": ASK, **fields}
    with pytest.raises(InvalidRequest) as caught:
        await client.complete(msgspec.convert(body, ChatRequest))
    assert names in caught.value.message
    reply = await raw_job(nc, body)  # a peer that skipped the client's check
    assert reply.code == "bad_request" and names in reply.message
    assert double.requests == []


@pytest.mark.parametrize(("fields", "says"), [
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, "$.messages[0].content[0]"),
    ({"cache_key": "x"}, "unknown field `cache_key`"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "$.tools[0].function.name"),
])  # fmt: skip
async def test_unknown_parts_and_fields_are_bad_requests_on_the_wire(
    node: ExecutorNode, nc: NATS, double: OpenAIDouble, fields: dict[str, Any], says: str
) -> None:
    reply = await raw_job(nc, {"model": MODEL, "messages": ASK, **fields})
    assert reply.code == "bad_request" and says in reply.message
    assert double.requests == []


# -- the bug: lloom's own fields reached the backend ---------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("cache", [True, False])
async def test_the_cache_flag_never_reaches_the_backend(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, stream: bool, cache: bool
) -> None:
    content, _, _ = await run(client, req(cache=cache), stream)
    assert content.startswith("tok0")  # the strict double answers `cache` with 400
    assert "cache" not in sent(double)


# -- what stays as it was ---------------------------------------------------------------------


def test_a_plain_chunk_and_message_encode_exactly_as_before() -> None:
    assert encoder.encode(StreamChunk(3, "hi")) == b'{"type":"chunk","seq":3,"delta":"hi"}'
    assert encoder.encode(Message(Role.USER, "hi")) == b'{"role":"user","content":"hi"}'
    plain = req(max_tokens=5)
    assert encoder.encode(plain) == (b'{"model":"double-model","messages":[{"role":"user","content":"weather in Paris?"}],'
                                     b'"max_tokens":5}')  # fmt: skip


def test_the_cache_key_covers_tools_formats_and_options() -> None:
    base = req(temperature=0)
    variants = [req(temperature=0, tools=[WEATHER]), req(temperature=0, tools=[TIME]),
                req(temperature=0, response_format={"type": "json_object"}), req(temperature=0, seed=1),
                req([{"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]}], temperature=0)]  # fmt: skip
    keys = {cache_key(r) for r in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert cache_key(req(temperature=0, stream=True, cache=True)) == cache_key(base)


# -- receipts vouch for the calls, not only the text ------------------------------------------


async def test_a_receipt_vouches_for_the_tool_calls_and_reasoning_so_a_swapped_call_is_refused(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    from protocol.errors import ReplyForged
    from protocol.trust import Trust
    from protocol.verify import ReplyVerifier, signed_answer

    double.answers = [Answer(tool_calls=(PARIS,), reasoning="look it up")]
    reply = await client.complete(req(tools=[WEATHER]))  # verified by the client, as every reply
    assert reply.receipt is not None and reply.content == ""
    verifier = ReplyVerifier(Trust())
    calls = encoder.encode(reply.tool_calls)
    verifier.check_response(reply.receipt, signed_answer("", reply.reasoning_content, calls))
    swapped = calls.replace(b"Paris", b"Tokyo")
    for forged in (signed_answer("", reply.reasoning_content, swapped), signed_answer("", "other", calls), b""):
        with pytest.raises(ReplyForged):
            verifier.check_response(reply.receipt, forged)


async def test_a_relay_that_swaps_the_tool_call_of_a_genuine_reply_on_the_way_is_refused(
    node: ExecutorNode, double: OpenAIDouble
) -> None:
    """A man in the middle between two buses (a relay that takes the executor's direct subject on the
    caller's bus and forwards to the real executor) passes the genuine reply, receipt and all, but
    with the agent's tool call changed: the client refuses it (`wrong_response`) and never runs it."""
    import nats

    from executor.process.embedded_nats import EmbeddedNats
    from protocol.errors import ReplyForged

    double.answers = [Answer(tool_calls=(PARIS,)), Answer(tool_calls=(PARIS,))]
    tamper = False
    async with EmbeddedNats() as callers_bus:
        to_executor = node.nc  # the executor's own bus (the relay holds a connection there)
        relay_nc = await nats.connect(callers_bus.url)

        async def relay(msg) -> None:  # type: ignore[no-untyped-def]
            genuine = await to_executor.request(msg.subject, msg.data, headers=msg.headers, timeout=10)
            data = genuine.data.replace(b"Paris", b"Tokyo") if tamper else genuine.data
            await relay_nc.publish(msg.reply, data, headers=genuine.headers)

        await relay_nc.subscribe(subj.direct_subject(node.id), cb=relay)
        await relay_nc.flush()
        try:
            async with await LloomClient.connect(callers_bus.url, timeout=10.0) as client:
                reply = await client.complete(req(tools=[WEATHER]), executor=node.id)  # relayed faithfully: fine
                assert reply.tool_calls is not None and "Paris" in reply.tool_calls[0].function.arguments
                tamper = True
                with pytest.raises(ReplyForged):
                    await client.complete(req(tools=[WEATHER]), executor=node.id, timeout=3)
                assert client.reply_forgeries == {"wrong_response": 1}
        finally:
            await relay_nc.close()


async def test_a_queued_job_over_max_payload_is_refused_before_jetstream_and_the_connection_survives(
    js_client: LloomClient,
) -> None:
    big = "data:image/png;base64," + base64.b64encode(bytes(800_000)).decode()
    with pytest.raises(PayloadTooLarge, match="http\\(s\\) URLs"):
        await js_client.submit(req([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]))
    assert await js_client.submit(req())  # the connection is intact: JetStream takes the next job


async def test_a_backend_tool_call_without_an_id_gets_one_and_an_invalid_name_is_a_typed_error(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    from protocol.errors import BackendProtocolError

    double.answers = [Answer(tool_calls=(ScriptedCall("", "get_weather", "{}"),)),
                      Answer(tool_calls=(ScriptedCall("call_1", "get weather!", "{}"),))]  # fmt: skip
    reply = await client.complete(req(tools=[WEATHER]))
    assert [c.id for c in reply.tool_calls] == ["call_0"]  # the caller can answer it
    with pytest.raises(BackendProtocolError, match="not a valid function name"):
        await client.complete(req(tools=[WEATHER]))
