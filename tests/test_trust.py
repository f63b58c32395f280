"""Authenticated replies, bound identities, trusted keys and catalogue caps, attacked as an outsider would.

Each attack of issue 14 that these cover runs against a real nats-server and real
executor nodes in-process; the attacker is a plain NATS connection publishing what
it likes (its own keys, its own signatures). Next to each attack, the normal path.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import nats
import nkeys
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from executor.backends.base import Finish
from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.catalog.announcer import Announcer
from executor.config import ModelConfig, NodeConfig
from executor.jobs.node import ExecutorNode
from executor.process.embedded_nats import EmbeddedNats
from executor.receipts.issuer import ReceiptIssuer
from executor.receipts.outbox import Outbox
from executor.receipts.publisher import ReceiptPublisher
from protocol import cli
from protocol import subjects as subj
from protocol.announcements import HDR_SIGNATURE, Announcement, Load, ModelOffer, Performance, Pricing
from protocol.catalog import MAX_HEARTBEAT_S, Catalog
from protocol.client import LloomClient
from protocol.errors import ERROR_TYPES, ErrorCode, ReplyForged, UnverifiedReply
from protocol.identity import Identity
from protocol.messages import ChatResponse, FinishReason, StreamChunk, StreamEnd, Usage, encoder
from protocol.receipts import ReceiptUsage, SignedReceipt, check_chain, verify_receipt
from protocol.routing import Cheapest, Fastest, Specific, rank
from protocol.trust import Trust, TrustError, endorse, load_endorsement
from tests.conftest import MODEL, Signing
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.jobs import ask

WAIT = 5.0


# -- the attacker's tools ------------------------------------------------------------


class Gated:
    """A backend that holds each answer (a stream: its end) until `gate` is set, so that a test can
    put a forgery on the wire first without sleeping."""

    def __init__(self, inner: OpenAICompatibleBackend) -> None:
        self._inner = inner
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def complete(self, request):  # type: ignore[no-untyped-def]
        await self.gate.wait()
        return await self._inner.complete(request)

    async def stream(self, request):  # type: ignore[no-untyped-def]
        async for event in self._inner.stream(request):
            if isinstance(event, Finish):
                await self.gate.wait()
            yield event


async def forged_receipt(
    identity: Identity, tmp: Path, *, executor_id: str, job_id: str, request: bytes, text: str,
    client: str | None = None, prompt_tokens: int = 10, completion_tokens: int = 10,
    pricing: Pricing = Pricing(),
) -> SignedReceipt:
    """A receipt that verifies under the attacker's own key (anyone can sign anything with their own key)."""
    outbox = Outbox(tmp)
    try:
        issuer = ReceiptIssuer(identity, executor_id, outbox, pricing=lambda _m: pricing)
        usage = ReceiptUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             total_tokens=prompt_tokens + completion_tokens, counted_by="backend")  # fmt: skip
        return await issuer.issue(
            job_id=job_id, client=client, model=MODEL, backend="openai", outcome="completed", finish_reason="stop",
            usage=usage, started_at_ms=int(time.time() * 1000), ttft_ms=None, request=request, response_text=text,
        )  # fmt: skip
    finally:
        outbox.close()


def fake_response(job_id: str, executor_id: str, content: str, receipt: SignedReceipt | None = None) -> bytes:
    return encoder.encode(ChatResponse(job_id=job_id, executor_id=executor_id, model=MODEL, content=content,
                                       finish_reason=FinishReason.STOP, usage=Usage(1, 1, 2), receipt=receipt))  # fmt: skip


def announcement(identity: Identity, executor_id: str, *, price: str = "0", heartbeat_ms: int = 500,
                 latency_ms: float | None = None, seq: int = 1, epoch: int = 1,
                 state: str = "up") -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """A signed announcement as an attacker would make it: its own key, any claims it likes."""
    now = int(time.time() * 1000)
    offer = ModelOffer(name=MODEL, backend="openai", pricing=Pricing(input=Decimal(price), output=Decimal(price)),
                       perf=Performance(samples=100, latency_ms=latency_ms, tokens_per_s=10_000.0))  # fmt: skip
    payload = encoder.encode(Announcement(executor_id=executor_id, key=identity.public_key, epoch=epoch, seq=seq,
                                          sent_at_ms=now, heartbeat_ms=heartbeat_ms, revision=1, state=state,
                                          load=Load(0, 100), models=[offer] if state == "up" else []))  # fmt: skip
    return payload, {HDR_SIGNATURE: identity.sign(payload)}


