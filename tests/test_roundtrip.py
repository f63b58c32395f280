"""A client gets normalized completions and ordered streams from an executor over real NATS."""

from __future__ import annotations

import pytest

from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.messages import FinishReason
from tests.conftest import MODEL, NodeFactory
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask


async def test_unary_completion_returns_the_normalized_response(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    reply = await client.complete(ask(text="three word prompt", max_tokens=5))

    assert reply.model == MODEL
    assert reply.content == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.finish_reason is FinishReason.LENGTH
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 5, 8)
    assert not reply.usage.estimated
    assert reply.executor_id == node.id
    assert double.requests[-1]["max_tokens"] == 5
    assert double.requests[-1]["messages"] == [{"role": "user", "content": "three word prompt"}]


async def test_stream_delivers_chunks_in_order_then_a_final_message(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.completion_tokens = 6
    async with client.stream(ask(text="two words")) as stream:
        chunks = [chunk async for chunk in stream]

    assert [c.seq for c in chunks] == list(range(6))
    assert "".join(c.delta for c in chunks) == "tok0 tok1 tok2 tok3 tok4 tok5 "
    assert stream.end is not None
    assert stream.end.finish_reason is FinishReason.STOP
    assert (stream.end.usage.prompt_tokens, stream.end.usage.completion_tokens) == (2, 6)
    assert stream.end.chunks == 6
    assert stream.end.executor_id == node.id
    # The executor asked the backend for usage in the stream.
    assert double.requests[-1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("model", ["qwen2.5:7b", "meta-llama/Llama-3-8B"])
async def test_models_with_subject_special_characters_are_served(
    make_node: NodeFactory, client: LloomClient, model: str
) -> None:
    await make_node()
    reply = await client.complete(ask(model=model))
    assert reply.model == model


async def test_stream_without_backend_usage_reports_an_estimate(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.fault = Fault.no_usage()
    double.completion_tokens = 4
    async with client.stream(ask()) as stream:
        chunks = [c async for c in stream]
    assert len(chunks) == 4
    assert stream.end is not None
    assert stream.end.usage.estimated
    # Completion tokens are the chunks counted, not a guess from the text.
    assert stream.end.usage.completion_tokens == 4


async def test_direct_subject_reaches_the_named_executor(make_node: NodeFactory, client: LloomClient) -> None:
    first = await make_node()
    second = await make_node()
    for target in (first, second, first):
        reply = await client.complete(ask(), executor=target.id)
        assert reply.executor_id == target.id


async def test_two_executors_sharing_a_model_both_get_work(make_node: NodeFactory, client: LloomClient) -> None:
    nodes = [await make_node(), await make_node()]
    served = [(await client.complete(ask())).executor_id for _ in range(40)]
    # The queue group picks at random; 40 draws all landing on one of two is (1/2)^39.
    assert {n.id for n in nodes} == set(served)
    assert sum(n.stats.completed for n in nodes) == 40


async def test_node_serves_the_models_its_backend_lists_and_follows_changes(
    node: ExecutorNode, double: OpenAIDouble, client: LloomClient
) -> None:
    assert node.models == {MODEL, "qwen2.5:7b", "meta-llama/Llama-3-8B"}
    double.models.append("newly-loaded")
    await node.refresh_models()
    assert (await client.complete(ask(model="newly-loaded"))).model == "newly-loaded"


async def test_configured_models_restrict_what_is_served(make_node: NodeFactory, client: LloomClient) -> None:
    node = await make_node(models=["qwen2.5:7b"])
    assert node.models == {"qwen2.5:7b"}
    reply = await client.complete(ask(model="qwen2.5:7b"))
    assert reply.executor_id == node.id
