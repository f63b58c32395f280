"""Sealed jobs (issue 14 item 6): prompts and answers that only the chosen executor can read.

Real nats-server, real executor nodes (with the OpenAI double behind them) announcing a
curve key, a real client; the bystander is a plain NATS connection subscribed to `>`,
which on a bus without permissions is what any peer (and the bus operator) can see.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from executor.catalog.announcer import Announcer
from executor.jobs.node import ExecutorNode
from executor.process.embedded_nats import EmbeddedNats
from protocol import subjects as subj
from protocol.announcements import HDR_SIGNATURE, Rejected, open_signed
from protocol.client import LloomClient
from protocol.errors import ErrorCode, NoExecutors, ReplyForged
from protocol.identity import Identity
from protocol.messages import ChatResponse, ErrorReply, FinishReason, Usage, encoder, unary_reply_decoder
from protocol.receipts import verify_receipt
from protocol.sealing import ClientSeal, CurveKeyPair, SealError, check_curve_key, decode_curve_key, encode_curve_key
from protocol.trust import Trust
from tests.conftest import Signing
from tests.helpers.processes import LLOOM, StartExecutor, run
from tests.test_daemon import config  # noqa: F401  (a fixture)
from tests.helpers.jobs import MODEL, ask
from tests.helpers.wait import within

PROMPT = "the secret plan is zebra-umbrella-4711"
# The OpenAI double answers `tok0 tok1 ... tok7` (8 completion tokens by default).
ANSWER = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "


@dataclass
class Sealing:
    node: ExecutorNode
    identity: Identity
    announcer: Announcer


@pytest.fixture
async def sealing_node(make_node: Callable[..., Awaitable[ExecutorNode]], signing: Signing) -> AsyncIterator[Sealing]:
    """A node with a curve key derived from its identity, announcing both."""
    identity = Identity.generate()
    parts = {**signing(None, identity), "curve": CurveKeyPair.derive(identity.seed)}
    node = await make_node(models=[MODEL], parts=parts)
    announcer = Announcer(node.nc, node, identity, heartbeat_interval=0.5)
    await announcer.start()
    yield Sealing(node, identity, announcer)
    await announcer.stop()


@pytest.fixture
async def sealed_client(nats_server: EmbeddedNats) -> AsyncIterator[LloomClient]:
    client = await LloomClient.connect(nats_server.url, timeout=5.0, client_id="alice")
    yield client
    await client.close()


class Bystander:
    """Everything on the bus: subjects, header values and payloads."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.seen: list[bytes] = []
        self._markers: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        await self.nc.subscribe(">", cb=self._on)
        await self.nc.flush()

    async def _on(self, msg: Msg) -> None:
        if msg.subject.startswith("test.marker.") and msg.subject in self._markers:
            self._markers[msg.subject].set()
            return
        self.seen.append(msg.subject.encode() + b"\n" + msg.data)
        for k, v in (msg.headers or {}).items():
            self.seen.append(f"{k}: {v}".encode())

    async def caught_up(self, *publishers: NATS) -> None:
        """Return once everything each of `publishers` sent so far has reached the bystander
        (NATS keeps one connection's messages in order for each subscriber)."""
        for i, nc in enumerate(publishers):
            subject = f"test.marker.{i}"
            self._markers[subject] = event = asyncio.Event()
            await nc.publish(subject, b"")
            await nc.flush()
            await within(event.wait(), f"the bystander saw everything from publisher {i}")

    def contains(self, text: str) -> bool:
        needle = text.encode()
        return any(needle in blob for blob in self.seen)


@pytest.fixture
async def bystander(nats_server: EmbeddedNats) -> AsyncIterator[Bystander]:
    nc = await nats.connect(nats_server.url)
    b = Bystander(nc)
    await b.start()
    yield b
    await nc.close()


# -- the curve-key encoding ------------------------------------------------------------


