"""The bus strangers can share: credentials, TLS and the shipped permissions (compose/nats/secure.conf).

Every test runs a real nats-server with the very config file docs/security.md
describes (fixture `secure_bus` in tests/conftest.py), a real executor node
connected as the `executor-1` user, and clients connected as `alice` (password)
or `bob` (nkey). Each attack of issue 14's table that permissions should stop is
tried the way an outsider with a NATS connection would, next to the allowed case:
the server refuses it (reported through the error callback, as NATS reports a
permissions violation) and nothing leaks.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import ExecutorConfig, LlmClientConfig, NodeConfig, ReceiptsConfig
from executor.process.embedded_nats import EmbeddedNats, free_port
from executor.receipts.publisher import STREAM
from executor.runtime.builder import RunningNode, assemble
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions, close_nats, connect_nats, redact_url
from protocol.identity import Identity
from tests.conftest import MODEL, SecureBus, start_secure_bus
from tests.doubles.openai_double import OpenAIDouble
from tests.test_roundtrip import ask

WAIT = 10.0
VIOLATION = "permissions violation"


class Watched:
    """A raw NATS connection whose asynchronous errors (permissions violations) are kept."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self.nc: NATS | None = None

    async def on_error(self, e: Exception) -> None:
        self.errors.append(str(e))
        self._changed.set()

    async def violation(self, *words: str) -> str:
        """The first reported permissions violation mentioning every word (waits up to WAIT)."""
        async with asyncio.timeout(WAIT):
            while True:
                for text in self.errors:  # nats.py reports the server's -ERR in lower case
                    if VIOLATION in text and all(w.lower() in text for w in words):
                        return text
                self._changed.clear()
                await self._changed.wait()


async def watched(bus: SecureBus, user: str | None) -> Watched:
    """A connection as `user` (None: no credentials at all)."""
    w = Watched()
    options = bus.options(user) if user else NatsConnectOptions()
    w.nc = await connect_nats(bus.url, name=f"test {user}", options=options, on_error=w.on_error)
    return w


@pytest.fixture
async def node(secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path) -> AsyncIterator[RunningNode]:
    """An executor as the `executor-1` user of the shipped config, receipts on."""
    config = ExecutorConfig(
        node=NodeConfig(id="executor-1", nats_url=secure_bus.url),
        nats=secure_bus.options("executor-1"),
        receipts=ReceiptsConfig(outbox_dir=str(tmp_path / "outbox"), sync_interval_secs=0.05),
    )
    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)

    async with AsyncExitStack() as stack:
        nc = await connect_nats(secure_bus.url, name="executor-1", options=config.nats, on_error=on_error)
        stack.push_async_callback(close_nats, nc)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        backend = OpenAICompatibleBackend(http, base_url=double.base_url, timeout_secs=10.0)
        running = await assemble(config, nc, backend, stack, identity=Identity.generate())
        yield running
        # The executor's own work never ran into the permissions.
        assert not [e for e in errors if VIOLATION in str(e).lower()]


@pytest.fixture
async def alice(secure_bus: SecureBus) -> AsyncIterator[LloomClient]:
    async with await LloomClient.connect(secure_bus.url, options=secure_bus.options("alice"), timeout=WAIT) as c:
        yield c


async def receipts_in_stream(bus: SecureBus, at_least: int) -> int:
    """How many receipt messages LLOOM_RECEIPTS holds, once it holds `at_least` (read as admin)."""
    nc = await connect_nats(bus.url, name="admin", options=bus.options("admin"))
    try:
        js = nc.jetstream()
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    info = await js.stream_info(STREAM)
                    if info.state.messages >= at_least:
                        return info.state.messages
                except nats.js.errors.NotFoundError:
                    pass
                await asyncio.sleep(0.05)  # polling the server's state, not waiting for time to pass
    finally:
        await close_nats(nc)


# -- the allowed paths ---------------------------------------------------------------------------