async def announce(nc: NATS, identity: Identity, executor_id: str, **kw: Any) -> None:
    payload, headers = announcement(identity, executor_id, **kw)
    await nc.publish(subj.CATALOG_ANNOUNCE, payload, headers=headers)
    await nc.flush()


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait for `condition` (checked as the loop turns), failing with `what` at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- executors with announcements and receipts ------------------------------------------


class Executor:
    def __init__(self, node: ExecutorNode, identity: Identity, announcer: Announcer, backend: Gated) -> None:
        self.node, self.identity, self.announcer, self.backend = node, identity, announcer, backend

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def key(self) -> str:
        return self.identity.public_key


MakeExecutor = Callable[..., Awaitable[Executor]]


@pytest.fixture
async def make_executor(nats_server: EmbeddedNats, double: OpenAIDouble, signing: Signing) -> AsyncIterator[MakeExecutor]:
    """Executors as the daemon builds them: one key signs their announcements and receipts."""
    made: list[tuple[Executor, NATS]] = []
    publishers: list[ReceiptPublisher] = []

    async def factory(*, executor_id: str | None = None, price: str = "1", gated: bool = False,
                      endorsement: Any = None, server: EmbeddedNats | None = None) -> Executor:  # fmt: skip
        """`server`: another (JetStream) server, whose receipts stream gets this executor's receipts."""
        nc = await nats.connect((server or nats_server).url)
        backend = Gated(OpenAICompatibleBackend(base_url=double.base_url, timeout_secs=5))
        if not gated:
            backend.gate.set()
        identity = Identity.generate()
        signed = signing(executor_id, identity)
        issuer: ReceiptIssuer = signed["receipts"]
        issuer.endorsement = endorsement(identity) if endorsement is not None else None
        if server is not None:
            publisher = ReceiptPublisher(nc, issuer.outbox, sync_interval_s=0.05)
            signed["receipts"] = issuer = ReceiptIssuer(identity, issuer.executor_id, issuer.outbox,
                                                        on_issue=publisher.notify)  # fmt: skip
            await publisher.start()
            publishers.append(publisher)
        node = ExecutorNode(nc, backend, NodeConfig(), models=[MODEL], **signed)  # type: ignore[arg-type]
        await node.start()
        announcer = Announcer(nc, node, identity, heartbeat_interval=0.5,
                              models=[ModelConfig(name=MODEL, input_price=Decimal(price), output_price=Decimal(price))],
                              endorsement=signed["receipts"].endorsement)  # fmt: skip
        await announcer.start()
        made.append((executor := Executor(node, identity, announcer, backend), nc))
        return executor

    yield factory
    for e, nc in made:
        e.backend.gate.set()
        await e.announcer.stop()
        await e.node.stop(drain_timeout=1)
        await e.backend.aclose()
    for publisher in publishers:
        await publisher.stop()
    for _, nc in made:
        await nc.close()


