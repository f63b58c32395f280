"""Re-sent replies, keepalives and busy estimates, in one process (the process-level faults are in
tests/test_faults_delivery.py): who gets a re-sent reply, that a resumed stream yields each chunk
once, that keepalives go only to callers that asked, and how busy replies pace their callers."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from executor.jobs.node import ExecutorNode
from executor.jobs.pacing import BusyPacer
from executor.jobs.retained import ENTRY_OVERHEAD, RetainedReplies
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.errors import ExecutorBusy
from protocol.messages import ChatResponse, encoder, unary_reply_decoder
from protocol.pending import may_retry_busy
from protocol.resume import ResumeRequest
from tests.conftest import NodeFactory
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import MODEL, ask
from tests.helpers.wait import eventually, within


class Inbox:
    """A raw reply subscription: every message that reaches `<prefix>.*`, in order."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.messages: list[Msg] = []
        self.changed = asyncio.Event()

    async def start(self) -> Inbox:
        async def on_msg(msg: Msg) -> None:
            self.messages.append(msg)
            self.changed.set()

        await self.nc.subscribe(f"{self.prefix}.*", cb=on_msg)
        await self.nc.flush()
        return self

    def replies(self) -> list[bytes]:
        return [m.data for m in self.messages if m.data]

    def keepalives(self) -> list[Msg]:
        return [m for m in self.messages if m.headers and subj.HDR_KEEPALIVE in m.headers]


async def send_job(nc: NATS, inbox: Inbox, job_id: str, *, keepalive: bool = False, **request: object) -> None:
    headers = {subj.HDR_JOB_ID: job_id, subj.HDR_TIMEOUT_MS: "10000"}
    if keepalive:
        headers[subj.HDR_KEEPALIVE] = "1"
    await nc.publish(subj.complete_subject(MODEL), encoder.encode(ask(**request)), reply=f"{inbox.prefix}.{job_id}",
                     headers=headers)  # fmt: skip


async def resume(nc: NATS, *job_ids: str) -> None:
    await nc.publish(subj.RESUME, encoder.encode(ResumeRequest(job_ids=list(job_ids))))
    await nc.flush()


async def test_a_resume_re_sends_a_finished_reply_to_its_own_reply_subject_only(node: ExecutorNode, nc: NATS) -> None:
    owner = await Inbox(nc).start()
    other = await Inbox(await nats.connect(nc.connected_url.geturl())).start()  # type: ignore[union-attr]
    try:
        await send_job(nc, owner, "job-1")
        await within(owner.changed.wait(), "the reply")
        first = owner.replies()
        owner.changed.clear()
        await resume(other.nc, "job-1", "unknown-job")  # asked by someone else: the owner gets it
        await within(owner.changed.wait(), "the re-sent reply")
        await other.nc.flush()
    finally:
        await other.nc.close()
    assert owner.replies() == first * 2  # the same bytes again
    assert type(unary_reply_decoder.decode(first[0])) is ChatResponse
    assert other.messages == []


async def test_a_stream_resumed_while_it_runs_yields_every_chunk_once(
    node: ExecutorNode, client: LloomClient, nc: NATS, double: OpenAIDouble
) -> None:
    double.completion_tokens = 30
    double.fault = Fault.slow(0.02)
    seqs: list[int] = []
    async with client.stream(ask()) as stream:
        async for chunk in stream:
            seqs.append(chunk.seq)
            if chunk.seq == 10:
                await resume(nc, stream.job_id)  # the executor re-sends chunks 0..10 before chunk 11
    assert seqs == list(range(30))
    assert stream.end is not None and stream.end.chunks == 30
    assert node.retained.resent == 1


async def test_keepalives_go_to_running_jobs_whose_caller_asked_for_them(
    make_node: NodeFactory, nc: NATS, double: OpenAIDouble
) -> None:
    node = await make_node(keepalive_secs=0.1)
    double.fault = Fault.slow(0.6)
    asking, silent = await Inbox(nc).start(), await Inbox(nc).start()
    await send_job(nc, asking, "asks", keepalive=True)
    await send_job(nc, silent, "does-not-ask")
    await eventually(lambda: len(asking.replies()) == 1 and len(silent.replies()) == 1, timeout=10,
                     what="both replies")  # fmt: skip
    assert asking.keepalives() and {m.headers[subj.HDR_KEEPALIVE] for m in asking.keepalives()} == {node.id}
    assert silent.keepalives() == []  # an older client would take one for a reply
    assert [m.data for m in asking.messages if not m.headers] == asking.replies()  # keepalives are header-only


