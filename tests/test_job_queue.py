"""The durable job queue: `queue` fallbacks, submitted jobs, results, redelivery — on real JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from executor.backends.breaker import CircuitBreaker
from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.pool import BackendPool, Member
from executor.config import FallbackConfig, LoadBalancingConfig, NodeConfig, QueueConfig, RetryConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.queue.consumer import JobQueue
from executor.queue.producer import JobEnqueuer
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.durable import JOBS_STREAM, jobs_subject
from protocol.errors import BackendError, InvalidRequest, JobQueued, ResultPending
from protocol.messages import encoder
from tests.conftest import Signing
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask
from tests.helpers.wait import eventually

WAIT = 15.0
FAST_RETRY = RetryConfig(max_retries=0, initial_delay_ms=20, max_delay_ms=100)


@pytest.fixture
async def js_nc(js_server: EmbeddedNats) -> AsyncIterator[NATS]:
    nc = await nats.connect(js_server.url)
    yield nc
    await nc.close()


async def _node_with_queue(
    nc: NATS, backend: object, *, models: list[str] | None = None, fallback: set[str] = frozenset(),  # type: ignore[assignment]
    config: QueueConfig | None = None, node_config: NodeConfig | None = None, signing: Signing | None = None,
) -> tuple[ExecutorNode, JobQueue]:  # fmt: skip
    config = config or QueueConfig()
    enqueuer = JobEnqueuer(nc.jetstream(), fallback_models=fallback, consume_all=config.consume_all)
    # Signing (receipts) only where a test reads a direct reply: queued results are read from the bucket.
    node = ExecutorNode(nc, backend, node_config or NodeConfig(), models=models, queue=enqueuer,  # type: ignore[arg-type]
                        **(signing() if signing else {}))  # fmt: skip
    queue = JobQueue(nc, node, enqueuer, config, retry=FAST_RETRY, idle_poll_s=0.02, fetch_wait_s=0.2)
    await node.start()
    await queue.start()
    return node, queue


async def _consuming_node(nc: NATS, double: OpenAIDouble, *, node_config: NodeConfig | None = None,
                          **queue: object) -> tuple[ExecutorNode, JobQueue]:  # fmt: skip
    """A node on the double that takes every queued job for its models (`consume_all`)."""
    return await _node_with_queue(nc, OpenAICompatibleBackend(base_url=double.base_url), models=["double-model"],
                                  config=QueueConfig(consume_all=True, **queue), node_config=node_config)  # type: ignore[arg-type]  # fmt: skip


def _queue_pool(double: OpenAIDouble, breaker: CircuitBreaker | None = None) -> BackendPool:
    """A pool of one backend serving "m", whose fallback is the durable queue."""
    backend = OpenAICompatibleBackend(base_url=double.base_url, timeout_secs=5)
    return BackendPool([Member("only", backend, ["m"], 1, breaker or CircuitBreaker())], balancing=LoadBalancingConfig(),
                       retry=FAST_RETRY, fallbacks={"m": FallbackConfig(model="m", strategy="queue")})  # fmt: skip


async def _queue_emptied(js: JetStreamContext) -> None:
    """Return once the jobs stream holds no message: acked (or given-up) jobs leave a work queue.

    Nothing announces it to a bystander, so the stream's state is polled, bounded."""

    async def empty() -> bool:
        return (await js.stream_info(JOBS_STREAM)).state.messages == 0

    await eventually(empty, timeout=WAIT, what="the jobs stream emptied")


async def _stop(node: ExecutorNode, queue: JobQueue) -> None:
    await node.stop(drain_timeout=1)
    await queue.stop()
    await node.backend.aclose()


async def test_a_job_no_backend_can_serve_waits_in_the_queue_and_runs_when_one_returns(
    js_nc: NATS, js_client: LloomClient
) -> None:
    async with OpenAIDouble(models=["m"]) as double:
        pool = _queue_pool(double, CircuitBreaker(failure_threshold=1, cooldown_s=3600))  # only a health check closes it
        node, queue = await _node_with_queue(js_nc, pool, fallback={"m"})
        double.fault = Fault.status(503, "down for maintenance")

        with pytest.raises(JobQueued) as queued:
            await js_client.complete(ask(model="m", text="hello there"))
        job_id = queued.value.job_id
        assert job_id and "durable queue" in queued.value.message
        assert await js_client.fetch(job_id) is None  # waiting: the breaker is open, nobody pulls it
        with pytest.raises(ResultPending):
            await js_client.result(job_id, timeout=0.3)
        assert not node.model_available("m") and len(double.requests) == 1  # tried once, then parked

        double.fault = None
        assert await pool.health_check()  # the backend is back: the breaker closes, the worker pulls
        reply = await js_client.result(job_id, timeout=WAIT)
        assert reply.job_id == job_id and reply.content and reply.usage.prompt_tokens == 2
        assert len(double.requests) == 2
        assert await js_client.fetch(job_id) == reply
        assert queue.stats.queued == 1 and queue.stats.ran == 1
        await _stop(node, queue)


async def test_streams_are_not_queued_they_fail_with_the_backends_error(js_nc: NATS, js_client: LloomClient) -> None:
    async with OpenAIDouble(models=["m"]) as double:
        pool = _queue_pool(double)
        node, queue = await _node_with_queue(js_nc, pool, fallback={"m"})
        double.fault = Fault.status(503)
        with pytest.raises(BackendError):
            async with js_client.stream(ask(model="m")) as stream:
                async for _ in stream:
                    pass
        assert queue.stats.queued == 0
        await _stop(node, queue)