def test_curve_keys_round_trip_in_the_nkeys_encoding() -> None:
    pair = CurveKeyPair.generate()
    assert pair.public_key.startswith("X") and len(pair.public_key) == 56
    raw = decode_curve_key(pair.public_key)
    assert len(raw) == 32 and encode_curve_key(raw) == pair.public_key
    identity = Identity.generate()
    # Derived from the identity seed: the same identity always has the same curve key, another has another.
    assert CurveKeyPair.derive(identity.seed).public_key == CurveKeyPair.derive(identity.seed).public_key
    assert CurveKeyPair.derive(Identity.generate().seed).public_key != CurveKeyPair.derive(identity.seed).public_key


@pytest.mark.parametrize("bad", [
    Identity.generate().public_key,  # an executor key (N...): right shape, wrong kind
    "not base32 at all!",
    "",
], ids=["identity-key", "not-base32", "empty"])  # fmt: skip
def test_a_bad_curve_key_is_rejected(bad: str) -> None:
    with pytest.raises(SealError):
        check_curve_key(bad)
    with pytest.raises(SealError):
        ClientSeal(bad)


def test_a_curve_key_with_a_wrong_checksum_is_rejected() -> None:
    key = CurveKeyPair.generate().public_key
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(SealError, match="checksum|base32|curve key"):
        check_curve_key(flipped)


def test_an_announcement_with_a_malformed_curve_key_is_refused() -> None:
    identity = Identity.generate()
    payload = (b'{"type":"announce","executor_id":"e1","key":"' + identity.public_key.encode()
               + b'","epoch":1,"seq":1,"sent_at_ms":1,"heartbeat_ms":500,"revision":1,'
               b'"load":{"in_flight":0,"capacity":1},"models":[],"curve_key":"XNOTAKEY"}')  # fmt: skip
    with pytest.raises(Rejected) as e:
        open_signed(payload, identity.sign(payload))
    assert e.value.kind == "malformed"


# -- sealed jobs on a real bus -----------------------------------------------------------


async def test_the_catalogue_carries_the_executors_signed_curve_key(
    sealing_node: Sealing, sealed_client: LloomClient
) -> None:
    catalog = await sealed_client.catalog()
    entry = next(e for e in catalog.entries() if e.executor_id == sealing_node.node.id)
    assert entry.curve_key == CurveKeyPair.derive(sealing_node.identity.seed).public_key
    assert entry.curve_key == sealing_node.node.curve.public_key  # type: ignore[union-attr]


async def test_a_sealed_unary_job_answers_and_a_bystander_reads_neither_prompt_nor_answer(
    sealing_node: Sealing, sealed_client: LloomClient, bystander: Bystander
) -> None:
    request = ask(text=PROMPT)
    reply = await sealed_client.complete(request, sealed=True)
    assert reply.content == ANSWER
    assert reply.executor_id == sealing_node.node.id
    await bystander.caught_up(sealing_node.node.nc, sealed_client.nc)
    assert any(subj.HDR_SEALED.encode() in blob for blob in bystander.seen)  # the job did cross the bus
    assert not bystander.contains(PROMPT)
    assert not bystander.contains(ANSWER)
    assert not bystander.contains("tok0")
    # The control: the same job unsealed is readable by the same bystander.
    plain = await sealed_client.complete(ask(text=PROMPT + " again"))
    assert plain.content == ANSWER
    await bystander.caught_up(sealing_node.node.nc, sealed_client.nc)
    assert bystander.contains(PROMPT + " again") and bystander.contains(ANSWER)


async def test_a_sealed_stream_answers_and_a_bystander_reads_neither_prompt_nor_answer(
    sealing_node: Sealing, sealed_client: LloomClient, bystander: Bystander
) -> None:
    parts: list[str] = []
    async with sealed_client.stream(ask(text=PROMPT), sealed=True) as stream:
        async for chunk in stream:
            parts.append(chunk.delta)
    assert "".join(parts) == ANSWER
    assert len(parts) > 1  # really a stream of several sealed chunks
    assert stream.end is not None and stream.end.receipt is not None
    await bystander.caught_up(sealing_node.node.nc, sealed_client.nc)
    assert not bystander.contains(PROMPT)
    assert not bystander.contains("tok0") and not bystander.contains("tok7")
    assert sealed_client.reply_forgeries == {}


