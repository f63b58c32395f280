"""Embeddings and legacy text completions over the network, and the batcher that makes
concurrent jobs share backend calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.batching.coalescer import Batcher, apportion
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.errors import BackendError, InvalidRequest, NoExecutors
from protocol.subjects import embed_subject
from protocol.messages import EmbeddingRequest, encoder
from tests.conftest import MODEL
from tests.conftest import Signing
from tests.doubles.openai_double import Fault, OpenAIDouble, embedding_of


@pytest.fixture
async def embed_node(nc: NATS, double: OpenAIDouble, signing: Signing) -> AsyncIterator[ExecutorNode]:
    backend = OpenAICompatibleBackend(base_url=double.base_url)
    batcher = Batcher(backend, max_inputs=64, max_calls=1)
    node = ExecutorNode(nc, backend, models=[MODEL], batcher=batcher, **signing())
    await node.start()
    yield node
    await node.stop(drain_timeout=1)
    await batcher.aclose()
    await backend.aclose()


async def test_one_request_gets_one_vector_per_input_in_order(embed_node: ExecutorNode, client: LloomClient,
                                                              double: OpenAIDouble) -> None:  # fmt: skip
    texts = ["the first text", "second", "a third one here"]
    reply = await client.embed(MODEL, texts)
    assert reply.embeddings == [embedding_of(t, 8) for t in texts]
    assert reply.usage.prompt_tokens == 3 + 1 + 4 and reply.usage.completion_tokens == 0
    assert (reply.batched_with, reply.executor_id, reply.model) == (1, embed_node.id, MODEL)
    assert double.embedding_calls == [3]


async def test_concurrent_requests_share_backend_calls_and_each_gets_its_own_vectors(
    embed_node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.embed_delay_s = 0.02  # a forward pass: jobs that arrive meanwhile pile up
    texts = [f"text number {i} " + "word " * i for i in range(40)]
    replies = await asyncio.gather(*(client.embed(MODEL, [t]) for t in texts))
    for text, reply in zip(texts, replies, strict=True):
        assert reply.embeddings == [embedding_of(text, 8)]
    assert sum(double.embedding_calls) == 40
    assert len(double.embedding_calls) < 40 / 4  # batched: far fewer calls than jobs
    assert max(r.batched_with for r in replies) > 1
    # Each job's share of the prompt tokens; together exactly what the backend billed.
    assert sum(r.usage.prompt_tokens for r in replies) == sum(3 + i for i in range(40))


async def test_a_batch_never_exceeds_max_inputs(embed_node: ExecutorNode, client: LloomClient,
                                                double: OpenAIDouble) -> None:  # fmt: skip
    double.embed_delay_s = 0.01
    await asyncio.gather(*(client.embed(MODEL, [f"t{i}"] * 10) for i in range(20)))
    assert sum(double.embedding_calls) == 200
    assert max(double.embedding_calls) <= 64


async def test_one_bad_input_fails_only_its_own_job(embed_node: ExecutorNode, client: LloomClient,
                                                    double: OpenAIDouble) -> None:  # fmt: skip
    double.embed_delay_s = 0.02
    await client.embed(MODEL, ["warm the batcher up"])  # a call runs: the next ones share a batch
    jobs = [client.embed(MODEL, [f"good {i}"]) for i in range(5)] + [client.embed(MODEL, ["REJECT me"])]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert all(r.embeddings for r in results[:5])  # type: ignore[union-attr]
    assert isinstance(results[5], InvalidRequest) and "not allowed" in results[5].message


async def test_a_backend_failure_fails_the_batch_with_the_backends_error(
    embed_node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.fault = Fault.status(503, "overloaded")
    with pytest.raises(BackendError, match="overloaded"):
        await client.embed(MODEL, ["anything"])
    double.fault = None
    assert (await client.embed(MODEL, ["anything"])).embeddings  # and the node is fine


async def test_bad_embedding_requests_get_typed_errors(embed_node: ExecutorNode, client: LloomClient, nc: NATS) -> None:
    with pytest.raises(NoExecutors):
        await client.embed("no-such-model", ["x"])
    with pytest.raises(InvalidRequest, match="input"):
        await client.embed(MODEL, [])
    with pytest.raises(InvalidRequest, match="input"):
        await client.embed(MODEL, [""])
    reply = await nc.request(embed_subject(MODEL), b"{not json", timeout=5)
    assert b'"bad_request"' in reply.data
    assert (await client.embed(MODEL, ["still serving"])).embeddings


async def test_without_a_batcher_each_job_is_its_own_call(
    nc: NATS, double: OpenAIDouble, client: LloomClient, signing: Signing
) -> None:
    backend = OpenAICompatibleBackend(base_url=double.base_url)
    node = ExecutorNode(nc, backend, models=[MODEL], **signing())
    await node.start()
    await asyncio.gather(*(client.embed(MODEL, [f"t{i}"]) for i in range(10)))
    assert double.embedding_calls == [1] * 10
    await node.stop(drain_timeout=1)
    await backend.aclose()


def test_shares_add_up_to_the_total_and_follow_the_weights() -> None:
    assert apportion(10, [1, 1]) == [5, 5]
    assert sum(apportion(7, [3, 1, 1])) == 7
    assert apportion(7, [3, 1, 1])[0] >= 4
    assert apportion(0, [5, 5]) == [0, 0]
    assert apportion(3, [0, 0, 0]) == [1, 1, 1]


def test_the_wire_request_is_the_openai_shape() -> None:
    assert encoder.encode(EmbeddingRequest(model="m", input=["a"])) == b'{"model":"m","input":["a"]}'


# -- legacy text completions: prompt arrays ----------------------------------------------


async def test_a_text_completion_answers_its_own_prompt(embed_node: ExecutorNode, client: LloomClient,
                                                        double: OpenAIDouble) -> None:  # fmt: skip
    reply = await client.complete_text(MODEL, "Once upon a time", max_tokens=4)
    assert reply.text == "echo:Once tok1 tok2 tok3" and reply.finish_reason.value == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.batched_with) == (4, 4, 1)
    assert double.text_calls == [1]


async def test_concurrent_text_completions_with_the_same_parameters_share_calls(
    embed_node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.embed_delay_s = 0.02
    prompts = [f"prompt{i} " + "word " * i for i in range(24)]
    same = [client.complete_text(MODEL, p, max_tokens=3) for p in prompts]
    other = [client.complete_text(MODEL, p, max_tokens=3, temperature=0.5) for p in prompts[:4]]
    replies = await asyncio.gather(*same, *other)
    for prompt, reply in zip(prompts + prompts[:4], replies, strict=True):
        assert reply.text.startswith(f"echo:{prompt.split()[0]} ")  # each job its own choice
    assert sum(double.text_calls) == 28 and len(double.text_calls) < 28 / 3
    # Jobs with other parameters never share a call: the 0.5 calls hold exactly the four 0.5 jobs.
    by_temperature: dict[object, int] = {}
    for n, t in zip(double.text_calls, double.text_call_temperatures, strict=True):
        by_temperature[t] = by_temperature.get(t, 0) + n
    assert by_temperature == {None: 24, 0.5: 4}
    assert sum(r.usage.prompt_tokens for r in replies) == sum(1 + i for i in range(24)) + sum(1 + i for i in range(4))
    assert sum(r.usage.completion_tokens for r in replies) == 3 * 28


async def test_a_bad_prompt_fails_only_its_own_text_job(embed_node: ExecutorNode, client: LloomClient,
                                                        double: OpenAIDouble) -> None:  # fmt: skip
    double.embed_delay_s = 0.02
    await client.complete_text(MODEL, "warm up")
    jobs = [client.complete_text(MODEL, f"good {i}") for i in range(4)] + [client.complete_text(MODEL, "REJECT me")]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert all(r.text.startswith("echo:good") for r in results[:4])  # type: ignore[union-attr]
    assert isinstance(results[4], InvalidRequest) and "not allowed" in results[4].message
    with pytest.raises(InvalidRequest, match="prompt"):
        await client.complete_text(MODEL, "")
