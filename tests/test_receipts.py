"""Every job's result carries a signed receipt; receipts reach JetStream; tampering is caught."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import NodeConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from executor.receipts.outbox import Outbox
from executor.receipts.publisher import STREAM, ReceiptPublisher
from executor.receipts.issuer import ReceiptIssuer
from protocol.announcements import Pricing
from protocol.client import LloomClient
from protocol.errors import StreamInterrupted
from protocol.identity import Identity
from protocol.subjects import RECEIPTS_ALL
from protocol.messages import encoder
from protocol.receipts import (
    ReceiptInvalid,
    SignedReceipt,
    check_chain,
    receipt_lines,
    signed_receipt_decoder,
    verify_receipt,
)
from tests.conftest import MODEL
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask, leave_a_long_stream_early
from tests.helpers.wait import eventually, within

PRICE = Pricing(input=Decimal("0.15"), output=Decimal("0.60"))
WAIT = 10.0


class Rig:
    def __init__(self, node: ExecutorNode, issuer: ReceiptIssuer, publisher: ReceiptPublisher, identity: Identity):
        self.node = node
        self.issuer = issuer
        self.publisher = publisher
        self.identity = identity

    async def published(self) -> list[SignedReceipt]:
        """Everything in the stream, once the outbox is empty."""
        await flushed(self.issuer.outbox, self.publisher)
        return await stored_receipts(self.node.nc.jetstream())


async def flushed(outbox: Outbox, publisher: ReceiptPublisher) -> None:
    """Return once `publisher` has emptied `outbox` into the stream (it sets `idle` after each pass)."""

    async def emptied() -> None:
        while outbox.waiting:
            await publisher.idle.wait()

    await within(emptied(), "the outbox emptied into the stream", WAIT)


async def stored_receipts(js: JetStreamContext) -> list[SignedReceipt]:
    """Every receipt in the receipts stream, batch by batch."""
    info = await js.stream_info(STREAM)
    return [signed_receipt_decoder.decode(line)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
            for line in receipt_lines((await js.get_msg(STREAM, seq)).data)]  # fmt: skip


@pytest.fixture
async def rig(js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path) -> AsyncIterator[Rig]:
    nc = await nats.connect(js_server.url)
    identity = Identity.generate()
    outbox = Outbox(tmp_path / "outbox")
    publisher = ReceiptPublisher(nc, outbox, sync_interval_s=0.05)
    issuer = ReceiptIssuer(identity, "exe-1", outbox, pricing=lambda _m: PRICE, on_issue=publisher.notify)
    node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), NodeConfig(), executor_id="exe-1",
                        receipts=issuer)  # fmt: skip
    await publisher.start()
    await node.start()
    yield Rig(node, issuer, publisher, identity)
    await node.stop(drain_timeout=1)
    await publisher.stop()
    outbox.close()
    await node.backend.aclose()
    await nc.close()


async def test_unary_result_carries_a_receipt_that_binds_request_response_usage_and_cost(
    rig: Rig, js_client: LloomClient
) -> None:
    request = ask(text="three word prompt", max_tokens=5)
    reply = await js_client.complete(request)

    assert reply.receipt is not None
    verify_receipt(reply.receipt, trusted_keys=[rig.identity.public_key])
    r = reply.receipt.receipt
    assert (r.job_id, r.executor_id, r.client, r.model, r.backend) == (reply.job_id, rig.node.id, "acme", MODEL,
                                                                        "openai_compatible")  # fmt: skip
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)
    assert r.usage.counted_by == "backend"
    assert r.cost == Decimal("0.00000345")  # (3 * 0.15 + 5 * 0.60) / 1e6, exactly
    assert r.outcome == "completed" and r.finish_reason == "length"
    assert r.request_sha256 == hashlib.sha256(encoder.encode(request)).hexdigest()
    assert r.response_sha256 == hashlib.sha256(reply.content.encode()).hexdigest()
    assert (r.seq, r.prev) == (1, "")


async def test_stream_end_carries_a_receipt_for_the_text_streamed(rig: Rig, js_client: LloomClient) -> None:
    async with js_client.stream(ask()) as stream:
        text = "".join([c.delta async for c in stream])
    assert stream.end is not None and stream.end.receipt is not None
    verify_receipt(stream.end.receipt)
    r = stream.end.receipt.receipt
    assert r.response_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert r.usage.completion_tokens == stream.end.usage.completion_tokens


async def test_stream_broken_by_the_backend_is_billed_for_what_it_produced(
    rig: Rig, js_client: LloomClient, double: OpenAIDouble
) -> None:
    double.faults.append(Fault.reset(after_chunks=3))
    with pytest.raises(StreamInterrupted) as caught:
        async with js_client.stream(ask()) as stream:
            async for _ in stream:
                pass
    signed = caught.value.receipt
    assert isinstance(signed, SignedReceipt)
    verify_receipt(signed)
    r = signed.receipt
    assert (r.outcome, r.usage.completion_tokens, r.usage.counted_by) == ("failed", 3, "estimate")
    assert r.response_sha256 == hashlib.sha256(b"tok0 tok1 tok2 ").hexdigest()


async def test_stream_the_caller_left_still_gets_a_receipt_in_the_stream(
    rig: Rig, js_client: LloomClient, double: OpenAIDouble
) -> None:
    await leave_a_long_stream_early(js_client, double)
    await within(rig.node.wait_idle(), "the node idle again")
    [signed] = await rig.published()
    assert signed.receipt.outcome == "cancelled"
    assert 3 <= signed.receipt.usage.completion_tokens < 1000


async def test_concurrent_jobs_share_signatures_and_every_receipt_verifies_and_chains(
    rig: Rig, js_client: LloomClient
) -> None:
    replies = await asyncio.gather(*(js_client.complete(ask()) for _ in range(30)))
    leaves = [(r.receipt, verify_receipt(r.receipt)) for r in replies if r.receipt]
    assert len(leaves) == 30
    assert check_chain(leaves) == []
    assert sorted(s.receipt.seq for s, _ in leaves) == list(range(1, 31))
    assert rig.issuer.signer.batches < 30  # several receipts per signature
    stored = await rig.published()
    assert sorted(s.receipt.seq for s in stored) == list(range(1, 31))


async def test_receipts_travel_in_batches_one_stream_message_for_many_jobs(rig: Rig, js_client: LloomClient) -> None:
    await asyncio.gather(*(js_client.complete(ask()) for _ in range(40)))
    stored = await rig.published()
    assert sorted(s.receipt.seq for s in stored) == list(range(1, 41))
    info = await rig.node.nc.jetstream().stream_info(STREAM)
    assert info.state.messages < 40  # batched: not one message per receipt
    assert rig.publisher.messages == info.state.messages
    last = await rig.node.nc.jetstream().get_msg(STREAM, info.state.last_seq)
    assert last.headers is not None
    assert int(last.headers["Lloom-Receipts"]) == len(receipt_lines(last.data))



async def test_receipts_issued_while_a_batch_awaits_its_ack_wait_to_make_a_whole_batch(
    js_server: EmbeddedNats, tmp_path: Path
) -> None:
    """An acknowledgement does not send the few receipts issued since as a batch of their own (one
    stored message, one server fsync each): they leave when a batch is full (or its delay is up)."""
    nc = await nats.connect(js_server.url)
    outbox = Outbox(tmp_path / "outbox")
    # Only a full batch leaves (no delay, and no sync tick, which sends what waits, runs meanwhile).
    publisher = ReceiptPublisher(nc, outbox, batch=8, batch_delay_s=3600, sync_interval_s=3600)
    issuer = ReceiptIssuer(Identity.generate(), "exe", outbox, on_issue=publisher.notify)
    await publisher.start()
    try:
        await _issue(issuer, 8)  # batch 1 leaves
        await asyncio.gather(*(_issue(issuer, 1) for _ in range(3)))  # issued before its ack is back
        await eventually(lambda: publisher.messages == 1, timeout=WAIT, what="batch 1 acknowledged")
        assert outbox.waiting == 3  # the ack did not send them
        await _issue(issuer, 5)
        await eventually(lambda: publisher.messages == 2, timeout=WAIT, what="batch 2 acknowledged")
        js = nc.jetstream()
        sizes = [len(receipt_lines((await js.get_msg(STREAM, seq)).data)) for seq in (1, 2)]
        assert sizes == [8, 8]
        stored = await stored_receipts(js)
        assert sorted(s.receipt.seq for s in stored) == list(range(1, 17))
        assert check_chain([(s, verify_receipt(s)) for s in stored]) == []
    finally:
        await publisher.stop()
        outbox.close()
        await nc.close()

async def test_embedding_jobs_are_billed_by_receipt_too(rig: Rig, js_client: LloomClient) -> None:
    reply = await js_client.embed(MODEL, ["three word input", "two words"])
    assert reply.receipt is not None
    verify_receipt(reply.receipt, trusted_keys=[rig.identity.public_key])
    r = reply.receipt.receipt
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.counted_by) == (5, 0, "backend")
    assert r.cost == PRICE.cost(5, 0) and r.job_id == reply.job_id
    assert r.response_sha256 == hashlib.sha256(msgspec.json.encode(reply.embeddings)).hexdigest()


async def _issue(issuer: ReceiptIssuer, n: int) -> list[SignedReceipt]:
    """`n` receipts for small completed jobs, issued without a node."""
    from executor.receipts.issuer import ReceiptUsage

    return [
        await issuer.issue(
            job_id="j", client=None, model="m", backend="b", outcome="completed", finish_reason="stop",
            usage=ReceiptUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2, counted_by="backend"),
            started_at_ms=0, ttft_ms=None, request=b"{}", response_text="x",
        )
        for _ in range(n)
    ]  # fmt: skip


async def test_a_batch_stored_but_never_marked_acked_is_stored_once_after_a_restart(
    js_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The crash window: JetStream stored a batch, the executor died before its acked mark moved.

    The restarted publisher sends the same batches again (recorded in `sent`), so their
    Nats-Msg-Id match and JetStream drops them as duplicates."""
    identity = Identity.generate()
    nc = await nats.connect(js_server.url)
    js = nc.jetstream()
    outbox = Outbox(tmp_path / "live")
    publisher = ReceiptPublisher(nc, outbox, sync_interval_s=3600, batch=4)  # the mark never moves
    issuer = ReceiptIssuer(identity, "exe", outbox, on_issue=publisher.notify)
    await publisher.start()
    for n in (3, 7):  # batches 1-3, 4-7, 8-10: not what cutting 1..10 into fours would give
        await _issue(issuer, n)
        await flushed(outbox, publisher)
    before = (await js.stream_info(STREAM)).state.messages
    assert before >= 3  # batches of at most 4
    # What a process killed now leaves on disk: the lines and `sent`, but no acked mark.
    shutil.copytree(tmp_path / "live", tmp_path / "after-kill")
    await publisher.stop()
    outbox.close()

    # A memory window smaller than a batch: the rest is read back from disk as the batches go.
    again = Outbox(tmp_path / "after-kill", memory_window=3)
    assert (again.waiting, sorted(again.window)) == (10, [1, 2, 3])  # to the outbox, nothing was acknowledged
    publisher = ReceiptPublisher(nc, again, sync_interval_s=0.05, batch=4)
    await publisher.start()
    await flushed(again, publisher)
    await publisher.stop()
    assert (await js.stream_info(STREAM)).state.messages == before  # every batch was a duplicate
    stored = await stored_receipts(js)
    assert sorted(s.receipt.seq for s in stored) == list(range(1, 11))
    assert check_chain([(s, verify_receipt(s)) for s in stored]) == []
    again.close()
    await nc.close()