async def test_the_receipt_of_a_sealed_job_verifies_and_hashes_the_plaintext_request(
    sealing_node: Sealing, sealed_client: LloomClient
) -> None:
    request = ask(text=PROMPT)
    reply = await sealed_client.complete(request, sealed=True)
    assert reply.receipt is not None
    verify_receipt(reply.receipt, trusted_keys=[sealing_node.identity.public_key])
    receipt = reply.receipt.receipt
    # What the client sent, before sealing (complete() sends it with stream=False, as here).
    plaintext = encoder.encode(msgspec.structs.replace(request, stream=False))
    assert receipt.request_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert receipt.response_sha256 == hashlib.sha256(ANSWER.encode()).hexdigest()
    assert receipt.client == "alice"


async def test_a_tampered_sealed_request_gets_a_sealed_bad_request_and_the_node_keeps_serving(
    sealing_node: Sealing, sealed_client: LloomClient, nc: NATS
) -> None:
    node = sealing_node.node
    assert node.curve is not None
    seal = ClientSeal(node.curve.public_key)
    sealed = bytearray(seal.box.seal(encoder.encode(ask(text=PROMPT))))
    sealed[-1] ^= 0x01  # one bit of the ciphertext
    reply = await nc.request(subj.direct_subject(node.id), bytes(sealed), timeout=5,
                             headers={subj.HDR_SEALED: seal.header, subj.HDR_JOB_ID: "tampered1"})  # fmt: skip
    assert reply.headers is not None and reply.headers[subj.HDR_SERVICE_ERROR_CODE] == "400"
    assert reply.headers[subj.HDR_SERVICE_ERROR] == "sealed"  # the reason travels only inside the seal
    error = msgspec.json.decode(seal.box.open(reply.data), type=ErrorReply)
    assert error.code == ErrorCode.BAD_REQUEST and "sealed request refused" in error.message
    assert node.stats.bad_requests == 1
    answer = await sealed_client.complete(ask(text=PROMPT), sealed=True)
    assert answer.content == ANSWER


async def test_a_sealed_job_with_a_malformed_client_key_is_refused_in_clear(
    sealing_node: Sealing, nc: NATS
) -> None:
    reply = await nc.request(subj.direct_subject(sealing_node.node.id), b"anything", timeout=5,
                             headers={subj.HDR_SEALED: "XBOGUS"})  # fmt: skip
    error = unary_reply_decoder.decode(reply.data)
    assert isinstance(error, ErrorReply) and error.code == ErrorCode.BAD_REQUEST
    assert "curve key" in error.message


async def test_an_executor_without_a_curve_key_refuses_sealed_jobs_and_clients_do_not_send_them(
    make_node: Callable[..., Awaitable[ExecutorNode]], sealed_client: LloomClient, nc: NATS, signing: Signing
) -> None:
    identity = Identity.generate()
    node = await make_node(models=[MODEL], parts=signing(None, identity))
    announcer = Announcer(node.nc, node, identity, heartbeat_interval=0.5)
    await announcer.start()
    try:
        seal = ClientSeal(CurveKeyPair.generate().public_key)
        reply = await nc.request(subj.direct_subject(node.id), seal.box.seal(b"{}"), timeout=5,
                                 headers={subj.HDR_SEALED: seal.header})  # fmt: skip
        error = unary_reply_decoder.decode(reply.data)
        assert isinstance(error, ErrorReply) and error.code == ErrorCode.BAD_REQUEST
        assert "takes no sealed jobs" in error.message
        with pytest.raises(NoExecutors, match="sealed"):
            await sealed_client.complete(ask(text=PROMPT), sealed=True)
        assert (await sealed_client.complete(ask(text=PROMPT))).content == ANSWER  # unsealed still works
    finally:
        await announcer.stop()


