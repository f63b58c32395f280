"""The deployment of compose/docker-compose.yml under node loss, counted: nothing lost, nothing run twice.

A client on the host sends jobs without pause (and queues durable ones) while the NATS node
executor-1 is connected to is SIGKILLed (`docker kill`) and started again, and then the node of
executor-2 and of the client itself. Per run: jobs attempted / completed / failed with a typed
error (by wire code) / lost (no answer and no error by the caller's deadline plus a grace: goal 0);
receipts expected (one per completed job) / stored in the R3 receipts stream / duplicated (a job
with two receipts: run twice; goal 0); every queued job's result.

Two tiers run the same scenario:
- `docker`: the compose file itself, built and started with the compose CLI (images built locally,
  secured cluster with the shipped permissions, client as `alice`, receipts read as `admin`).
  Without Docker it skips, saying how to install it; in CI (CI=true) it fails instead.
- `local`: compose/cluster.py's processes (the same nats-server config file, no users).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from compose.cluster import Deployment
from executor.process.embedded_nats import EmbeddedNats, free_port
from executor.receipts.publisher import STREAM
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions, connect_nats
from protocol.errors import LloomError
from protocol.messages import ChatRequest
from protocol.receipts import signed_receipt_decoder
from protocol.receipts_cli import stream_lines
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.docker_compose import ComposeProject, docker_unavailable
from tests.helpers.figures import record
from tests.helpers.jobs import ask as ask_model
from tests.helpers.wait import eventually

# A build (cached: seconds), three nodes, two kills under load, the results and receipts read back.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "demo-model"  # what the compose file's double serves
WORKERS = 4  # callers sending jobs one after another, at once
JOB_TIMEOUT_S = 10.0  # each job's deadline (the client's own)
LOST_GRACE_S = 5.0  # past the deadline with neither answer nor error: lost
SETTLE_S = 30.0  # bound on a recovery (reconnect, leader election, catch-up); a hang becomes a failure
QUEUED_PER_PHASE = 5


@dataclass
class Cluster:
    """What the scenario needs of a deployment, whichever runs it."""

    urls: list[str]  # client URLs of nats-1..3
    executors: tuple[str, str]  # executor ids: the first joined nats-1, the second nats-2
    client_options: NatsConnectOptions | None
    admin_options: NatsConnectOptions | None
    kill: Callable[[int], Awaitable[None]]  # SIGKILL node i (1-based)
    start: Callable[[int], Awaitable[None]]  # start node i again


@dataclass
class Counts:
    attempted: int = 0
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # wire code -> jobs
    untyped: list[str] = field(default_factory=list)  # anything else: a bug
    lost: int = 0
    job_ids: list[str] = field(default_factory=list)
    submit_refused: Counter[str] = field(default_factory=Counter)  # durable submissions refused, then retried


def ask() -> ChatRequest:
    return ask_model(MODEL, "hi", max_tokens=8)


async def one_job(client: LloomClient, counts: Counts) -> None:
    counts.attempted += 1
    deadline = asyncio.timeout(JOB_TIMEOUT_S + LOST_GRACE_S)
    try:
        async with deadline:
            reply = await client.complete(ask(), timeout=JOB_TIMEOUT_S)
    except LloomError as e:
        counts.failed[str(e.code)] += 1
    except TimeoutError:
        if deadline.expired():
            counts.lost += 1
        else:
            counts.untyped.append("TimeoutError")
    except Exception as e:  # noqa: BLE001 - counted, and the test fails on it
        counts.untyped.append(repr(e))
    else:
        counts.completed += 1
        counts.job_ids.append(reply.job_id)


async def keep_sending(client: LloomClient, counts: Counts, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await one_job(client, counts)


async def served_by(client: LloomClient, executor: str, what: str) -> None:
    """Return once `executor` answers a job addressed to it (within SETTLE_S)."""

    async def once() -> bool:
        try:
            reply = await client.complete(ask(), executor=executor, timeout=2.0)
        except LloomError:
            return False
        return reply.executor_id == executor

    await eventually(once, timeout=SETTLE_S, interval=0.2, what=what)


async def queue_jobs(client: LloomClient, counts: Counts, n: int) -> list[str]:
    """Submit `n` durable jobs; a refusal (typed: `queue_unavailable` while the stream elects a leader)
    is counted and the same job id submitted again, which stores nothing twice."""
    ids = []
    for _ in range(n):
        job_id = uuid.uuid4().hex

        async def once(job_id: str = job_id) -> bool:
            try:
                await client.submit(ask(), job_id=job_id)
            except LloomError as e:
                counts.submit_refused[str(e.code)] += 1
                return False
            return True

        await eventually(once, timeout=SETTLE_S, interval=0.2,
                         what=lambda: f"queued job accepted ({counts.submit_refused})")  # fmt: skip
        ids.append(job_id)
    return ids


async def completed_more(counts: Counts, than: int, what: str) -> None:
    await eventually(lambda: counts.completed >= than, timeout=SETTLE_S, interval=0.05, what=what)


async def receipts_stream_whole(admin: NATS) -> bool:
    """The R3 receipts stream has a leader and all three replicas current (after a node came back)."""
    try:
        info = await admin.jetstream(timeout=2.0).stream_info(STREAM)
    except Exception:  # noqa: BLE001 - not yet: no leader, or the request timed out
        return False
    cluster = info.cluster
    if cluster is None or not cluster.leader:
        return False
    replicas = cluster.replicas or []
    return len(replicas) == 2 and all(r.current and not r.offline for r in replicas)


@dataclass
class Ledger:
    """What the receipts stream holds: each job's distinct receipts, and identical copies.

    A copy of the same receipt (same executor, same seq: the outbox re-sent it, or the healer
    raced the original) is billed once (`lloom receipts report` counts it once); two distinct
    receipts for one job mean it ran twice."""

    receipts: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # job id -> {(executor, seq)}
    copies: int = 0

    def doubled(self) -> dict[str, list[tuple[str, int]]]:
        return {job: sorted(r) for job, r in self.receipts.items() if len(r) > 1}


async def stored_receipts(admin: NATS) -> Ledger:
    ledger = Ledger()
    async for _, line, _ in stream_lines(admin):
        receipt = signed_receipt_decoder.decode(line).receipt
        held = ledger.receipts.setdefault(receipt.job_id, set())
        key = (receipt.executor_id, receipt.seq)
        ledger.copies += key in held
        held.add(key)
    return ledger


async def run_scenario(cluster: Cluster, name: str) -> dict[str, object]:
    first, second = cluster.executors
    counts = Counts()
    # The client joins nats-2 (it learns the others from the cluster): the second kill is its own node.
    client = await LloomClient.connect(cluster.urls[1], timeout=JOB_TIMEOUT_S, options=cluster.client_options)
    admin = await connect_nats(cluster.urls[2], name="lloom-test-admin", options=cluster.admin_options)
    queued: list[str] = []
    recovery: dict[str, float] = {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await served_by(client, first, f"{first} serving before any fault")
        await served_by(client, second, f"{second} serving before any fault")
        workers = [asyncio.create_task(keep_sending(client, counts, stop)) for _ in range(WORKERS)]
        try:
            await completed_more(counts, 20, "20 jobs completed before any fault")
            queued += await queue_jobs(client, counts, QUEUED_PER_PHASE)

            # 1. The node executor-1 is connected to.
            before, t0 = counts.completed, loop.time()
            await cluster.kill(1)
            await served_by(client, first, f"{first} serving again after nats-1 was killed")
            recovery["nats-1 killed: its executor serving again"] = loop.time() - t0
            await completed_more(counts, before + 20, "20 more jobs completed after nats-1 was killed")
            queued += await queue_jobs(client, counts, QUEUED_PER_PHASE)
            await cluster.start(1)
            await eventually(lambda: receipts_stream_whole(admin), timeout=SETTLE_S, interval=0.2,
                             what="the receipts stream whole again after nats-1 came back")  # fmt: skip

            # 2. The node of executor-2 and of the client itself.
            before, t0 = counts.completed, loop.time()
            await cluster.kill(2)
            await served_by(client, second, f"{second} serving again after nats-2 was killed")
            recovery["nats-2 killed: its executor and the client serving again"] = loop.time() - t0
            await completed_more(counts, before + 20, "20 more jobs completed after nats-2 was killed")
            queued += await queue_jobs(client, counts, QUEUED_PER_PHASE)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        await cluster.start(2)
        await eventually(lambda: receipts_stream_whole(admin), timeout=SETTLE_S, interval=0.2,
                         what="the receipts stream whole again after nats-2 came back")  # fmt: skip

        results = [await client.result(job, timeout=SETTLE_S) for job in queued]
        expected = set(counts.job_ids) | {r.job_id for r in results}
        stored = Ledger()

        async def all_stored() -> bool:
            nonlocal stored
            try:
                stored = await stored_receipts(admin)
            except (nats.errors.Error, TimeoutError):
                return False  # a read of the R3 stream may time out while its new leader settles: try again
            return expected <= stored.receipts.keys()

        def missing() -> str:
            return f"receipts missing for {len(expected - stored.receipts.keys())} of {len(expected)} jobs"

        await eventually(all_stored, timeout=SETTLE_S, interval=0.5, what=missing)
    finally:
        await client.close()
        await admin.close()

    figures: dict[str, object] = {
        "jobs attempted": counts.attempted, "completed": counts.completed, "failed typed": dict(counts.failed),
        "lost": counts.lost, "untyped errors": counts.untyped,
        "queued": len(queued), "submissions refused then retried": dict(counts.submit_refused),
        "queued results": sum(1 for r in results if r.content),
        "receipts expected": len(expected), "stored": len(expected & stored.receipts.keys()),
        "duplicated": sum(len(r) - 1 for r in stored.doubled().values()), "doubled jobs": stored.doubled(),
        "identical copies (billed once)": stored.copies,
        "recovery s": {k: round(v, 2) for k, v in recovery.items()},
    }  # fmt: skip
    print(f"{name}: {figures}")
    record(f"compose-{name}", figures)
    return figures


def assert_goals(figures: dict[str, object]) -> None:
    assert figures["lost"] == 0, figures
    assert figures["untyped errors"] == [], figures
    assert figures["queued results"] == figures["queued"], figures
    assert figures["stored"] == figures["receipts expected"], figures
    assert figures["duplicated"] == 0, figures
    attempted, completed, failed = figures["jobs attempted"], figures["completed"], figures["failed typed"]
    assert isinstance(failed, dict) and attempted == completed + sum(failed.values()), figures


async def assert_outsiders_refused(cluster: Cluster, project: ComposeProject) -> None:
    """The cluster runs the shipped permissions (compose/nats/secure.conf): each denial beside its allowance."""
    url = cluster.urls[0]
    with pytest.raises(ConnectionError):  # no credentials, no bus
        await connect_nats(url, name="outsider", options=NatsConnectOptions(connect_timeout_secs=2), initial_attempts=1)
    admin = await connect_nats(url, name="lloom-test-admin", options=cluster.admin_options)
    alice = await connect_nats(url, name="lloom-test-alice", options=cluster.client_options)
    try:
        info = await admin.jetstream(timeout=5).stream_info(STREAM)
        assert info.config.num_replicas == 3 and info.config.deny_purge and info.config.deny_delete
        # A client may not even look at the ledger (its request is dropped by the server: no answer).
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await alice.jetstream(timeout=1).stream_info(STREAM)
        # Nobody purges it, not even the admin: the stream itself refuses.
        with pytest.raises(nats.js.errors.APIError):
            await admin.jetstream(timeout=5).purge_stream(STREAM)
    finally:
        await alice.close()
        await admin.close()
    # A server that offers itself as a route without the route password is refused.
    route = f"nats://127.0.0.1:{project.ports['LLOOM_NATS_1_CLUSTER_PORT']}"
    intruder = EmbeddedNats(extra_args=["--cluster_name", "lloom", "--cluster", f"nats://127.0.0.1:{free_port()}",
                                        "--routes", route])  # fmt: skip
    async with intruder:
        await eventually(lambda: any("Authorization Violation" in line for line in intruder.log_tail), timeout=SETTLE_S,
                         what="the cluster refusing a route without its password")  # fmt: skip


async def gateway_answers(port: int) -> None:
    """The compose file's HTTP gateway serves a chat completion from the cluster's executors."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with aiohttp.ClientSession() as http:

        async def lists_the_model() -> bool:  # `up` returns before the gateway listens: nothing waits for it
            try:
                async with http.get(f"http://127.0.0.1:{port}/v1/models") as r:
                    return r.status == 200 and MODEL in {m["id"] for m in (await r.json())["data"]}
            except aiohttp.ClientError:
                return False

        await eventually(lists_the_model, timeout=SETTLE_S, interval=0.2, what=f"the gateway listing {MODEL}")
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            reply = await r.json()
    assert reply["choices"][0]["message"]["content"] and reply["provider"] in ("executor-1", "executor-2"), reply


