"""Every backend failure reaches the caller as a typed, useful error, and the node keeps serving."""

from __future__ import annotations

import pytest

from executor.process.embedded_nats import free_port
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.errors import (
    BackendAuthFailed,
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    LloomError,
    ModelNotFound,
    RateLimited,
    StreamInterrupted,
)
from tests.conftest import MODEL, NodeFactory
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask
from tests.helpers.wait import within

UNARY_FAULTS = [
    (Fault.status(401, "Incorrect API key provided"), BackendAuthFailed, "rejected our credentials"),
    (Fault.status(403, "forbidden"), BackendAuthFailed, "api_key"),
    (Fault.status(500, "kaboom"), BackendError, "HTTP 500: kaboom"),
    (Fault.status(503, "loading model"), BackendError, "loading model"),
    (Fault.status(400, "context length exceeded"), InvalidRequest, "context length exceeded"),
    (Fault.malformed_json(), BackendProtocolError, "malformed completion"),
    (Fault.wrong_shape(), BackendProtocolError, "malformed completion"),
    (Fault.truncated(), BackendProtocolError, "truncated"),
    (Fault.reset(), BackendUnavailable, "dropped the connection"),
]


@pytest.mark.parametrize(("fault", "error", "says"), UNARY_FAULTS, ids=lambda v: getattr(v, "kind", None))
async def test_unary_backend_fault_maps_to_typed_error(
    node: ExecutorNode,
    client: LloomClient,
    double: OpenAIDouble,
    fault: Fault,
    error: type[LloomError],
    says: str,
) -> None:
    double.faults.append(fault)
    with pytest.raises(error) as caught:
        await client.complete(ask())
    assert type(caught.value) is error
    assert says in caught.value.message
    assert caught.value.executor_id == node.id
    # The node is unharmed: the next job succeeds.
    assert (await client.complete(ask())).content.startswith("tok0")


async def test_rate_limit_keeps_retry_after(node: ExecutorNode, client: LloomClient, double: OpenAIDouble) -> None:
    double.faults.append(Fault.status(429, "slow down", headers={"Retry-After": "7"}))
    with pytest.raises(RateLimited) as caught:
        await client.complete(ask())
    assert caught.value.retry_after_s == 7
    assert caught.value.retryable


async def test_backend_down_names_the_url_and_how_to_start_it(make_node: NodeFactory, client: LloomClient) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    await make_node(base_url=dead, models=[MODEL])
    with pytest.raises(BackendUnavailable) as caught:
        await client.complete(ask())
    assert dead in caught.value.message
    assert "cannot connect" in caught.value.message
    assert caught.value.retryable


async def test_unknown_model_on_backend_lists_what_it_has(make_node: NodeFactory, client: LloomClient) -> None:
    # The node was told to serve a model its backend does not have (e.g. not loaded in LM Studio).
    await make_node(models=["not-loaded"])
    with pytest.raises(ModelNotFound) as caught:
        await client.complete(ask(model="not-loaded"))
    assert caught.value.available_models is not None
    assert MODEL in caught.value.available_models
    assert MODEL in caught.value.message


async def test_stalled_backend_times_out_at_timeout_secs(
    make_node: NodeFactory, client: LloomClient, double: OpenAIDouble
) -> None:
    await make_node(timeout_secs=0.2)
    double.faults.append(Fault.stall())
    with pytest.raises(BackendTimeout) as caught:
        await client.complete(ask())
    assert "timeout_secs=0.2" in caught.value.message
    await within(double.disconnected.wait(), "the executor hung up on the stalled backend")
    assert (double.disconnects, double.completed) == (1, 0)


@pytest.mark.parametrize(
    ("fault", "says"),
    [(Fault.reset(after_chunks=3), "mid-way"), (Fault.malformed_sse(after_chunks=3), "malformed stream event")],
    ids=["reset", "malformed_sse"],
)
async def test_stream_broken_mid_way_reports_stream_interrupted_after_the_chunks_it_had(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble, fault: Fault, says: str
) -> None:
    double.faults.append(fault)
    received: list[str] = []
    with pytest.raises(StreamInterrupted) as caught:
        async with client.stream(ask()) as stream:
            async for chunk in stream:
                received.append(chunk.delta)
    assert received == ["tok0 ", "tok1 ", "tok2 "]
    assert says in caught.value.message
    async with client.stream(ask()) as stream:
        assert len([c async for c in stream]) == double.completion_tokens


async def test_stream_refused_before_it_starts_is_the_plain_backend_error(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.faults.append(Fault.status(401, "bad key"))
    with pytest.raises(BackendAuthFailed):
        async with client.stream(ask()) as stream:
            async for _ in stream:
                pytest.fail("no chunk expected")


async def test_slow_stream_within_timeout_still_completes(
    make_node: NodeFactory, client: LloomClient, double: OpenAIDouble
) -> None:
    await make_node(timeout_secs=1.0)
    double.completion_tokens = 3
    double.faults.append(Fault.slow(0.05))
    async with client.stream(ask()) as stream:
        assert [c.delta async for c in stream] == ["tok0 ", "tok1 ", "tok2 "]