# -- tampering ---------------------------------------------------------------------


@pytest.fixture
async def genuine(rig: Rig, js_client: LloomClient) -> list[SignedReceipt]:
    replies = [await js_client.complete(ask()) for _ in range(3)]
    return [r.receipt for r in replies if r.receipt is not None]


def _tamper(signed: SignedReceipt, **changes: object) -> SignedReceipt:
    return msgspec.structs.replace(signed, receipt=msgspec.structs.replace(signed.receipt, **changes))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"model": "gpt-4o"}, "contents changed"),
        ({"cost": Decimal("0")}, "contents changed"),
        ({"client": "someone-else"}, "contents changed"),
    ],
)
async def test_changed_receipts_fail_with_a_precise_reason(genuine: list[SignedReceipt], change: dict, says: str) -> None:
    with pytest.raises(ReceiptInvalid, match=says):
        verify_receipt(_tamper(genuine[0], **change))


async def test_foreign_signed_and_resigned_receipts_are_caught(genuine: list[SignedReceipt], rig: Rig) -> None:
    from executor.receipts.issuer import BatchSigner
    from protocol.receipts import leaf_hash

    mallory = Identity.generate()
    forged = _tamper(genuine[0], usage=msgspec.structs.replace(genuine[0].receipt.usage, completion_tokens=999,
                                                                total_tokens=999 + genuine[0].receipt.usage.prompt_tokens))  # fmt: skip
    with pytest.raises(ReceiptInvalid):  # the executor's signature no longer covers it
        verify_receipt(forged)
    # Mallory re-signs it under her own key: self-consistent, but not from a trusted executor.
    resigned_receipt = msgspec.structs.replace(forged.receipt, executor_key=mallory.public_key,
                                               cost=PRICE.cost(forged.receipt.usage.prompt_tokens, 999))  # fmt: skip
    [proof] = BatchSigner(mallory).sign([leaf_hash(resigned_receipt)])
    resigned = SignedReceipt(resigned_receipt, proof)
    verify_receipt(resigned)
    with pytest.raises(ReceiptInvalid, match="not a trusted executor key"):
        verify_receipt(resigned, trusted_keys=[rig.identity.public_key])
    leaves = [(g, verify_receipt(g)) for g in genuine[1:]] + [(resigned, verify_receipt(resigned))]
    assert any("two different keys" in p for p in check_chain(leaves))
    # A signature swapped in from another receipt does not fit either.
    with pytest.raises(ReceiptInvalid, match="bad signature|contents changed"):
        verify_receipt(msgspec.structs.replace(genuine[0], proof=proof))


