"""Faults on a real 3-node NATS cluster, counted: nothing lost, nothing run twice, every receipt stored once (issue 19).

Each test is one scenario on the cluster users run (`compose/cluster.py`'s nodes, routes
and R3 `LLOOM_RECEIPTS` stream, through tests/helpers/cluster.py): real `nats-server`
processes the test SIGKILLs, restarts on the same ports and stores, or SIGSTOPs; real
`lloom-executor` processes with the OpenAI test double (in this process) as backend; real
`LloomClient`s connected with all the cluster's URLs, so they fail over. Every job's
prompt carries a marker, so the double tells how often each job reached the backend and
ran to the end. Each test counts jobs attempted / completed / failed with a typed error /
lost (no answer and no error within the deadline plus a grace) / run twice, and receipts
expected (held by callers) / stored in the stream / duplicated, with recovery times. With
`LLOOM_CLUSTER_FAULTS_FIGURES=<file>` each appends its figures there (JSON lines);
`scripts/faults_cluster.py` runs this module that way and writes docs/faults.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.receipts import signed_receipt_decoder
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.cluster import Cluster, executor_config
from tests.helpers.fault_tally import (
    DEADLINE_S,
    GRACE_S,
    SETTLE_S,
    Tally,
    assert_goals,
    executor_status,
    idle,
    since,
)
from tests.helpers.jobs import MODEL
from tests.helpers.processes import ROOT, Executor, StartExecutor
from tests.helpers.wait import eventually, within

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

# Short liveness pings (default 5 s): an outage must not be taken for the callers' absence.
NODE = {"liveness_interval_secs": 1.0}


@dataclass
class Rig:
    """One scenario's parts: the cluster, the backend double, executors on chosen nodes, clients with every URL."""

    cluster: Cluster
    backend: OpenAIDouble
    start_executor: StartExecutor
    tmp_path: Path
    executors: dict[str, Executor] = field(default_factory=dict)

    async def executor(self, name: str, node: int) -> Executor:
        """`lloom-executor` `name` joined to node `node` (its outbox and identity kept across restarts)."""
        config = executor_config(self.tmp_path / name, name, self.backend.base_url, **NODE)
        executor = await self.start_executor("--config", str(config), "--nats", self.cluster.urls[node])
        await executor.started()
        self.executors[name] = executor
        return executor

    async def client(self) -> LloomClient:
        return await LloomClient.connect(self.cluster.urls, timeout=DEADLINE_S)

    def other_nodes(self, client: LloomClient) -> list[int]:
        on = self.cluster.node_of(client.nc)
        assert on >= 0
        return [i for i in range(3) if i != on]


@pytest.fixture
async def rig(start_executor: StartExecutor, tmp_path: Path) -> AsyncIterator[Rig]:
    cluster = Cluster(tmp_path / "nats")
    async with OpenAIDouble(models=[MODEL]) as backend:
        await cluster.start()
        rig = Rig(cluster, backend, start_executor, tmp_path)
        try:
            yield rig
        finally:
            for executor in rig.executors.values():
                await executor.close()  # before their servers go (start_executor would kill them after)
            await cluster.stop()


async def all_done(calls: list[asyncio.Task[None]]) -> None:
    await within(asyncio.gather(*calls), "every call ended", timeout=DEADLINE_S + 2 * GRACE_S)


# -- 1. the node a client is connected to dies --------------------------------------------