async def test_a_reply_sealed_to_another_key_cannot_be_read(
    sealing_node: Sealing, nats_server: EmbeddedNats
) -> None:
    """The executor's curve key is not the one it announced (swapped after announcing): it cannot
    open the job and its sealed refusal does not open for the client, which says so, typed."""
    node = sealing_node.node
    for trust, timeout in ((Trust(verify=False), 5.0), (None, 1.0)):
        client = await LloomClient.connect(nats_server.url, timeout=timeout, trust=trust)
        try:
            await client.catalog()  # learns the announced key
            announced = node.curve
            node.curve = CurveKeyPair.generate()
            try:
                with pytest.raises(ReplyForged, match="cannot be opened"):
                    await client.complete(ask(text=PROMPT), sealed=True)
            finally:
                node.curve = announced
            if trust is None:  # verifying: the unreadable reply was ignored and counted, then the deadline
                assert client.reply_forgeries.get("unsealed") == 1
        finally:
            await client.close()


async def test_a_forged_reply_in_the_inbox_of_a_sealed_job_is_ignored(
    sealing_node: Sealing, sealed_client: LloomClient, nc: NATS
) -> None:
    """A bystander sees the reply subject and the client's ephemeral key, and still cannot write a
    reply that opens: the genuine sealed answer is the one returned."""
    injected = asyncio.Event()

    async def forge(msg: Msg) -> None:
        if msg.headers and subj.HDR_SEALED in msg.headers and msg.reply:
            fake = ChatResponse(job_id=msg.headers.get(subj.HDR_JOB_ID, ""), executor_id=sealing_node.node.id,
                                model=MODEL, content="forged answer", finish_reason=FinishReason.STOP,
                                usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))  # fmt: skip
            # Sealed to the client's ephemeral key with a key of the attacker's own.
            attacker = CurveKeyPair.generate().box_for(msg.headers[subj.HDR_SEALED])
            await nc.publish(msg.reply, attacker.seal(encoder.encode(fake)))
            injected.set()

    await nc.subscribe(subj.direct_subject(sealing_node.node.id), cb=forge)
    await nc.flush()
    reply = await sealed_client.complete(ask(text=PROMPT), sealed=True)
    await within(injected.wait(), "the forger answered the sealed job")
    assert reply.content == ANSWER
    assert sealed_client.reply_forgeries.get("unsealed", 0) <= 1  # counted if it came first


async def test_sealed_headers_are_announced_as_the_protocol_says(sealing_node: Sealing, nc: NATS) -> None:
    """The announcement carrying the curve key is signed: changing the key breaks the signature."""
    reply = await nc.request(subj.info_subject(sealing_node.node.id), b"", timeout=5)
    message = open_signed(reply.data, (reply.headers or {}).get(HDR_SIGNATURE))
    assert message.curve_key == sealing_node.node.curve.public_key  # type: ignore[union-attr]
    other = CurveKeyPair.generate().public_key
    forged = reply.data.replace(message.curve_key.encode(), other.encode())  # type: ignore[union-attr]
    with pytest.raises(Rejected) as e:
        open_signed(forged, (reply.headers or {}).get(HDR_SIGNATURE))
    assert e.value.kind == "forged"


@pytest.mark.slow
async def test_lloom_complete_sealed_against_a_real_executor(
    start_executor: StartExecutor, config: Path, env: dict[str, str]  # noqa: F811
) -> None:
    """A `lloom-executor` takes sealed jobs out of the box (its curve key derived from its identity);
    `lloom complete --sealed` gets the answer, and refuses to put a sealed job in the queue."""
    executor = await start_executor("--config", str(config))
    url = await executor.started()
    nc = await nats.connect(url)
    try:
        bystander = Bystander(nc)
        await bystander.start()
        for extra in ([], ["--stream"]):
            result = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "--sealed", "--json", *extra,
                               PROMPT, env=env)  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["content"] == ANSWER
        await bystander.caught_up(nc)  # the CLI has exited: all it sent and got crossed the server before
        assert any(subj.HDR_SEALED.encode() in blob for blob in bystander.seen)
        assert not bystander.contains(PROMPT) and not bystander.contains("tok0")
        queued = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "--sealed", "--queue", PROMPT, env=env)
        assert queued.returncode == 2
        assert "--sealed cannot be combined with --queue" in queued.stderr
    finally:
        await nc.close()