async def test_missing_duplicated_and_relinked_receipts_break_the_chain(genuine: list[SignedReceipt]) -> None:
    leaves = [(g, verify_receipt(g)) for g in genuine]
    assert check_chain(leaves) == []
    assert check_chain([leaves[0], leaves[2]]) == [f"{genuine[0].receipt.executor_id}: receipts 2..2 are missing"]
    assert any("appears twice" in p for p in check_chain([*leaves, leaves[1]]))


async def test_truncated_receipts_do_not_decode() -> None:
    with pytest.raises(msgspec.DecodeError):
        signed_receipt_decoder.decode(b'{"receipt": {"v": 1, "executor_id": "x"')


# -- durability ----------------------------------------------------------------------


async def test_receipts_wait_in_the_outbox_while_jetstream_is_away_and_are_published_once(
    double: OpenAIDouble, tmp_path: Path
) -> None:
    """JetStream down, then the executor restarted: nothing lost, nothing doubled."""
    identity = Identity.generate()
    store = tmp_path / "js"

    async def run_jobs(server_js: bool, count: int, *, port: int) -> None:
        async with EmbeddedNats(port=port, jetstream=server_js, store_dir=str(store) if server_js else None) as server:
            nc = await nats.connect(server.url)
            outbox = Outbox(tmp_path / "outbox")
            publisher = ReceiptPublisher(nc, outbox, sync_interval_s=0.05, retry_max_s=0.2)
            issuer = ReceiptIssuer(identity, "exe", outbox, on_issue=publisher.notify)
            node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), NodeConfig(), executor_id="exe",
                                receipts=issuer)  # fmt: skip
            await publisher.start()
            async with node, await LloomClient.connect(server.url) as client:
                for _ in range(count):
                    assert (await client.complete(ask())).receipt is not None
            # No graceful flush: like a killed process, just drop everything.
            publisher._task.cancel()  # type: ignore[union-attr]
            await asyncio.gather(publisher._task, return_exceptions=True)  # type: ignore[arg-type]
            outbox.close()  # what a killed process leaves: the lines written so far
            await node.backend.aclose()
            await nc.close()

    from executor.process.embedded_nats import free_port

    port = free_port()
    await run_jobs(server_js=True, count=3, port=port)  # published (mostly) while JetStream is up
    await run_jobs(server_js=False, count=4, port=port)  # JetStream gone: these wait in the outbox
    left = Outbox(tmp_path / "outbox")
    assert left.waiting >= 4
    left.close()

    # Restart with JetStream back: the outbox flushes on start.
    async with EmbeddedNats(port=port, jetstream=True, store_dir=str(store)) as server:
        nc = await nats.connect(server.url)
        outbox = Outbox(tmp_path / "outbox")
        publisher = ReceiptPublisher(nc, outbox, sync_interval_s=0.05)
        await publisher.start()
        await flushed(outbox, publisher)
        stored = await stored_receipts(nc.jetstream())
        await publisher.stop()
        outbox.close()
        await nc.close()
    assert sorted(s.receipt.seq for s in stored) == list(range(1, 8))  # all seven, once each
    assert check_chain([(s, verify_receipt(s)) for s in stored]) == []