async def test_killing_the_node_a_client_is_on_mid_stream(rig: Rig) -> None:
    tally = Tally("client's node SIGKILLed mid-stream", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        on = rig.cluster.node_of(client.nc)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        rig.backend.completion_tokens, streams = 30, 6
        rig.backend.fault = Fault.slow(0.1)  # 3 s streams: the node dies with every one half sent
        calls = [asyncio.create_task(tally.stream(client, f"stream {i}", 30)) for i in range(streams)]
        await eventually(lambda: rig.backend.in_flight == streams, timeout=10, what="every stream at the backend")
        killed = time.monotonic()
        await rig.cluster.kill(on)
        moved = await eventually(lambda: rig.cluster.node_of(client.nc) not in (-1, on), timeout=SETTLE_S,
                                 what="the client on another node")  # fmt: skip
        reconnected = since(killed)
        await all_done(calls)
        answered = since(killed)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(client_reconnected_s=reconnected, all_answered_s=answered, **receipts)
    assert moved
    assert_goals(row, receipts)
    assert row["completed"] == streams


async def test_killing_the_node_a_client_is_on_between_jobs(rig: Rig) -> None:
    tally = Tally("client's node SIGKILLed between jobs", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        on = rig.cluster.node_of(client.nc)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        for i in range(10):
            await tally.unary(client, f"before {i}")
        killed = time.monotonic()
        await rig.cluster.kill(on)
        await tally.unary(client, "first after")  # sent while the client may still be reconnecting
        first = since(killed)
        for i in range(9):
            await tally.unary(client, f"after {i}")
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(first_answer_after_kill_s=first, **receipts)
    assert_goals(row, receipts)
    assert row["completed"] == 20


async def test_a_job_sent_into_the_clients_dying_node_is_sent_again(rig: Rig) -> None:
    tally = Tally("client's node SIGKILLed with job requests in its socket", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        on = rig.cluster.node_of(client.nc)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        await tally.unary(client, "before")
        # The node stops reading, takes the requests into its socket and dies without routing them:
        # no executor ever sees them, so none can answer or re-send.
        rig.cluster.pause(on)
        sent = client.nc.stats["out_msgs"]
        calls = [asyncio.create_task(tally.unary(client, f"job {i}")) for i in range(5)]
        await eventually(lambda: client.nc.stats["out_msgs"] >= sent + 5 and client.nc.pending_data_size == 0,
                         timeout=5, what="the requests written to the paused node's socket")  # fmt: skip
        killed = time.monotonic()
        await rig.cluster.kill(on)
        await all_done(calls)
        answered = since(killed)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(all_answered_s=answered, **receipts)
    assert_goals(row, receipts)
    assert row["completed"] == 6
    assert len(rig.backend.requests) == 6  # each job ran once: the lost requests were never run


# -- 2. the node an executor is connected to dies -----------------------------------------


async def test_killing_the_node_an_executor_is_on_mid_job(rig: Rig) -> None:
    tally = Tally("executor's node SIGKILLed mid-job", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        rig.backend.fault = Fault.slow(2.0)
        jobs = 20
        calls = [asyncio.create_task(tally.unary(client, f"job {i}")) for i in range(jobs)]
        await eventually(lambda: rig.backend.in_flight == jobs, timeout=10, what="every job at the backend")
        on_a = (await executor_status(rig.cluster, "exec-1")).in_flight
        killed = time.monotonic()
        await rig.cluster.kill(a)
        await all_done(calls)
        answered = since(killed)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(jobs_on_the_dead_node=on_a, all_answered_s=answered, **receipts)
    assert_goals(row, receipts)
    assert row["completed"] == jobs


# -- 3. every node restarts at once -------------------------------------------------------


async def test_restarting_the_whole_cluster_under_load(rig: Rig) -> None:
    tally = Tally("whole cluster SIGKILLed and restarted under load", rig.backend)
    async with await rig.client() as client:
        await asyncio.gather(rig.executor("exec-1", 0), rig.executor("exec-2", 1))
        rig.backend.fault = Fault.slow(2.0)
        jobs = 20
        calls = [asyncio.create_task(tally.unary(client, f"in flight {i}")) for i in range(jobs)]
        await eventually(lambda: rig.backend.in_flight == jobs, timeout=10, what="every job at the backend")
        killed = time.monotonic()
        await asyncio.gather(*(rig.cluster.kill(i) for i in range(3)))
        # Jobs keep coming while the cluster is down: nats.py holds them until it reconnects.
        for i in range(10):
            calls.append(asyncio.create_task(tally.unary(client, f"during the outage {i}")))
            await asyncio.sleep(0.05)  # the behaviour: a caller sending a job every 50 ms
        await asyncio.gather(*(rig.cluster.restart(i) for i in range(3)))
        restarted = since(killed)
        await all_done(calls)  # answers need no JetStream: receipts wait in the outboxes
        answered = since(killed)
        await rig.cluster.jetstream_ready()
        jetstream = since(killed)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(outage_s=restarted, jetstream_back_s=jetstream, all_answered_s=answered, **receipts)
    assert_goals(row, receipts)
    assert row["completed"] == jobs + 10


# -- 4. an executor dies mid-job -----------------------------------------------------------


async def test_killing_an_executor_mid_job(rig: Rig) -> None:
    tally = Tally("executor SIGKILLed mid-job (2 executors)", rig.backend)
    async with await rig.client() as client:
        exec1, _ = await asyncio.gather(rig.executor("exec-1", 0), rig.executor("exec-2", 1))
        for i in range(10):  # receipts in both outboxes before the kill
            await tally.unary(client, f"before {i}")
        rig.backend.fault = Fault.slow(2.0)
        jobs = 20
        calls = [asyncio.create_task(tally.unary(client, f"job {i}")) for i in range(jobs)]
        await eventually(lambda: rig.backend.in_flight == jobs, timeout=10, what="every job at the backend")
        on_1 = (await executor_status(rig.cluster, "exec-1")).in_flight
        killed = time.monotonic()
        exec1.proc.kill()
        await all_done(calls)
        answered = since(killed)
        rig.backend.fault = None
        await rig.executor("exec-1", 0)  # as a restart policy would: its outbox goes out now
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(jobs_on_the_dead_executor=on_1, all_answered_s=answered, **receipts)
    assert_goals(row, receipts)
    assert row["completed"] == jobs + 10
    assert row["retried"] == on_1  # each job of the dead executor reached the backend again, once


async def keepalive_from(url: str, executor_id: str) -> None:
    """Return once `executor_id` sends a keepalive to any caller (heard on the node at `url`)."""
    nc = await nats.connect(url)
    heard = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if msg.headers and msg.headers.get(subj.HDR_KEEPALIVE) == executor_id:
            heard.set()

    try:
        await nc.subscribe("_INBOX.>", cb=on_msg)
        await heard.wait()
    finally:
        await nc.close()


# -- 5. a node stops answering (a partition, seen from outside) ---------------------------


PAUSE_S = 5.0  # longer than the client's 3 s silence window and the catalogue's heartbeats
# Longer than the 5 s a job just sent may go unheard (its first keepalive's grace, then the silence window).
CLIENT_PAUSE_S = 7.0


@pytest.mark.xfail(strict=True, reason=(
    "a partitioned executor's jobs run twice and are billed twice: after 3 s without a keepalive the client"
    " retries them on another executor (as it must for a dead one), while the paused node's executor finishes"
    " them too; its answers reach nobody and its receipts bill work no caller took (unclaimed). Telling a"
    " partition from a death needs fencing the client cannot do alone (see docs/faults.md, Cluster)"))
async def test_pausing_the_node_an_executor_is_on_longer_than_the_heartbeat_window(rig: Rig) -> None:
    tally = Tally(f"executor's node SIGSTOPped {PAUSE_S:g} s mid-job", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        rig.backend.fault = Fault.slow(2.0)
        jobs = 20
        calls = [asyncio.create_task(tally.unary(client, f"job {i}")) for i in range(jobs)]
        await eventually(lambda: rig.backend.in_flight == jobs, timeout=10, what="every job at the backend")
        on_a = (await executor_status(rig.cluster, "exec-1")).in_flight
        # The client watches exec-1's jobs (it heard from them) before their node goes quiet.
        await within(keepalive_from(rig.cluster.urls[a], "exec-1"), "a keepalive from exec-1")
        paused = time.monotonic()
        rig.cluster.pause(a)
        await asyncio.sleep(PAUSE_S)  # the length of the pause is the fault, not a wait for something
        rig.cluster.cont(a)
        await all_done(calls)
        answered = since(paused)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(jobs_on_the_paused_node=on_a, pause_s=PAUSE_S, all_answered_s=answered, **receipts)
    assert_goals(row, receipts)
    assert row["completed"] == jobs


# nats-py 2.16 leaves the socket of a failed reconnect attempt unclosed (Client._select_next_server drops
# the transport when the paused server accepts the TCP connection but never sends INFO); it is collected
# here (gc.collect at the end of the test), not in whichever test runs next.
NATS_PY_UNCLOSED_RECONNECT = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*StreamWriter.__del__:pytest.PytestUnraisableExceptionWarning")


@NATS_PY_UNCLOSED_RECONNECT
async def test_pausing_the_node_a_client_is_on_longer_than_the_heartbeat_window(rig: Rig) -> None:
    tally = Tally(f"client's node SIGSTOPped {CLIENT_PAUSE_S:g} s mid-job", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        on = rig.cluster.node_of(client.nc)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        rig.backend.fault = Fault.slow(2.0)
        jobs = 10
        calls = [asyncio.create_task(tally.unary(client, f"job {i}")) for i in range(jobs)]
        await eventually(lambda: rig.backend.in_flight == jobs, timeout=10, what="every job at the backend")
        paused = time.monotonic()
        rig.cluster.pause(on)
        await asyncio.sleep(CLIENT_PAUSE_S)  # the length of the pause is the fault
        rig.cluster.cont(on)
        await all_done(calls)
        answered = since(paused)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(pause_s=CLIENT_PAUSE_S, all_answered_s=answered, **receipts)
    gc.collect()  # see NATS_PY_UNCLOSED_RECONNECT
    assert_goals(row, receipts)
    assert row["completed"] == jobs


@NATS_PY_UNCLOSED_RECONNECT
async def test_a_client_leaves_its_node_when_it_stays_paused(rig: Rig) -> None:
    tally = Tally("client's node SIGSTOPped mid-job, not resumed", rig.backend)
    async with await rig.client() as client:
        a, b = rig.other_nodes(client)
        on = rig.cluster.node_of(client.nc)
        await asyncio.gather(rig.executor("exec-1", a), rig.executor("exec-2", b))
        rig.backend.fault = Fault.slow(2.0)
        jobs = 10
        calls = [asyncio.create_task(tally.unary(client, f"job {i}")) for i in range(jobs)]
        await eventually(lambda: rig.backend.in_flight == jobs, timeout=10, what="every job at the backend")
        paused = time.monotonic()
        rig.cluster.pause(on)  # until the end: the client must leave it (within its ping window)
        await all_done(calls)
        answered = since(paused)
        moved = rig.cluster.node_of(client.nc)
        rig.cluster.cont(on)
        receipts = await tally.receipts(rig.cluster, ["exec-1", "exec-2"])
    row = tally.record(all_answered_s=answered, **receipts)
    gc.collect()  # see NATS_PY_UNCLOSED_RECONNECT
    assert moved not in (-1, on)  # answered through another node, while its own was still paused
    assert_goals(row, receipts)
    assert row["completed"] == jobs


# -- 6. a slow consumer ---------------------------------------------------------------------

STALLED_CLIENT = """
import asyncio, json, sys
import msgspec
from protocol.client import LloomClient
from protocol.errors import LloomError
from tests.helpers.jobs import ask

async def main():
    async with await LloomClient.connect(sys.argv[1].split(","), timeout=float(sys.argv[3])) as client:
        seqs = []
        try:
            async with client.stream(ask(text=sys.argv[2])) as stream:
                async for chunk in stream:
                    seqs.append(chunk.seq)
                    if len(seqs) == 1:
                        print("first", flush=True)
            receipt = stream.end.receipt if stream.end else None
            print(json.dumps({"chunks": seqs == list(range(len(seqs))) and len(seqs),
                              "receipt": msgspec.json.encode(receipt).decode()}), flush=True)
        except LloomError as e:
            print(json.dumps({"error": e.code.value, "chunks": len(seqs)}), flush=True)

asyncio.run(main())
"""


async def test_a_stalled_and_a_slow_client_harm_neither_other_clients_nor_the_executor(
    rig: Rig, env: dict[str, str]
) -> None:
    tally = Tally("slow consumers (one stalled 5 s, one reading slowly)", rig.backend)
    chunks = 400
    await rig.executor("exec-1", 0)
    rig.backend.completion_tokens = chunks
    rig.backend.fault = Fault.slow(0.005)  # a 2 s stream
    async with await rig.client() as client:
        # A whole client process that stops reading (SIGSTOP) just after its first chunk.
        marker = tally.job("stalled client's stream")
        stalled = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STALLED_CLIENT, ",".join(rig.cluster.urls), marker, str(DEADLINE_S),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert stalled.stdout is not None
            first = await within(stalled.stdout.readline(), "the stalled client's first chunk", timeout=SETTLE_S)
            assert first == b"first\n", first
            stalled.send_signal(signal.SIGSTOP)  # it reads nothing more until SIGCONT
            stopped = time.monotonic()
            slow = asyncio.create_task(tally.stream(client, "slow reader's stream", chunks, read_gap_s=0.01))
            # Meanwhile other callers and the executor go on as if nothing happened.
            latencies = []
            for i in range(20):
                t0 = time.monotonic()
                await tally.unary(client, f"other caller {i}")
                latencies.append(time.monotonic() - t0)
            status_took = time.monotonic()
            status = await executor_status(rig.cluster, "exec-1")
            status_took = time.monotonic() - status_took
            # The executor ends the stalled caller's job without waiting for it to read (before SIGCONT).
            await eventually(lambda: idle(rig.cluster, "exec-1"), timeout=SETTLE_S,
                             what="the executor done with every job while the stalled client is still stopped")  # fmt: skip
            executor_free = since(stopped)
            stall = 5.0 - (time.monotonic() - stopped)
            if stall > 0:
                await asyncio.sleep(stall)  # the length of the stall is the fault
            stalled.send_signal(signal.SIGCONT)
            line = await within(stalled.stdout.readline(), "the stalled client's outcome", timeout=DEADLINE_S + GRACE_S)
            outcome = json.loads(line) if line else {}
            await within(stalled.wait(), "the stalled client exits", timeout=SETTLE_S)
        finally:
            if stalled.returncode is None:
                stalled.kill()
                await stalled.wait()
        await within(slow, "the slow reader's stream", timeout=DEADLINE_S + GRACE_S)
        if outcome.get("chunks") == chunks:
            tally.completed += 1
            if outcome.get("receipt"):
                tally.held.append(signed_receipt_decoder.decode(outcome.pop("receipt")))
        elif "error" in outcome:
            tally.typed[str(outcome["error"])] += 1
        else:
            tally.lost += 1
            tally.untyped.append(f"stalled client: {outcome or (await stalled.stderr.read()).decode()[-300:]}")  # type: ignore[union-attr]
        receipts = await tally.receipts(rig.cluster, ["exec-1"])
    row = tally.record(stalled_client=outcome, others_p50_ms=round(sorted(latencies)[10] * 1000, 1),
                       others_max_ms=round(max(latencies) * 1000, 1), status_reply_ms=round(status_took * 1000, 1),
                       executor_done_after_s=executor_free, **receipts)  # fmt: skip
    assert status.state == "running"
    assert_goals(row, receipts)
    assert row["completed"] + row["failed_typed"] == 22