def test_busy_estimates_spread_callers_over_the_time_running_jobs_need() -> None:
    pacer = BusyPacer(capacity=4)
    for _ in range(10):
        pacer.record(0.2)
    waits = [pacer.retry_after(now=10.0, oldest_started=9.95) for _ in range(8)]
    # The oldest job ends in 0.15 s; then one caller per 0.2/(4*0.9) s.
    assert waits[0] == pytest.approx(0.15, abs=0.002)
    assert all(b > a for a, b in zip(waits, waits[1:]))
    assert waits[-1] == pytest.approx(0.15 + 7 * 0.2 / 3.6, abs=0.01)


def test_before_any_job_ended_the_estimate_grows_with_the_oldest_jobs_age() -> None:
    assert BusyPacer(capacity=1).retry_after(now=0.0, oldest_started=0.0) == 0.25
    assert BusyPacer(capacity=1).retry_after(now=1.0, oldest_started=0.0) == 1.0  # ends at 2x its age
    assert BusyPacer(capacity=1).retry_after(now=100.0, oldest_started=0.0) == 0.0  # overdue: come now


async def test_a_busy_hint_is_waited_out_within_the_deadline_and_only_then() -> None:
    loop = asyncio.get_running_loop()
    hinted = ExecutorBusy("full", retry_after_s=0.05)
    began = loop.time()
    assert await may_retry_busy(hinted, attempt=5, retries=3, deadline=began + 5)  # past `retries`: hinted
    assert loop.time() - began >= 0.05
    assert not await may_retry_busy(hinted, attempt=0, retries=3, deadline=loop.time() + 0.04)  # would miss it
    assert not await may_retry_busy(hinted, attempt=0, retries=0, deadline=loop.time() + 5)  # retries off


async def test_an_executor_without_durable_receipts_is_retried_like_a_busy_one() -> None:
    # It took no job and billed nothing: the queue group may pick a member that can record receipts.
    from protocol.errors import InvalidRequest, ReceiptsUnavailable

    deadline = asyncio.get_running_loop().time() + 5
    assert await may_retry_busy(ReceiptsUnavailable("disk full"), attempt=0, retries=3, deadline=deadline)
    assert not await may_retry_busy(ReceiptsUnavailable("disk full"), attempt=3, retries=3, deadline=deadline)
    assert not await may_retry_busy(InvalidRequest("no"), attempt=0, retries=3, deadline=deadline)


async def test_replies_are_kept_within_their_bytes_and_not_at_all_with_no_retention(nc: NATS) -> None:
    store = RetainedReplies(nc, "exec", retain_secs=30, max_bytes=ENTRY_OVERHEAD + 10, per_job_bytes=8,
                            keepalive_secs=1)  # fmt: skip
    for job_id in ("first", "second"):
        await store.channel(f"_INBOX.test.{job_id}", job_id, keepalive=False).send(b"123456")
        store.finished(job_id)
    assert (store.held, store.held_bytes) == (1, ENTRY_OVERHEAD + 6)  # the older one made room
    stream = store.channel("_INBOX.test.stream", "stream", keepalive=False)
    for chunk in (b"1234", b"5678", b"9"):
        await stream.send(chunk)
    assert store.held_bytes == 2 * ENTRY_OVERHEAD + 6 + 5  # a long stream keeps its newest messages
    off = RetainedReplies(nc, "exec", retain_secs=0, max_bytes=10, per_job_bytes=8, keepalive_secs=1)
    await off.channel("_INBOX.test.x", "x", keepalive=False).send(b"1")
    off.finished("x")
    assert off.held == 0


async def test_a_finished_jobs_replies_are_sent_again_only_a_few_times_whoever_asks(nc: NATS) -> None:
    # The resume subject is shared: a bystander asking again and again must not turn an executor
    # into a flood of someone's replies into their inbox.
    from executor.jobs.retained import MAX_RESENDS

    store = RetainedReplies(nc, "exec", retain_secs=30, max_bytes=1 << 20, per_job_bytes=1 << 16, keepalive_secs=1)
    await store.start()
    inbox, probe_inbox = nc.new_inbox(), nc.new_inbox()
    got, probe = await nc.subscribe(inbox), await nc.subscribe(probe_inbox)
    try:
        for job_id, to in (("done", inbox), ("probe", probe_inbox)):
            await store.channel(to, job_id, keepalive=False).send(b"the answer")
            store.finished(job_id)
        await got.next_msg(timeout=5)  # the original replies
        await probe.next_msg(timeout=5)
        ask_again = msgspec.json.encode(ResumeRequest(job_ids=["done"]))
        for _ in range(10):
            await nc.publish(subj.RESUME, ask_again)
        await nc.publish(subj.RESUME, msgspec.json.encode(ResumeRequest(job_ids=["probe"])))
        # Requests are handled in order: once the probe's reply is back, all ten were handled.
        await probe.next_msg(timeout=5)
        assert got.pending_msgs == MAX_RESENDS
        assert [(await got.next_msg(timeout=1)).data for _ in range(MAX_RESENDS)] == [b"the answer"] * MAX_RESENDS
    finally:
        await store.stop()