async def test_a_fully_acknowledged_outbox_is_compacted_and_the_chain_continues(tmp_path: Path) -> None:
    identity = Identity.generate()
    outbox = Outbox(tmp_path, compact_bytes=1)
    issuer = ReceiptIssuer(identity, "exe", outbox)
    first = await _issue(issuer, 3)
    for s in first:
        outbox.acked(s.receipt.seq)
    outbox.sync()
    assert not (tmp_path / "receipts.jsonl").exists()
    assert (tmp_path / "receipts.jsonl.1").exists()
    outbox.close()

    reopened = Outbox(tmp_path)
    assert (reopened.last_seq, reopened.waiting, reopened.window) == (3, 0, {})
    later = await ReceiptIssuer(identity, "exe", reopened).issue(
        job_id="k", client=None, model="m", backend="b", outcome="completed", finish_reason="stop",
        usage=first[0].receipt.usage, started_at_ms=0, ttft_ms=None, request=b"{}", response_text="y",
    )  # fmt: skip
    reopened.close()
    chain = [(s, verify_receipt(s)) for s in [*first, later]]
    assert later.receipt.seq == 4
    assert check_chain(chain) == []



async def test_a_replys_encoded_receipt_is_its_outbox_line_and_verifies_with_its_endorsement(tmp_path: Path) -> None:
    """Receipts are encoded once: the JSON a reply carries is the outbox line, byte for byte."""
    from protocol.receipts import ReceiptUsage
    from protocol.trust import endorse

    identity, operator = Identity.generate(), Identity.generate()
    outbox = Outbox(tmp_path)
    issuer = ReceiptIssuer(identity, "exe", outbox, pricing=lambda _m: PRICE)
    issuer.endorsement = endorse(operator, identity.public_key)
    job = dict(client="c", model="m", backend="b", outcome="completed", finish_reason="stop",
               usage=ReceiptUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5, counted_by="backend"),
               started_at_ms=0, ttft_ms=None, request=b"{}", response_text="y")  # fmt: skip
    raws = await asyncio.gather(*(issuer.issue_encoded(job_id=f"j{i}", **job) for i in range(3)))
    outbox.close()
    lines = receipt_lines((tmp_path / "receipts.jsonl").read_bytes())
    assert [bytes(r) for r in raws] == lines
    signed = [signed_receipt_decoder.decode(r) for r in raws]
    assert [s.receipt.job_id for s in signed] == ["j0", "j1", "j2"]
    assert all(s.endorsement == issuer.endorsement for s in signed)
    assert len({s.proof.sig for s in signed}) == 1  # one batch, one signature
    assert check_chain([(s, verify_receipt(s)) for s in signed]) == []
    # As a reply carries it: the same receipt the client decodes.
    reply = msgspec.json.decode(encoder.encode({"receipt": raws[0]}))
    assert signed_receipt_decoder.decode(msgspec.json.encode(reply["receipt"])) == signed[0]
    tampered = lines[0].replace(b'"completion_tokens":2', b'"completion_tokens":1', 1)
    with pytest.raises(ReceiptInvalid):
        verify_receipt(signed_receipt_decoder.decode(tampered))

