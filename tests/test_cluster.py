"""The multi-node deployment of `compose/cluster.py`, run as a user runs it: a 3-node NATS cluster
with JetStream, `lloom-executor` processes on nodes 1 and 2, a client on node 3, and then the
loss of a node (SIGKILL) that an executor is connected to.

Everything is real except the backend, the in-process OpenAI double. Waits are retries
(`eventually`) or catalogue changes with deadlines on what a user would observe (answers, the
catalogue), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from compose.cluster import Deployment
from protocol.client import LloomClient
from protocol.errors import LloomError
from protocol.messages import ChatRequest, ChatResponse
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.jobs import ask as ask_model
from tests.helpers.wait import eventually

# Processes, a node's loss and a reconnect: more than the default 120 s may pass on a loaded machine,
# within the deadlines below (the results alone may take 3 * SETTLE_S).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "demo-model"
JOBS = 40
# Upper bound for the network to settle after a change (a reconnect, a heartbeat);
# it takes a second or two, this only turns a hang into a failure with a message.
SETTLE_S = 15.0
T = TypeVar("T")


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    """nats-1..3 in a cluster, exec-1 on nats-1 and exec-2 on nats-2; every process stopped at teardown."""
    async with OpenAIDouble(models=[MODEL]) as double:
        async with Deployment(nats_nodes=3, executors=2, backend_url=double.base_url, workdir=tmp_path) as d:
            yield d


def ask() -> ChatRequest:
    return ask_model(MODEL, "hi", max_tokens=8)


async def retry(attempt: Callable[[], Awaitable[T]], what: str) -> T:
    """`attempt()`'s first success; fails the test, with the last errors, if none comes within SETTLE_S."""
    errors: list[LloomError] = []

    async def once() -> T | None:
        try:
            return await attempt()
        except LloomError as e:
            errors.append(e)
            return None

    return await eventually(once, timeout=SETTLE_S, interval=0.1, what=lambda: f"{what}; last errors: {errors[-3:]!r}")


async def catalogue_lists(client: LloomClient, executors: set[str]) -> None:
    """Return once the client's live catalogue lists exactly `executors`."""
    catalog = await client.catalog()
    try:
        async with asyncio.timeout(SETTLE_S):
            while {e.executor_id for e in catalog.entries()} != executors:
                await catalog.wait_changed(timeout=0.5)  # short: an expiry is noticed only when asked
    except TimeoutError:
        listed = sorted(e.executor_id for e in catalog.entries())
        pytest.fail(f"catalogue lists {listed}, not {sorted(executors)}, after {SETTLE_S}s")


async def test_a_client_on_node_3_is_served_across_the_cluster_and_keeps_being_served_when_a_node_dies(
    deployment: Deployment,
) -> None:
    nats1, nats2, nats3 = deployment.nats.nodes
    exec1, exec2 = deployment.executors
    assert (exec1.nats_url, exec2.nats_url) == (nats1.url, nats2.url)

    async with await LloomClient.connect(nats3.url, timeout=5.0) as client:
        await catalogue_lists(client, {"exec-1", "exec-2"})
        # One queue group spans the cluster: jobs published on nats-3 reach both nodes.
        served = Counter([(await client.complete(ask())).executor_id for _ in range(JOBS)])
        assert set(served) == {"exec-1", "exec-2"}, served
        # Durable jobs go into the replicated work queue (R3) through nats-3.
        queued = [await client.submit(ask()) for _ in range(10)]

        nats1.kill()  # exec-1's server, and perhaps the queue's stream leader
        queued += [await retry(lambda: client.submit(ask()), "a queued job accepted after nats-1 died") for _ in range(10)]

        reply: ChatResponse = await retry(lambda: client.complete(ask(), timeout=2.0), "an answer after nats-1 died")
        assert reply.content
        # exec-1 reconnected to a node it learnt from the cluster: a job addressed to it is served.
        reply = await retry(
            lambda: client.complete(ask(), executor="exec-1", timeout=2.0), "exec-1 serving again after nats-1 died"
        )
        assert reply.executor_id == "exec-1"
        await catalogue_lists(client, {"exec-1", "exec-2"})
        assert exec1.proc is not None and exec1.proc.returncode is None
        # Every queued job, from before and after the loss, has run and has its result.
        results = [await client.result(job, timeout=3 * SETTLE_S) for job in queued]
        assert [r.job_id for r in results] == queued and all(r.content for r in results)