async def test_submitted_jobs_each_run_once_and_their_results_can_be_fetched(
    js_nc: NATS, js_client: LloomClient, double: OpenAIDouble
) -> None:
    node, queue = await _consuming_node(js_nc, double)
    ids = [await js_client.submit(ask(text=f"job number {i}")) for i in range(12)]
    replies = await asyncio.gather(*(js_client.result(i, timeout=WAIT) for i in ids))
    assert [r.job_id for r in replies] == ids
    assert double.completed == 12

    # The same job submitted again is stored once (Nats-Msg-Id) and not run again.
    assert await js_client.submit(ask(text="job number 0"), job_id=ids[0]) == ids[0]
    # A redelivered job whose result exists (here: published again under another message id) is
    # acknowledged without running: not run twice, not billed twice.
    await js_nc.jetstream().publish(
        jobs_subject("double-model"), encoder.encode(ask()), headers={"Nats-Msg-Id": "other", "Lloom-Job-Id": ids[1]}
    )
    await _queue_emptied(js_nc.jetstream())
    assert queue.stats.skipped == 1
    assert double.completed == 12
    assert await js_client.fetch(ids[1]) == replies[1]
    await _stop(node, queue)


async def test_bad_queued_jobs_get_a_typed_error_result_and_the_node_keeps_serving(
    js_nc: NATS, js_client: LloomClient, double: OpenAIDouble
) -> None:
    node, queue = await _consuming_node(js_nc, double, node_config=NodeConfig(max_tokens_cap=100))
    too_long = await js_client.submit(ask(max_tokens=1000))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        await js_client.result(too_long, timeout=WAIT)
    await js_nc.jetstream().publish(
        jobs_subject("double-model"), b"{not json", headers={"Nats-Msg-Id": "garbage", "Lloom-Job-Id": "garbage-1"}
    )
    with pytest.raises(InvalidRequest, match="invalid request"):
        await js_client.result("garbage-1", timeout=WAIT)
    ok = await js_client.submit(ask())
    assert (await js_client.result(ok, timeout=WAIT)).content
    assert queue.stats.failed == 2
    await _stop(node, queue)


async def test_a_job_that_keeps_failing_is_redelivered_up_to_max_deliver_then_gets_the_error(
    js_nc: NATS, js_client: LloomClient, double: OpenAIDouble
) -> None:
    node, queue = await _consuming_node(js_nc, double, max_deliver=3)
    double.fault = Fault.status(502, "bad gateway")
    job = await js_client.submit(ask())
    with pytest.raises(BackendError, match="bad gateway"):
        await js_client.result(job, timeout=WAIT)
    assert len(double.requests) == 3  # one run per delivery
    assert queue.stats.handed_back == 2 and queue.stats.failed == 1
    await _stop(node, queue)


async def test_queued_jobs_wait_while_the_node_is_full_and_run_when_it_has_room(
    js_nc: NATS, js_client: LloomClient, double: OpenAIDouble
) -> None:
    node, queue = await _consuming_node(js_nc, double, node_config=NodeConfig(max_concurrent_jobs=2))
    double.fault = Fault.slow(0.01)
    ids = [await js_client.submit(ask()) for _ in range(6)]
    replies = await asyncio.gather(*(js_client.result(i, timeout=WAIT) for i in ids))
    assert all(r.content for r in replies)
    assert double.completed == 6 and queue.stats.ran == 6
    assert node.stats.busy == 0  # the worker never took more than the node had room for
    await _stop(node, queue)


async def test_a_job_whose_last_delivery_dies_gets_an_error_result_and_leaves_the_queue(
    js_nc: NATS, js_client: LloomClient, double: OpenAIDouble
) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    from protocol.durable import consumer_name

    # This node pulls nothing (no queue fallback, no consume_all) but hears the server's advisories.
    backend = OpenAICompatibleBackend(base_url=double.base_url)
    node, queue = await _node_with_queue(js_nc, backend, models=["double-model"])
    # An executor that takes the job on its only allowed delivery, then dies (never acks).
    js = js_nc.jetstream()
    doomed = await js.pull_subscribe(
        jobs_subject("double-model"), durable=consumer_name("double-model"), stream=JOBS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, max_deliver=1),
    )  # fmt: skip
    job = await js_client.submit(ask())
    [taken] = await doomed.fetch(1, timeout=WAIT)
    assert taken.headers and taken.headers["Lloom-Job-Id"] == job
    with pytest.raises(BackendError, match="given up after 1 deliveries"):
        await js_client.result(job, timeout=WAIT)
    await _queue_emptied(js)
    assert len(double.requests) == 0
    await _stop(node, queue)


async def test_without_jetstream_queue_calls_fail_with_a_typed_error(client: LloomClient) -> None:
    from protocol.errors import QueueUnavailable

    with pytest.raises(QueueUnavailable, match="did not take job"):
        await client.submit(ask())
    with pytest.raises(QueueUnavailable):
        await client.fetch("some-job")
    with pytest.raises(QueueUnavailable, match="cannot read the result"):
        await client.result("some-job", timeout=0.5)


async def test_a_node_whose_queue_has_no_jetstream_starts_serves_and_answers_with_the_backends_error(
    nc: NATS, client: LloomClient, signing: Signing
) -> None:
    async with OpenAIDouble(models=["m"]) as double:
        pool = _queue_pool(double)
        node, queue = await _node_with_queue(nc, pool, fallback={"m"}, signing=signing)  # no JetStream on this server
        assert (await client.complete(ask(model="m"))).content  # serving as usual
        double.fault = Fault.status(503, "down")
        with pytest.raises(BackendError, match="down"):  # could not be queued: the backend's own error
            await client.complete(ask(model="m"))
        assert queue.stats.queued == 0
        await _stop(node, queue)