async def test_a_client_job_through_an_executor_works_unary_and_streamed_and_receipts_land(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    reply = await alice.complete(ask(max_tokens=3))
    assert reply.executor_id == "executor-1"
    assert reply.content == "tok0 tok1 tok2 "

    async with alice.stream(ask(max_tokens=4, stream=True)) as stream:
        chunks = [c.delta async for c in stream]
    assert "".join(chunks) == "tok0 tok1 tok2 tok3 "
    assert stream.end is not None and stream.end.executor_id == "executor-1"

    catalog = await alice.catalog()
    assert "executor-1" in {e.executor_id for e in catalog.entries()}
    assert await receipts_in_stream(secure_bus, at_least=1) >= 1


async def test_a_client_with_an_nkey_is_served_too(secure_bus: SecureBus, node: RunningNode) -> None:
    async with await LloomClient.connect(secure_bus.url, options=secure_bus.options("bob"), timeout=WAIT) as bob:
        reply = await bob.complete(ask(max_tokens=2))
    assert reply.content == "tok0 tok1 "


# -- the attacks -------------------------------------------------------------------------------


async def test_a_connection_without_credentials_is_refused(secure_bus: SecureBus) -> None:
    with pytest.raises(ConnectionError, match="refused the credentials"):
        await connect_nats(secure_bus.url, name="stranger")


async def test_a_bystander_cannot_subscribe_to_everything(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    bystander = await watched(secure_bus, "bob")
    assert bystander.nc is not None
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    await bystander.nc.subscribe(">", cb=keep)
    await bystander.violation("Subscription", '">"')

    reply = await alice.complete(ask(text="a secret prompt", max_tokens=2))
    assert reply.content
    await bystander.nc.flush()  # whatever the server sent it before this has arrived
    assert seen == []
    await close_nats(bystander.nc)


async def test_a_client_cannot_read_or_write_another_clients_inbox(
    secure_bus: SecureBus, node: RunningNode
) -> None:
    spy = await watched(secure_bus, "alice")
    assert spy.nc is not None
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    await spy.nc.subscribe("_INBOX_bob.>", cb=keep)
    await spy.violation("Subscription", "_INBOX_bob")

    async with await LloomClient.connect(secure_bus.url, options=secure_bus.options("bob"), timeout=WAIT) as bob:
        # A fake answer published straight into bob's inbox: the server drops it.
        await spy.nc.publish("_INBOX_bob.any.job", msgspec.json.encode({"content": "forged"}))
        await spy.violation("Publish", "_INBOX_bob")
        reply = await bob.complete(ask(max_tokens=2))
    assert reply.executor_id == "executor-1" and reply.content == "tok0 tok1 "
    await spy.nc.flush()
    assert seen == []
    await close_nats(spy.nc)


async def test_an_intruder_cannot_join_the_executors_queue_group(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    intruder = await watched(secure_bus, "bob")
    assert intruder.nc is not None
    stolen: list[Msg] = []

    async def steal(msg: Msg) -> None:
        stolen.append(msg)

    await intruder.nc.subscribe(subj.complete_subject(MODEL), queue=subj.QUEUE_GROUP, cb=steal)
    await intruder.violation("Subscription", subj.complete_subject(MODEL))

    replies = await asyncio.gather(*(alice.complete(ask(max_tokens=1)) for _ in range(10)))
    assert {r.executor_id for r in replies} == {"executor-1"}
    await intruder.nc.flush()
    assert stolen == []
    await close_nats(intruder.nc)


async def test_an_executor_cannot_read_every_job_outside_the_queue_group(
    secure_bus: SecureBus, node: RunningNode
) -> None:
    # Even an executor's credentials subscribe to model subjects only in the queue group.
    other = await watched(secure_bus, "executor-2")
    assert other.nc is not None
    await other.nc.subscribe(subj.complete_subject(MODEL))
    await other.violation("Subscription", subj.complete_subject(MODEL))
    await close_nats(other.nc)


@pytest.mark.parametrize("user", ["alice", "executor-2"])
async def test_no_client_or_executor_can_purge_or_delete_the_receipts(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient, user: str
) -> None:
    await alice.complete(ask(max_tokens=1))
    before = await receipts_in_stream(secure_bus, at_least=1)
    attacker = await watched(secure_bus, user)
    assert attacker.nc is not None
    js = attacker.nc.jetstream(timeout=1.0)
    for attack, words in (
        (js.purge_stream(STREAM), ("Publish", "$JS.API.STREAM.PURGE.LLOOM_RECEIPTS")),
        (js.delete_stream(STREAM), ("Publish", "$JS.API.STREAM.DELETE.LLOOM_RECEIPTS")),
        (js.delete_msg(STREAM, 1), ("Publish", "$JS.API.STREAM.MSG.DELETE.LLOOM_RECEIPTS")),
    ):
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attack
        await attacker.violation(*words)
    assert await receipts_in_stream(secure_bus, at_least=before) == before
    await close_nats(attacker.nc)


async def test_even_the_admin_cannot_purge_or_delete_single_receipts(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    await alice.complete(ask(max_tokens=1))
    before = await receipts_in_stream(secure_bus, at_least=1)
    admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
    js = admin.jetstream()
    info = await js.stream_info(STREAM)
    assert info.config.deny_delete and info.config.deny_purge
    with pytest.raises(nats.js.errors.APIError):
        await js.purge_stream(STREAM)
    with pytest.raises(nats.js.errors.APIError):
        await js.delete_msg(STREAM, info.state.first_seq)
    assert (await js.stream_info(STREAM)).state.messages == before
    await close_nats(admin)


@pytest.mark.parametrize("bucket", ["LLOOM_CACHE", "LLOOM_RESULTS"])
async def test_a_client_cannot_write_the_cache_or_results_buckets(
    secure_bus: SecureBus, node: RunningNode, bucket: str
) -> None:
    admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
    from nats.js.api import KeyValueConfig

    kv = await admin.jetstream().create_key_value(KeyValueConfig(bucket=bucket, history=1))
    attacker = await watched(secure_bus, "alice")
    assert attacker.nc is not None
    # A planted entry: straight onto the bucket's subject, as nats.py's kv.put would.
    await attacker.nc.publish(f"$KV.{bucket}.planted", b'{"content": "planted"}')
    await attacker.violation("Publish", f"$KV.{bucket}.planted")
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("planted")
    # An executor may write it.
    executor = await connect_nats(secure_bus.url, name="e2", options=secure_bus.options("executor-2"))
    ekv = await executor.jetstream().key_value(bucket)
    await ekv.put("ok", b"{}")
    assert (await kv.get("ok")).value == b"{}"
    await close_nats(executor)
    await close_nats(attacker.nc)
    await close_nats(admin)


async def test_a_client_cannot_list_the_results_bucket_but_reads_a_result_by_key(
    secure_bus: SecureBus, node: RunningNode
) -> None:
    executor = await connect_nats(secure_bus.url, name="e2", options=secure_bus.options("executor-2"))
    from protocol.durable import results_bucket

    kv = await results_bucket(executor.jetstream())
    await kv.put("job1", b'{"some": "result"}')
    reader = await watched(secure_bus, "alice")
    assert reader.nc is not None
    ckv = await reader.nc.jetstream(timeout=1.0).key_value("LLOOM_RESULTS")
    assert (await ckv.get("job1")).value == b'{"some": "result"}'
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)):
        await ckv.keys()
    await reader.violation("Publish", "$JS.API.CONSUMER")
    await close_nats(reader.nc)
    await close_nats(executor)


async def test_only_admin_asks_for_status_and_clients_may_send_cancels(
    secure_bus: SecureBus, node: RunningNode
) -> None:
    client = await watched(secure_bus, "alice")
    assert client.nc is not None
    await client.nc.publish(subj.STATUS_ALL, b"", reply="_INBOX_alice.status")
    await client.violation("Publish", subj.STATUS_ALL)
    await client.nc.publish(subj.cancel_subject("somejob"))
    await client.nc.flush()
    assert not [e for e in client.errors if subj.cancel_subject("somejob") in e]
    admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
    answer = await admin.request(subj.status_subject("executor-1"), b"", timeout=WAIT)
    assert b"executor-1" in answer.data
    await close_nats(admin)
    await close_nats(client.nc)


async def test_the_executor_makes_the_receipts_stream_again_after_an_admin_deleted_it(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    await alice.complete(ask(max_tokens=1))
    await receipts_in_stream(secure_bus, at_least=1)
    admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
    await admin.jetstream().delete_stream(STREAM)
    await close_nats(admin)

    await alice.complete(ask(max_tokens=1))
    assert await receipts_in_stream(secure_bus, at_least=1) >= 1
    assert node.publisher is not None
    async with asyncio.timeout(WAIT):
        await node.publisher.idle.wait()
    assert not node.publisher.outbox.pending