async def test_a_job_alone_has_its_receipt_signed_and_written_at_once_with_whatever_was_staged(tmp_path: Path) -> None:
    """`alone`: no waiting for the end of the turn; still written before it is handed back, in chain order."""
    from protocol.receipts import ReceiptUsage

    outbox = Outbox(tmp_path)
    issuer = ReceiptIssuer(Identity.generate(), "exe", outbox, pricing=lambda _m: PRICE)
    job = dict(client="c", model="m", backend="b", outcome="completed", finish_reason="stop",
               usage=ReceiptUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5, counted_by="backend"),
               started_at_ms=0, ttft_ms=None, request=b"{}", response_text="y")  # fmt: skip
    # Two receipts staged for the end of the turn, then one for a job alone, all started this turn.
    batched = [asyncio.ensure_future(issuer.issue_encoded(job_id=f"b{i}", **job)) for i in range(2)]
    await asyncio.sleep(0)  # the two have staged (their tasks ran to their await)
    lone = issuer.issue_encoded(job_id="alone", alone=True, **job).__await__()
    with pytest.raises(StopIteration) as done:  # it finishes without ever suspending: no loop turn
        lone.send(None)
    raw_alone = done.value.value
    lines = receipt_lines((tmp_path / "receipts.jsonl").read_bytes())
    assert len(lines) == 3 and lines[-1] == bytes(raw_alone)  # on disk, the staged two too, before it returned
    signed = [signed_receipt_decoder.decode(r) for r in [*await asyncio.gather(*batched), raw_alone]]
    assert [s.receipt.job_id for s in signed] == ["b0", "b1", "alone"]
    assert len({s.proof.sig for s in signed}) == 1  # one batch: the staged two and the lone one
    assert check_chain([(s, verify_receipt(s)) for s in signed]) == []
    later = await issuer.issue_encoded(job_id="later", **job)  # the flush scheduled for the turn found nothing left
    outbox.close()
    assert signed_receipt_decoder.decode(later).receipt.seq == 4
    assert len(receipt_lines((tmp_path / "receipts.jsonl").read_bytes())) == 4