@pytest.fixture
async def attacker(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def connect(server: EmbeddedNats, **kw: Any) -> LloomClient:
    return await LloomClient.connect(server.url, timeout=WAIT, **kw)


# -- a fake answer published into the caller's inbox -----------------------------------


async def test_fake_unary_answers_in_the_inbox_are_ignored_and_the_genuine_answer_wins(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    executor = await make_executor(gated=True)
    thief = Identity.generate()
    sent = asyncio.Event()

    async def forge(msg: Msg) -> None:
        job_id = msg.headers[subj.HDR_JOB_ID]
        # No receipt; then one the attacker signed itself, claiming the executor's id, for the exact request.
        await attacker.publish(msg.reply, fake_response(job_id, executor.id, "forged"))
        receipt = await forged_receipt(thief, tmp_path / job_id, executor_id=executor.id, job_id=job_id,
                                       request=msg.data, text="forged too")  # fmt: skip
        await attacker.publish(msg.reply, fake_response(job_id, executor.id, "forged too", receipt))
        await attacker.publish(msg.reply, b"{not json")
        await attacker.flush()  # the server has delivered them before the genuine answer exists
        sent.set()
        executor.backend.gate.set()

    await attacker.subscribe(subj.complete_subject(MODEL), cb=forge)
    await attacker.flush()
    async with await connect(nats_server, trust=Trust.of([executor.key])) as client:
        reply = await client.complete(ask())
        assert sent.is_set()
        assert reply.executor_id == executor.id
        assert "forged" not in reply.content and reply.content.startswith("tok0")
        assert reply.receipt is not None and reply.receipt.receipt.executor_key == executor.key
        assert client.reply_forgeries == {"no_receipt": 1, "untrusted": 1, "malformed": 1}


async def test_on_an_open_network_an_executor_ids_first_key_holds_it_for_replies(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    executor = await make_executor(gated=True)
    async with await connect(nats_server) as client:  # no keyring: trust on first use
        assert not client.trust.closed
        executor.backend.gate.set()
        first = await client.complete(ask())  # binds the executor's id to its key
        executor.backend.gate.clear()
        thief = Identity.generate()

        async def forge(msg: Msg) -> None:
            job_id = msg.headers[subj.HDR_JOB_ID]
            receipt = await forged_receipt(thief, tmp_path / job_id, executor_id=executor.id, job_id=job_id,
                                           request=msg.data, text="forged")  # fmt: skip
            await attacker.publish(msg.reply, fake_response(job_id, executor.id, "forged", receipt))
            await attacker.flush()
            # NATS orders messages per connection only: let the genuine answer come once the forgery is in.
            await until(lambda: client.reply_forgeries.get("impostor", 0) >= 1, "the forgery to reach the caller")
            executor.backend.gate.set()

        await attacker.subscribe(subj.complete_subject(MODEL), cb=forge)
        await attacker.flush()
        second = await client.complete(ask())
        assert first.content == second.content and second.receipt.receipt.executor_key == executor.key  # type: ignore[union-attr]
        assert client.reply_forgeries == {"impostor": 1}


async def test_a_call_that_only_gets_forgeries_fails_with_reply_forged_at_its_deadline(
    make_node: Callable[..., Awaitable[ExecutorNode]], nats_server: EmbeddedNats, attacker: NATS
) -> None:
    # An executor that issues no receipts: verifying clients cannot tell its answers from forgeries.
    await make_node(parts={"receipts": None})
    async with await connect(nats_server) as client:
        with pytest.raises(ReplyForged, match="carries no receipt; no genuine reply came in time"):
            await client.complete(ask(), timeout=0.5)
    # ...so on such a network the caller opts out, and gets the answers as they come.
    async with await connect(nats_server, trust=Trust(verify=False)) as client:
        assert (await client.complete(ask())).content.startswith("tok0")
        async with client.stream(ask()) as stream:
            assert [c.delta async for c in stream]
        assert stream.end is not None and stream.end.receipt is None


# -- a fake stream end after real chunks --------------------------------------------------


async def test_a_fake_stream_end_after_real_chunks_is_ignored_and_the_genuine_end_verifies(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats, double: OpenAIDouble
) -> None:
    executor = await make_executor(gated=True)
    chunks_seen = 0
    forged = asyncio.Event()

    async def bystander(msg: Msg) -> None:  # it sees everything: no permissions on this bus
        nonlocal chunks_seen
        if not msg.data.startswith(b'{"type":"chunk"'):
            return
        chunks_seen += 1
        if chunks_seen == double.completion_tokens:  # every real chunk is out; the end is held back
            job_id = msg.subject.rsplit(".", 1)[1]
            fake = StreamEnd(job_id=job_id, executor_id=executor.id, model=MODEL, finish_reason=FinishReason.STOP,
                             usage=Usage(0, 0, 0), chunks=chunks_seen)  # fmt: skip
            await attacker.publish(msg.subject, encoder.encode(fake))
            await attacker.publish(msg.subject, b'{"type":"end",')
            await attacker.flush()
            forged.set()
            executor.backend.gate.set()

    await attacker.subscribe(">", cb=bystander)
    await attacker.flush()
    async with await connect(nats_server) as client:
        async with client.stream(ask()) as stream:
            text = "".join([c.delta async for c in stream])
        assert forged.is_set()
        assert stream.end is not None and stream.end.receipt is not None
        assert stream.end.usage.completion_tokens == double.completion_tokens  # the genuine end, not the fake's 0
        assert stream.end.receipt.receipt.response_sha256 == hashlib.sha256(text.encode()).hexdigest()
        assert client.reply_forgeries == {"no_receipt": 1, "malformed": 1}


async def test_a_chunk_injected_into_a_stream_makes_its_text_unverified(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats, double: OpenAIDouble
) -> None:
    executor = await make_executor(gated=True)
    last = double.completion_tokens - 1

    async def bystander(msg: Msg) -> None:
        if msg.data.startswith(b'{"type":"chunk"') and msgspec.json.decode(msg.data)["seq"] == last:
            # After the last real chunk, one more with the next number: the client cannot tell it apart...
            await attacker.publish(msg.subject, encoder.encode(StreamChunk(last + 1, " PWNED")))
            await attacker.flush()
            executor.backend.gate.set()

    await attacker.subscribe(">", cb=bystander)
    await attacker.flush()
    async with await connect(nats_server) as client:
        shown: list[str] = []
        with pytest.raises(UnverifiedReply, match="text\\s+delivered is unverified") as caught:
            async with client.stream(ask()) as stream:
                async for chunk in stream:
                    shown.append(chunk.delta)
        # ...until the executor's receipt, which vouches for the real text only.
        assert shown[-1] == " PWNED" and len(shown) == last + 2
        assert type(caught.value) is UnverifiedReply and caught.value.executor_id == executor.id


async def test_a_routed_call_that_gets_only_forgeries_fails_over_to_the_next_executor(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats
) -> None:
    hijacked = await make_executor(price="1", gated=True)  # cheapest, but its answer never comes
    backup = await make_executor(price="2")

    async def forge(msg: Msg) -> None:
        await attacker.publish(msg.reply, fake_response(msg.headers[subj.HDR_JOB_ID], hijacked.id, "forged"))

    await attacker.subscribe(subj.direct_subject(hijacked.id), cb=forge)
    await attacker.flush()
    async with await connect(nats_server) as client:
        reply = await client.complete(ask(), route=Cheapest(), attempt_timeout=0.5)
        assert reply.executor_id == backup.id and reply.content.startswith("tok0")
        assert client.reply_forgeries == {"no_receipt": 1}
        with pytest.raises(ReplyForged, match=f"reply from '{hijacked.id}' carries no receipt"):
            await client.complete(ask(), executor=hijacked.id, timeout=0.5)  # no route: nowhere else to go


def test_the_verification_errors_have_their_own_wire_codes() -> None:
    assert ERROR_TYPES[ErrorCode.UNVERIFIED_REPLY] is UnverifiedReply
    assert ERROR_TYPES[ErrorCode.REPLY_FORGED] is ReplyForged
    assert issubclass(ReplyForged, UnverifiedReply)


# -- an intruder in the executors' queue group ---------------------------------------------


async def test_an_intruder_in_the_queue_group_answering_in_anothers_name_is_refused(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats
) -> None:
    executor = await make_executor()
    taken = 0

    async def intrude(msg: Msg) -> None:
        nonlocal taken
        taken += 1
        await attacker.publish(msg.reply, fake_response(msg.headers[subj.HDR_JOB_ID], executor.id, "intruded"))

    await attacker.subscribe(subj.complete_subject(MODEL), queue=subj.QUEUE_GROUP, cb=intrude)
    await attacker.flush()
    async with await connect(nats_server) as client:
        results = await asyncio.gather(*(client.complete(ask(), timeout=1.0) for _ in range(12)),
                                       return_exceptions=True)  # fmt: skip
        refused = [r for r in results if isinstance(r, ReplyForged)]
        accepted = [r for r in results if isinstance(r, ChatResponse)]
        assert len(refused) + len(accepted) == 12, results
        assert taken > 0 and len(refused) == taken  # every job the intruder took failed, typed
        assert accepted and all(r.content.startswith("tok0") and r.receipt is not None for r in accepted)
        assert client.reply_forgeries == {"no_receipt": taken}


# -- a new key announcing price 0 and fake speed ---------------------------------------------


async def test_with_a_keyring_an_untrusted_key_never_wins_routing_however_cheap_or_fast(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    genuine = await make_executor(price="5")
    stranger = Identity.generate()
    keyring = tmp_path / "trusted.keys"
    keyring.write_text(f"# our executors\n{genuine.key}  gpu-box-1\n\n")
    client = await connect(nats_server, trust=Trust.from_file(keyring))
    async with client:
        catalog = await client.catalog()
        payload, headers = announcement(stranger, "cheap-and-fast", price="0", latency_ms=0.001)
        await attacker.publish(subj.CATALOG_ANNOUNCE, payload, headers=headers)
        await attacker.flush()
        await until(lambda: catalog.rejected["untrusted"] >= 1, "the stranger's announcement to be refused")
        assert [e.key for e in catalog.entries()] == [genuine.key]
        for route in (Cheapest(), Fastest(), Specific(MODEL)):
            assert [c.key for c in await client.candidates(ask(), route)] == [genuine.key]
            assert (await client.complete(ask(), route=route)).executor_id == genuine.id

    # Routing itself never prefers an untrusted entry, whatever catalogue it is given.
    async with await connect(nats_server) as open_client:  # an open network keeps the stranger...
        open_catalog = await open_client.catalog()
        await announce(attacker, stranger, "cheap-and-fast", price="0", seq=2)
        await until(lambda: len(open_catalog.entries()) == 2, "the open catalogue to hold both")
        tokens = {"prompt_tokens": 100, "completion_tokens": 100}
        assert rank(open_catalog.entries(), Cheapest(), **tokens)[0].key == stranger.public_key  # ...the cheapest
        trusted = rank(open_catalog.entries(), Cheapest(), trust=Trust.of([genuine.key]), **tokens)
        assert [c.key for c in trusted] == [genuine.key]


# -- the same executor id under another key ------------------------------------------------


async def test_an_executor_id_is_held_by_its_first_key_and_an_impostor_never_answers_for_it(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    genuine = await make_executor(executor_id="gpu-1", gated=True)
    impostor = Identity.generate()
    async with await connect(nats_server) as client:  # open network: the first key holds the id
        catalog = await client.catalog()
        assert catalog.bound_key("gpu-1") == genuine.key
        await announce(attacker, impostor, "gpu-1", price="0")
        await attacker.flush()
        await until(lambda: catalog.rejected["impostor"] >= 1, "the impostor's announcement to be flagged")
        assert catalog.impostors == {"gpu-1": {impostor.public_key}}
        assert [c.key for c in await client.candidates(ask(), Cheapest())] == [genuine.key]

        # The impostor listens on gpu-1's own subject and answers first, with a receipt it signed.
        async def forge(msg: Msg) -> None:
            job_id = msg.headers[subj.HDR_JOB_ID]
            receipt = await forged_receipt(impostor, tmp_path / job_id, executor_id="gpu-1", job_id=job_id,
                                           request=msg.data, text="impostor")  # fmt: skip
            before = client.reply_forgeries.get("impostor", 0)
            await attacker.publish(msg.reply, fake_response(job_id, "gpu-1", "impostor", receipt))
            await attacker.flush()
            # NATS orders messages per connection, not across the attacker's and the executor's: wait
            # until the caller has the forgery in hand (and refused it), then let the genuine answer come.
            await until(lambda: client.reply_forgeries.get("impostor", 0) > before, "the forgery to reach the caller")
            genuine.backend.gate.set()

        await attacker.subscribe(subj.direct_subject("gpu-1"), cb=forge)
        await attacker.flush()
        for _ in range(5):
            genuine.backend.gate.clear()
            reply = await client.complete(ask(), executor="gpu-1")
            assert reply.receipt is not None and reply.receipt.receipt.executor_key == genuine.key
            assert "impostor" not in reply.content
        assert client.reply_forgeries == {"impostor": 5}


async def test_with_a_keyring_an_impostor_that_announced_first_holds_nothing(
    make_executor: MakeExecutor, attacker: NATS, nats_server: EmbeddedNats
) -> None:
    impostor = Identity.generate()
    trusted_key = Identity.generate()  # the executor's key, known to the operator before it starts
    async with await connect(nats_server, trust=Trust.of([trusted_key.public_key])) as client:
        catalog = await client.catalog()
        await announce(attacker, impostor, "gpu-1", price="0")
        await attacker.flush()
        await until(lambda: catalog.rejected["untrusted"] >= 1, "the impostor to be refused")
        assert catalog.bound_key("gpu-1") is None
        payload, headers = announcement(trusted_key, "gpu-1", price="3")
        await attacker.publish(subj.CATALOG_ANNOUNCE, payload, headers=headers)  # anyone may relay it
        await until(lambda: catalog.bound_key("gpu-1") == trusted_key.public_key, "the trusted key to hold gpu-1")


async def test_an_executor_restarted_with_its_key_file_keeps_its_id(nats_server: EmbeddedNats, nc: NATS) -> None:
    key = Identity.generate()
    catalog = Catalog(nc)
    await catalog.start()

    def ids() -> list[str]:
        return [e.executor_id for e in catalog.entries()]

    try:
        await announce(nc, key, "gpu-1", epoch=1, seq=1)
        await until(lambda: ids() == ["gpu-1"], "the executor to appear")
        await announce(nc, key, "gpu-1", epoch=1, seq=2, state="down")
        await until(lambda: ids() == [], "the executor to leave")
        assert catalog.bound_key("gpu-1") == key.public_key  # gone, still bound
        await announce(nc, key, "gpu-1", epoch=2, seq=1)  # restarted: a new epoch, the same key
        await until(lambda: ids() == ["gpu-1"], "the executor to come back")
        # Restarted without a configured id but with the same key file: a new id, and the old one is let go.
        await announce(nc, key, "gpu-7", epoch=3, seq=1)
        await until(lambda: ids() == ["gpu-7"], "the executor to come back under a new id")
        assert catalog.bound_key("gpu-1") is None and catalog.bound_key("gpu-7") == key.public_key
        assert catalog.rejected["impostor"] == 0
    finally:
        await catalog.stop()


# -- operators endorse executor keys ---------------------------------------------------


async def test_a_client_trusting_an_operator_trusts_the_executors_it_endorsed(
    make_executor: MakeExecutor, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    operator = Identity.generate(nkeys.PREFIX_BYTE_OPERATOR)
    endorsed = await make_executor(price="2", endorsement=lambda identity: endorse(operator, identity.public_key))
    unendorsed = await make_executor(price="1")
    keyring = tmp_path / "keys"
    keyring.write_text(f"{operator.public_key}  # the operator\n")
    async with await connect(nats_server, trust=Trust.from_file(keyring)) as client:
        candidates = await client.candidates(ask(), Cheapest())
        assert [c.key for c in candidates] == [endorsed.key]  # the cheaper one is not endorsed
        reply = await client.complete(ask(), route=Cheapest())
        assert reply.executor_id == endorsed.id and reply.receipt is not None
        assert reply.receipt.endorsement is not None and reply.receipt.endorsement.operator == operator.public_key
        reply = await client.complete(ask(), executor=endorsed.id)
        assert reply.executor_id == endorsed.id
        with pytest.raises(ReplyForged, match="is not trusted"):
            await client.complete(ask(), executor=unendorsed.id, timeout=0.5)


def test_endorsements_and_keyrings_are_checked_when_read(tmp_path: Path) -> None:
    operator = Identity.generate(nkeys.PREFIX_BYTE_OPERATOR)
    mine, other = Identity.generate(), Identity.generate()
    path = tmp_path / "endorsement.json"
    path.write_text(msgspec.json.encode({"executor_key": mine.public_key,
                                         **msgspec.structs.asdict(endorse(operator, mine.public_key))}).decode())  # fmt: skip
    assert load_endorsement(path, mine.public_key).operator == operator.public_key
    with pytest.raises(TrustError, match="but this executor's key is"):
        load_endorsement(path, other.public_key)
    with pytest.raises(TrustError, match=r"keys:2: .*not an executor \(N\.\.\.\) or operator \(O\.\.\.\)"):
        Trust.parse(f"{mine.public_key}\nUABC\n", source="keys")
    with pytest.raises(TrustError, match="checksum"):
        Trust.parse(mine.public_key[:-1] + ("A" if mine.public_key[-1] != "A" else "B"))
    with pytest.raises(TrustError, match="cannot read"):
        Trust.from_file(tmp_path / "absent")
    assert Trust.from_env({}) == Trust() and not Trust().closed
    keys = tmp_path / "keys"
    keys.write_text(f"# only\n{mine.public_key} gpu-1 # a label and a comment\n{operator.public_key}\n")
    trust = Trust.from_env({"LLOOM_TRUSTED_KEYS": str(keys)})
    assert trust.executor_keys == {mine.public_key} and trust.operator_keys == {operator.public_key}
    assert trust.trusts(mine.public_key) and not trust.trusts(other.public_key)
    assert trust.trusts(other.public_key, endorse(operator, other.public_key))
    assert not trust.trusts(other.public_key, endorse(operator, mine.public_key))  # endorses another key


# -- receipts: a forged receipt billing another client, a chain starting at 496 ---------------


@pytest.fixture
async def js_server() -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(jetstream=True) as server:
        yield server


async def test_a_forged_receipt_billing_another_client_fails_verify_and_is_not_billed(
    js_server: EmbeddedNats, make_executor: MakeExecutor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nc = await nats.connect(js_server.url)
    genuine = await make_executor(server=js_server)
    outbox = genuine.node.receipts.outbox  # type: ignore[union-attr]
    try:
        async with await connect(js_server, client_id="acme") as client:
            for _ in range(2):
                await client.complete(ask())
        await until(lambda: not outbox.waiting, "the genuine receipts to be stored")
        # The attacker signs a receipt with a key of its own, billing "victim" $270.
        stranger = Identity.generate()
        forged = await forged_receipt(stranger, tmp_path / "forged", executor_id="exe-x", job_id="job-x",
                                      request=b"{}", text="x", client="victim", prompt_tokens=1_000_000,
                                      completion_tokens=1_000_000, pricing=Pricing(input=Decimal(135),
                                                                                   output=Decimal(135)))  # fmt: skip
        assert forged.receipt.cost == Decimal(270)
        await nc.jetstream().publish(subj.receipts_subject("exe-x"), encoder.encode(forged))

        args = ["--nats", js_server.url, "receipts", "verify", "--stream"]
        assert await asyncio.to_thread(cli.main, args) == 1
        out = capsys.readouterr().out
        assert "exe-x#1 (job job-x, client victim, cost 270)" in out
        assert "a key no live executor announces" in out
        assert "3 receipts: 2 valid, 1 invalid; chain problems: 0" in out

        assert await asyncio.to_thread(cli.main, ["--nats", js_server.url, "--json", "receipts", "report",
                                                  "--stream"]) == 0  # fmt: skip
        captured = capsys.readouterr()
        sums = msgspec.json.decode(captured.out)
        assert "victim" not in sums["client"] and sums["client"]["acme"]["jobs"] == 2
        assert sums["excluded"] == 1 and "excluded" in captured.err and "client victim" in captured.err

        # With the operator's keyring, the genuine key passes and the stranger's still fails.
        keyring = tmp_path / "keys"
        keyring.write_text(genuine.key + "\n")
        assert await asyncio.to_thread(cli.main, args + ["--trust", str(keyring)]) == 1
        assert "which the keyring does not trust" in capsys.readouterr().out
        assert await asyncio.to_thread(cli.main, args + ["--key", genuine.key]) == 1  # --key still works
    finally:
        await nc.close()


async def test_a_chain_that_starts_after_1_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    identity = Identity.generate()
    outbox = Outbox(tmp_path / "outbox")
    try:
        issuer = ReceiptIssuer(identity, "exe-1", outbox)
        usage = ReceiptUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2, counted_by="backend")
        made = await asyncio.gather(*(issuer.issue(
            job_id=f"j{i}", client=None, model=MODEL, backend="openai", outcome="completed", finish_reason="stop",
            usage=usage, started_at_ms=0, ttft_ms=None, request=b"{}", response_text="x") for i in range(500)))  # fmt: skip
    finally:
        outbox.close()
    late = made[495:]
    assert late[0].receipt.seq == 496
    assert check_chain([(s, verify_receipt(s)) for s in made]) == []
    assert check_chain([(s, verify_receipt(s)) for s in late]) == [
        "exe-1: the chain starts at receipt 496, not 1 (receipts 1..495 are missing)"
    ]
    path = tmp_path / "late.jsonl"
    path.write_bytes(b"".join(encoder.encode(s) + b"\n" for s in late))
    keyring = tmp_path / "keys"
    keyring.write_text(identity.public_key + "\n")
    assert await asyncio.to_thread(cli.main, ["receipts", "verify", str(path), "--trust", str(keyring)]) == 1
    assert "5 receipts: 5 valid, 0 invalid; chain problems: 1" in capsys.readouterr().out
    # A file without a keyring (and no catalogue to ask) names no key as known.
    assert await asyncio.to_thread(cli.main, ["receipts", "verify", str(path)]) == 1
    assert "an unknown key (no keyring, and no catalogue to ask)" in capsys.readouterr().out


# -- 2,000 fresh keys answering the catalogue ------------------------------------------------


async def test_two_thousand_fresh_keys_are_capped_and_expire_promptly(nats_server: EmbeddedNats, nc: NATS,
                                                                        attacker: NATS) -> None:  # fmt: skip
    catalog = Catalog(nc, max_entries=1000)  # the other caps at their defaults
    await catalog.start()
    try:
        flood = [announcement(Identity.generate(), f"flood-{i}", heartbeat_ms=60_000) for i in range(2000)]
        for payload, headers in flood:
            await attacker.publish(subj.CATALOG_ANNOUNCE, payload, headers=headers)
        await attacker.flush()
        await until(lambda: len(catalog._entries) + catalog.rejected["full"] == 2000, "the flood to be read", 30)
        assert len(catalog.entries()) == catalog.max_entries == 1000
        assert catalog.rejected["full"] == 1000
        # Each claimed a 60 s heartbeat (150 s of life); the client believes at most MAX_HEARTBEAT_S.
        now = asyncio.get_running_loop().time()
        assert max(e.expires_at for e in catalog.entries()) <= now + catalog.missed_heartbeats * MAX_HEARTBEAT_S
        payload, headers = announcement(Identity.generate(), "big", heartbeat_ms=500)
        oversized = payload + b" " * catalog.max_message_bytes
        await attacker.publish(subj.CATALOG_ANNOUNCE, oversized, headers=headers)
        await attacker.flush()
        await until(lambda: catalog.rejected["oversized"] == 1, "the oversized announcement to be refused")
    finally:
        await catalog.stop()

    short = Catalog(nc, max_entries=50, max_heartbeat_s=0.2)  # expiry within a test's patience
    await short.start()
    try:
        started = asyncio.get_running_loop().time()
        for payload, headers in flood[:100]:
            await attacker.publish(subj.CATALOG_ANNOUNCE, payload, headers=headers)
        await attacker.flush()
        await until(lambda: short.rejected["full"] + len(short._entries) >= 100, "the flood to be read")
        assert len(short._entries) == 50
        await until(lambda: not short.entries(), "the silent entries to expire", 2.0)
        assert asyncio.get_running_loop().time() - started >= short.missed_heartbeats * 0.2 * 0.9
    finally:
        await short.stop()


async def test_an_executor_built_from_its_config_announces_and_attaches_its_operators_endorsement(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path, http: Any
) -> None:
    nats_server = js_server  # the executor publishes its receipts there
    from contextlib import AsyncExitStack

    from executor.config import parse_config
    from executor.runtime.builder import assemble

    operator = Identity.generate(nkeys.PREFIX_BYTE_OPERATOR)
    identity = Identity.load_or_create(tmp_path / "gpu-1.nk")
    endorsement = tmp_path / "endorsement.json"
    made = endorse(operator, identity.public_key)
    endorsement.write_text(msgspec.json.encode({"executor_key": identity.public_key, "operator": made.operator,
                                                "sig": made.sig}).decode())  # fmt: skip

    def config(endorsement_file: Path) -> Any:
        return parse_config(
            f'[node]\nid = "gpu-1"\nidentity_file = "{tmp_path / "gpu-1.nk"}"\nendorsement_file = "{endorsement_file}"\n'
            f'[llm_client]\nbase_url = "{double.base_url}"\nmodels = ["{MODEL}"]\n'
            f'[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\n', source="test", environ={},
        )  # fmt: skip

    nc = await nats.connect(nats_server.url)
    try:
        async with AsyncExitStack() as stack:
            backend = OpenAICompatibleBackend(http, base_url=double.base_url)
            await assemble(config(endorsement), nc, backend, stack)
            async with await connect(nats_server, trust=Trust.of([operator.public_key])) as client:
                reply = await client.complete(ask(), route=Cheapest())
                assert reply.executor_id == "gpu-1"
                assert reply.receipt is not None and reply.receipt.endorsement == made
        # An endorsement of another key stops the executor from starting, saying why.
        other = tmp_path / "other.json"
        stranger = Identity.generate().public_key
        made = endorse(operator, stranger)
        other.write_text(msgspec.json.encode({"executor_key": stranger, "operator": made.operator,
                                              "sig": made.sig}).decode())  # fmt: skip
        async with AsyncExitStack() as stack:
            with pytest.raises(TrustError, match="but this executor's key is"):
                await assemble(config(other), nc, OpenAICompatibleBackend(http, base_url=double.base_url), stack)
    finally:
        await nc.close()
