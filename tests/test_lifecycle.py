"""Concurrency limit, deadlines, cancellation, departed callers and drain, as a caller and the backend see them."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.client import Client as NATS

from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode, State
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.errors import Cancelled, DeadlineExceeded, ExecutorBusy, NoExecutors, ShuttingDown
from protocol.messages import encoder, unary_reply_decoder
from tests.conftest import MODEL, NodeFactory
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask, leave_a_long_stream_early
from tests.helpers.wait import within


async def start_stalled_job(client: LloomClient, double: OpenAIDouble, **kw: object) -> asyncio.Task:
    double.started.clear()
    double.faults.append(Fault.stall())
    task = asyncio.create_task(client.complete(ask(), **kw))  # type: ignore[arg-type]
    await within(double.started.wait(), "the backend got the job")
    return task


async def test_full_node_answers_busy_at_once(
    make_node: NodeFactory, nats_server: EmbeddedNats, client: LloomClient, double: OpenAIDouble
) -> None:
    node = await make_node(max_concurrent_jobs=1)
    stalled = await start_stalled_job(client, double)
    async with await LloomClient.connect(nats_server.url, busy_retries=0) as impatient:
        with pytest.raises(ExecutorBusy) as caught:
            await impatient.complete(ask())
    assert caught.value.retryable
    assert node.stats.busy == 1
    stalled.cancel()
    await within(double.disconnected.wait(), "the executor hung up on the backend")


async def test_busy_executor_is_skipped_for_another_in_the_queue_group(
    make_node: NodeFactory, nats_server: EmbeddedNats, client: LloomClient, double: OpenAIDouble
) -> None:
    full = await make_node(max_concurrent_jobs=1)
    free = await make_node(max_concurrent_jobs=1)
    stalled = await start_stalled_job(client, double, executor=full.id)
    async with await LloomClient.connect(nats_server.url, busy_retries=30) as patient:
        for _ in range(5):
            assert (await patient.complete(ask())).executor_id == free.id
    stalled.cancel()


async def test_caller_deadline_cancels_the_backend_call(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.faults.append(Fault.stall())
    with pytest.raises(DeadlineExceeded):
        await client.complete(ask(), timeout=0.3)
    await within(double.disconnected.wait(), "the executor hung up on the backend")
    await within(node.wait_idle(), "the node idle again")
    assert (double.disconnects, double.completed, node.stats.completed) == (1, 0, 0)  # cut off, not finished


async def test_executor_enforces_the_deadline_it_was_sent(node: ExecutorNode, nc: NATS, double: OpenAIDouble) -> None:
    # A raw caller that does not send cancels: the executor's own deadline stops the job.
    double.faults.append(Fault.stall())
    msg = await nc.request(
        subj.complete_subject(MODEL),
        encoder.encode(ask()),
        timeout=5,
        headers={subj.HDR_TIMEOUT_MS: "200"},
    )
    reply = unary_reply_decoder.decode(msg.data)
    assert reply.code == "deadline_exceeded"
    assert double.disconnects == 1


async def test_cancelling_the_call_stops_the_backend(node: ExecutorNode, client: LloomClient, double: OpenAIDouble) -> None:
    task = await start_stalled_job(client, double)
    task.cancel()
    await within(double.disconnected.wait(), "the executor hung up on the backend")
    await within(node.wait_idle(), "the node idle again")
    assert node.stats.cancelled == 1


async def test_leaving_a_stream_early_stops_the_backend(node: ExecutorNode, client: LloomClient, double: OpenAIDouble) -> None:
    await leave_a_long_stream_early(client, double)
    await within(node.wait_idle(), "the node idle again")
    # The backend was cut off mid-answer: it never finished its 1000 tokens.
    assert (double.disconnects, double.completed) == (1, 0)
    assert (node.stats.cancelled, node.stats.completed) == (1, 0)


async def test_caller_that_disappears_has_its_job_cancelled(
    make_node: NodeFactory, nats_server: EmbeddedNats, double: OpenAIDouble
) -> None:
    node = await make_node(liveness_interval_secs=0.1)
    double.faults.append(Fault.stall())
    caller = await nats.connect(nats_server.url)
    inbox = caller.new_inbox()
    await caller.subscribe(inbox)
    await caller.publish(
        subj.complete_subject(MODEL),
        encoder.encode(ask()),
        reply=inbox,
        headers={subj.HDR_LIVENESS: "1", subj.HDR_TIMEOUT_MS: "60000"},
    )
    await within(double.started.wait(), "the backend got the job")
    await caller.close()  # gone without a word: no cancel was sent
    await within(double.disconnected.wait(), "the executor hung up on the backend")
    await within(node.wait_idle(), "the node idle again")
    assert node.stats.cancelled == 1


async def test_live_caller_keeps_its_long_job(make_node: NodeFactory, client: LloomClient, double: OpenAIDouble) -> None:
    node = await make_node(liveness_interval_secs=0.05)
    double.faults.append(Fault.slow(0.4))  # several liveness pings happen meanwhile
    reply = await client.complete(ask())
    assert reply.content.startswith("tok0")
    assert node.stats.cancelled == 0


async def test_drain_finishes_in_flight_jobs_and_takes_no_new_ones(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    double.fault = Fault.slow(0.3)
    jobs = [asyncio.create_task(client.complete(ask())) for _ in range(3)]
    while double.in_flight < 3:
        double.started.clear()
        await within(double.started.wait(), "the backend got the job")
    await node.stop(drain_timeout=5)
    assert node.state is State.STOPPED
    replies = await asyncio.gather(*jobs)
    assert all(r.content.startswith("tok0") for r in replies)
    with pytest.raises(NoExecutors):
        await client.complete(ask())


async def test_drain_timeout_cancels_stragglers_with_shutting_down(
    node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    task = await start_stalled_job(client, double)
    await node.stop(drain_timeout=0.1)
    with pytest.raises(ShuttingDown) as caught:
        await task
    assert caught.value.retryable
    await within(double.disconnected.wait(), "the executor hung up on the backend")


async def test_stop_is_idempotent(node: ExecutorNode) -> None:
    await node.stop()
    await node.stop()
    assert node.state is State.STOPPED


async def test_cancel_for_an_unknown_job_is_harmless(node: ExecutorNode, client: LloomClient) -> None:
    await client.cancel("no-such-job")
    assert (await client.complete(ask())).content.startswith("tok0")
    assert node.stats.cancelled == 0


async def test_closing_the_client_fails_waiting_calls(
    node: ExecutorNode, nats_server: EmbeddedNats, double: OpenAIDouble
) -> None:
    other = await LloomClient.connect(nats_server.url)
    task = await start_stalled_job(other, double)
    await other.close()
    with pytest.raises(Cancelled):
        await task


async def test_a_node_answers_a_job_sent_from_another_connection_the_moment_start_returns(
    nats_server, double, signing
) -> None:
    # nats-py's flush() alone can return before the server has the node's SUBs: the PING is
    # written to the socket while the SUBs still wait in the client's queue.
    import nats

    from executor.backends.openai_compat import OpenAICompatibleBackend
    from executor.config import NodeConfig
    from executor.jobs.node import ExecutorNode
    from protocol.client import LloomClient
    from tests.helpers.jobs import ask

    async with await LloomClient.connect(nats_server.url, timeout=5, busy_retries=0) as client:
        for round_ in range(20):
            conn = await nats.connect(nats_server.url)
            node = ExecutorNode(conn, OpenAICompatibleBackend(base_url=double.base_url), NodeConfig(),
                                models=["double-model"], **signing())  # fmt: skip
            await node.start()
            try:
                reply = await client.complete(ask())  # no retry: a missing subscription is NoExecutors
                assert reply.executor_id == node.id, round_
            finally:
                await node.stop(drain_timeout=1)
                await node.backend.aclose()
                await conn.close()