async def test_a_lone_job_is_signed_alone_and_concurrent_jobs_still_share_a_signature(
    rig: Rig, js_client: LloomClient
) -> None:
    first = await js_client.complete(ask())
    second = await js_client.complete(ask())
    assert first.receipt is not None and second.receipt is not None
    assert first.receipt.proof.sig != second.receipt.proof.sig
    batches = rig.issuer.signer.batches
    together = await asyncio.gather(*(js_client.complete(ask()) for _ in range(20)))
    assert rig.issuer.signer.batches - batches < 20  # many jobs at once: several a signature
    leaves = [(r.receipt, verify_receipt(r.receipt)) for r in [first, second, *together] if r.receipt]
    assert len(leaves) == 22 and check_chain(leaves) == []
    assert sorted(s.receipt.seq for s in await rig.published()) == list(range(1, 23))


# -- the backend named is the one chosen -------------------------------------------------


async def test_auto_backend_is_named_by_what_it_chose_in_receipts_catalogue_and_status(
    js_server: EmbeddedNats, js_client: LloomClient, double: OpenAIDouble, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from executor.catalog.announcer import Announcer
    from executor.backends.autodetect import AutoDetectBackend
    from executor.config import LlmClientConfig
    from tests.test_daemon import local_preset

    # The double plays Ollama on its usual port's behalf; `auto` finds it there.
    backend = AutoDetectBackend(http, LlmClientConfig(), presets=[local_preset("ollama", double.base_url)])
    nc = await nats.connect(js_server.url)
    identity = Identity.generate()
    outbox = Outbox(tmp_path / "outbox")
    node = ExecutorNode(nc, backend, NodeConfig(), executor_id="auto-exe",
                        receipts=ReceiptIssuer(identity, "auto-exe", outbox))  # fmt: skip
    await node.start()
    announcer = Announcer(nc, node, identity, models=[], heartbeat_interval=0.5)
    await announcer.start()
    try:
        reply = await js_client.complete(ask())
        assert reply.receipt is not None and reply.receipt.receipt.backend == "ollama"
        [entry] = (await js_client.catalog()).entries()
        assert {o.backend for o in entry.models} == {"ollama"}
        status = node.status()
        assert status.backend_kind == "ollama"
        assert status.backend == f"ollama at {double.base_url} (chosen by auto)"
    finally:
        await announcer.stop()
        await node.stop(drain_timeout=1)
        outbox.close()
        await backend.aclose()
        await nc.close()


async def test_one_outbox_has_one_writer_a_second_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    from executor.receipts.outbox import OutboxInUse

    first = Outbox(tmp_path / "outbox")
    with pytest.raises(OutboxInUse) as refused:
        Outbox(tmp_path / "outbox")
    assert str(tmp_path / "outbox") in str(refused.value) and "in use by another running executor" in str(refused.value)
    first.close()
    Outbox(tmp_path / "outbox").close()  # free again once closed


async def test_the_healer_reads_the_stream_only_when_messages_went_missing_and_puts_them_back(
    js_server: EmbeddedNats, tmp_path: Path
) -> None:
    from executor.receipts.healer import ReceiptHealer

    nc = await nats.connect(js_server.url)
    js = nc.jetstream()
    # An operator's stream that allows deleting (the executor's own denies it): a gap can open.
    await js.add_stream(StreamConfig(name=STREAM, subjects=[RECEIPTS_ALL]))
    outbox = Outbox(tmp_path / "outbox")
    publisher = ReceiptPublisher(nc, outbox, sync_interval_s=0.02, batch=4)
    issuer = ReceiptIssuer(Identity.generate(), "exe", outbox, on_issue=publisher.notify)
    healer = ReceiptHealer(nc, outbox, publisher, executor_id="exe", siblings=None, interval_s=0.02)
    await publisher.start()

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            await healer.wait_for(condition)

    try:
        await _issue(issuer, 10)
        async with asyncio.timeout(WAIT):
            while outbox.acked_seq < 10:  # the mark moves at the publisher's next sync
                await publisher.idle.wait()
                outbox.sync()
        await healer.start()
        await until(lambda: healer.rounds >= 5)
        assert (healer.scans, healer.healed) == (1, 0)  # one scan at start; then a stream_info each

        first = await js.get_msg(STREAM, 1)  # receipts 1-4, say; delete that message
        lost = [signed_receipt_decoder.decode(line).receipt.seq for line in receipt_lines(first.data)]
        await js.delete_msg(STREAM, 1)
        await until(lambda: healer.healed == len(lost))
        assert healer.scans == 2
        info = await js.stream_info(STREAM)
        stored = [signed_receipt_decoder.decode(line)
                  for seq in range(info.state.first_seq, info.state.last_seq + 1)
                  for line in receipt_lines((await js.get_msg(STREAM, seq)).data)]  # fmt: skip
        assert sorted(s.receipt.seq for s in stored) == list(range(1, 11))
        assert check_chain([(s, verify_receipt(s)) for s in stored]) == []
    finally:
        await healer.stop()
        await publisher.stop()
        outbox.close()
        await nc.close()