async def healthz(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def compose_cluster(tmp_path: Path) -> AsyncIterator[tuple[Cluster, ComposeProject]]:
    why = docker_unavailable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the Docker tier: {why}")
        pytest.skip(why)
    project = ComposeProject(tmp_path)

    async def kill(node: int) -> None:
        await asyncio.to_thread(project.kill, f"nats-{node}")

    async def start(node: int) -> None:
        await asyncio.to_thread(project.start, f"nats-{node}")
        await eventually(lambda: healthz(project.monitor_port(node)), timeout=SETTLE_S, interval=0.2,
                         what=f"nats-{node}'s /healthz after its start")  # fmt: skip

    creds = project.credentials
    try:
        await asyncio.to_thread(project.up)
        yield Cluster(
            urls=project.urls(),
            executors=("executor-1", "executor-2"),
            client_options=NatsConnectOptions(user="alice", password=creds["LLOOM_NATS_ALICE_PASSWORD"],
                                              inbox_prefix="_INBOX_alice"),
            admin_options=NatsConnectOptions(user="admin", password=creds["LLOOM_NATS_ADMIN_PASSWORD"]),
            kill=kill, start=start,
        ), project  # fmt: skip
    finally:
        # Every service's last log lines go to compose.log in the test's tmp_path, whatever happened.
        await asyncio.to_thread(project.logs)
        await asyncio.to_thread(project.down)


@pytest.fixture
async def local_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with OpenAIDouble(models=[MODEL]) as double:
        async with Deployment(nats_nodes=3, executors=2, backend_url=double.base_url, workdir=tmp_path) as d:

            async def kill(node: int) -> None:
                d.nats.nodes[node - 1].kill()

            async def start(node: int) -> None:
                await d.nats.nodes[node - 1].stop()  # reaps the killed server, frees its store's lock
                await d.nats.nodes[node - 1].start()  # same port, same store

            yield Cluster(urls=d.nats.urls, executors=("exec-1", "exec-2"), client_options=None,
                          admin_options=None, kill=kill, start=start)  # fmt: skip


@pytest.mark.docker
async def test_compose_deployment_refuses_outsiders_serves_http_and_loses_no_job_nor_doubles_a_receipt_when_nodes_die(
    compose_cluster: tuple[Cluster, ComposeProject],
) -> None:
    cluster, project = compose_cluster
    await assert_outsiders_refused(cluster, project)
    await gateway_answers(project.ports["LLOOM_GATEWAY_PORT"])
    assert_goals(await run_scenario(cluster, "docker"))
    await gateway_answers(project.ports["LLOOM_GATEWAY_PORT"])  # after nats-1 and nats-2 were killed


async def test_the_same_scenario_on_local_processes_loses_no_job_and_doubles_no_receipt(local_cluster: Cluster) -> None:
    assert_goals(await run_scenario(local_cluster, "local"))
