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
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import ExecutorConfig, ExecutorsConfig, LlmClientConfig, NodeConfig, QueueConfig, ReceiptsConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.receipts.publisher import STREAM
from executor.runtime.builder import RunningNode, assemble
from executor.runtime.daemon import serve
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions, close_nats, connect_nats, redact_url
from protocol.durable import results_bucket
from protocol.identity import Identity
from tests.conftest import MODEL, SecureBus, start_secure_bus
from tests.credentials import JwtChain, Pki
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.processes import LLOOM, StartExecutor, run
from tests.helpers.wait import eventually, within
from tests.helpers.jobs import ask

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


async def executor_node(
    stack: AsyncExitStack, bus: SecureBus, double: OpenAIDouble, tmp_path: Path, *, queue: bool = False,
    **node_config: Any,
) -> RunningNode:
    """An executor as the `executor-1` user of the shipped config, receipts on (and the durable queue)."""
    config = ExecutorConfig(
        node=NodeConfig(id="executor-1", nats_url=bus.url, **node_config),
        nats=bus.options("executor-1"),
        receipts=ReceiptsConfig(outbox_dir=str(tmp_path / "outbox"), sync_interval_secs=0.05),
        executors=ExecutorsConfig(queue=QueueConfig(consume_all=queue)),
    )
    violations: list[Exception] = []

    async def on_error(e: Exception) -> None:
        if VIOLATION in str(e):
            violations.append(e)

    def none_refused() -> None:
        # The executor's own work never ran into the permissions.
        assert violations == []

    stack.callback(none_refused)
    nc = await connect_nats(bus.url, name="executor-1", options=config.nats, on_error=on_error)
    stack.push_async_callback(close_nats, nc)
    http = await stack.enter_async_context(aiohttp.ClientSession())
    backend = OpenAICompatibleBackend(http, base_url=double.base_url, timeout_secs=10.0)
    return await assemble(config, nc, backend, stack, identity=Identity.generate())


@pytest.fixture
async def node(secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with AsyncExitStack() as stack:
        yield await executor_node(stack, secure_bus, double, tmp_path)


@pytest.fixture
async def alice(secure_bus: SecureBus) -> AsyncIterator[LloomClient]:
    async with await LloomClient.connect(secure_bus.url, options=secure_bus.options("alice"), timeout=WAIT) as c:
        yield c


async def receipts_in_stream(bus: SecureBus, node: RunningNode) -> int:
    """How many receipt messages LLOOM_RECEIPTS holds once the node's outbox is empty (read as admin)."""
    publisher = node.publisher
    assert publisher is not None
    async with asyncio.timeout(WAIT):
        while publisher.outbox.waiting:  # every receipt issued so far acknowledged by the stream
            await publisher.idle.wait()
    nc = await connect_nats(bus.url, name="admin", options=bus.options("admin"))
    try:
        return (await nc.jetstream().stream_info(STREAM)).state.messages
    finally:
        await close_nats(nc)


async def admin_stream_info(bus: SecureBus):  # type: ignore[no-untyped-def]
    nc = await connect_nats(bus.url, name="admin", options=bus.options("admin"))
    try:
        return await nc.jetstream().stream_info(STREAM)
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
    assert await receipts_in_stream(secure_bus, node) >= 1


async def test_a_client_with_an_nkey_is_served_too(secure_bus: SecureBus, node: RunningNode) -> None:
    async with await LloomClient.connect(secure_bus.url, options=secure_bus.options("bob"), timeout=WAIT) as bob:
        reply = await bob.complete(ask(max_tokens=2))
    assert reply.content == "tok0 tok1 "


async def test_a_client_submits_to_the_durable_queue_and_reads_its_result(
    secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path, alice: LloomClient
) -> None:
    async with AsyncExitStack() as stack:
        await executor_node(stack, secure_bus, double, tmp_path, queue=True)
        job_id = await alice.submit(ask(max_tokens=2))
        reply = await alice.result(job_id, timeout=WAIT)
    assert reply.content == "tok0 tok1 " and reply.executor_id == "executor-1"


async def test_a_client_answers_the_executors_liveness_pings_on_a_long_job(
    secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path, alice: LloomClient
) -> None:
    # The executor pings on the client's reply subject, the client answers on the executor's
    # inbox: both only through allow_responses. Unanswered pings would cancel the job.
    async with AsyncExitStack() as stack:
        running = await executor_node(stack, secure_bus, double, tmp_path, liveness_interval_secs=0.05)
        double.faults.append(Fault.slow(0.5))  # several pings happen meanwhile
        reply = await alice.complete(ask(max_tokens=2))
        assert reply.content == "tok0 tok1 "
        assert running.node.stats.cancelled == 0


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


@pytest.mark.parametrize("user", ["alice", "executor-2"])
async def test_no_one_can_publish_into_an_executors_inbox_to_fake_jetstream_acks(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient, user: str
) -> None:
    forger = await watched(secure_bus, user)
    assert forger.nc is not None
    # Where executor-1's receipt acks arrive; a fake ack there would mark receipts published.
    await forger.nc.publish("_INBOX_executor-1.acks.1", b'{"stream": "LLOOM_RECEIPTS", "seq": 1}')
    await forger.violation("Publish", "_INBOX_executor-1")
    await alice.complete(ask(max_tokens=1))
    assert await receipts_in_stream(secure_bus, node) >= 1
    await close_nats(forger.nc)


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
    before = await receipts_in_stream(secure_bus, node)
    assert before >= 1
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
    assert await receipts_in_stream(secure_bus, node) == before
    await close_nats(attacker.nc)


async def test_even_the_admin_cannot_purge_or_delete_single_receipts(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    await alice.complete(ask(max_tokens=1))
    before = await receipts_in_stream(secure_bus, node)
    assert before >= 1
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
    kv = await results_bucket(executor.jetstream())
    await kv.put("job1", b'{"some": "result"}')
    reader = await watched(secure_bus, "alice")
    assert reader.nc is not None
    ckv = await reader.nc.jetstream(timeout=1.0).key_value("LLOOM_RESULTS")
    assert (await ckv.get("job1")).value == b'{"some": "result"}'
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)):
        await ckv.keys()
    await reader.violation("Publish", "$JS.API.CONSUMER")
    # Nor walk it by sequence number (found by an attack review: STREAM.MSG.GET takes {"seq": n}).
    js = reader.nc.jetstream(timeout=1.0)
    for by_seq in (js.get_msg("KV_LLOOM_RESULTS", 1), js.get_msg("KV_LLOOM_RESULTS", 1, direct=True)):
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)):
            await by_seq
    await reader.violation("Publish", "$JS.API.STREAM.MSG.GET.KV_LLOOM_RESULTS")
    await reader.violation("Publish", "$JS.API.DIRECT.GET.KV_LLOOM_RESULTS")
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
    assert not [e for e in client.errors if subj.cancel_subject("somejob").lower() in e]
    # Executors answer jobs; they do not cancel other people's.
    executor = await watched(secure_bus, "executor-2")
    assert executor.nc is not None
    await executor.nc.publish(subj.cancel_subject("somejob"))
    await executor.violation("Publish", subj.cancel_subject("somejob"))
    await close_nats(executor.nc)
    admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
    answer = await admin.request(subj.status_subject("executor-1"), b"", timeout=WAIT)
    assert b"executor-1" in answer.data
    await close_nats(admin)
    await close_nats(client.nc)


async def test_the_executor_makes_the_receipts_stream_again_after_an_admin_deleted_it(
    secure_bus: SecureBus, node: RunningNode, alice: LloomClient
) -> None:
    await alice.complete(ask(max_tokens=1))
    await receipts_in_stream(secure_bus, node)
    admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
    await admin.jetstream().delete_stream(STREAM)
    await close_nats(admin)

    await alice.complete(ask(max_tokens=1))
    # Acknowledged by a stream made again: it holds the new receipt (the old ones went with the old stream).
    assert await receipts_in_stream(secure_bus, node) == 1
    info = await admin_stream_info(secure_bus)
    assert info.config.deny_delete and info.config.deny_purge


# -- credentials and TLS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA that signed nothing the server uses: trusting it is trusting the wrong one."""
    return Pki(tmp_path_factory.mktemp("other-pki"), name="Someone else's CA")


@pytest.fixture
async def tls_bus(tmp_path: Path, pki: Pki) -> AsyncIterator[SecureBus]:
    bus = await start_secure_bus(tmp_path, *pki.server_args())
    yield bus
    await bus.server.stop()


@pytest.fixture
async def mtls_bus(tmp_path: Path, pki: Pki) -> AsyncIterator[SecureBus]:
    bus = await start_secure_bus(tmp_path, *pki.server_args(verify_clients=True))
    yield bus
    await bus.server.stop()


async def quickly_refused(url: str, options: NatsConnectOptions, match: str) -> str:
    """The ConnectionError's message; it must come well within one connect timeout."""
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=match) as caught:
        await connect_nats(url, name="test", options=options)
    assert time.monotonic() - started < options.connect_timeout_secs
    return str(caught.value)


async def test_tls_with_the_ca_that_signed_the_server_works_and_another_ca_fails_fast(
    tls_bus: SecureBus, pki: Pki, other_ca: Pki
) -> None:
    nc = await connect_nats(tls_bus.url, name="alice", options=tls_bus.options("alice", tls_ca=pki.ca))
    assert nc.is_connected and nc.connected_url is not None
    await close_nats(nc)

    message = await quickly_refused(tls_bus.url, tls_bus.options("alice", tls_ca=other_ca.ca), "not trusted")
    assert "--tls-ca" in message  # says what to do
    # No CA at all: the system's trust store does not know the test CA either.
    await quickly_refused(tls_bus.url.replace("nats://", "tls://"), tls_bus.options("alice"), "not trusted")


async def test_mutual_tls_needs_the_client_certificate(mtls_bus: SecureBus, pki: Pki) -> None:
    await quickly_refused(mtls_bus.url, mtls_bus.options("alice", tls_ca=pki.ca), "TLS|refused|certificate")
    options = mtls_bus.options("alice", tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    async with await LloomClient.connect(mtls_bus.url, options=options, timeout=WAIT) as client:
        assert await client.served_models() == []


async def test_a_wrong_password_is_named_with_the_password_masked(secure_bus: SecureBus) -> None:
    host = secure_bus.url.removeprefix("nats://")
    message = await quickly_refused(
        f"nats://alice:WRONGpw@{host}", NatsConnectOptions(connect_timeout_secs=5), "refused the credentials"
    )
    assert f"nats://alice:***@{host}" in message and "WRONGpw" not in message
    message = await quickly_refused(
        secure_bus.url, NatsConnectOptions(user="alice", password="WRONGpw2"), "refused the credentials"
    )
    assert "WRONGpw2" not in message


async def test_a_token_authenticates_where_the_server_takes_one(tmp_path: Path) -> None:
    # A server has either a token or users (NATS allows no mix), so tokens suit a single-operator bus.
    async with EmbeddedNats(extra_args=["--auth", "s3cret-token"]) as server:
        nc = await connect_nats(server.url, name="t", options=NatsConnectOptions(token="s3cret-token"))
        assert nc.is_connected
        await close_nats(nc)
        host = server.url.removeprefix("nats://")
        message = await quickly_refused(f"nats://wrong-token@{host}", NatsConnectOptions(), "refused the credentials")
        assert "wrong-token" not in message and f"nats://***@{host}" in message


async def test_a_creds_file_authenticates_and_its_jwt_permissions_apply(tmp_path: Path) -> None:
    chain = JwtChain(tmp_path)
    async with EmbeddedNats(extra_args=["-c", str(chain.config)]) as server:
        creds = chain.creds("alice", subscribe=["_INBOX_alice.>"])
        w = Watched()
        options = NatsConnectOptions(creds_file=creds, inbox_prefix="_INBOX_alice")
        w.nc = await connect_nats(server.url, name="alice", options=options, on_error=w.on_error)
        await w.nc.subscribe(">")
        await w.violation("Subscription", '">"')
        answer = await w.nc.subscribe("_INBOX_alice.x")
        await w.nc.publish("_INBOX_alice.x", b"allowed")
        assert (await answer.next_msg(timeout=WAIT)).data == b"allowed"
        await close_nats(w.nc)
        # A user signed by an account the operator never signed is refused.
        _, stranger, _ = JwtChain.new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
        forged = chain.creds("mallory", subscribe=[">"], signer=stranger)
        await quickly_refused(server.url, NatsConnectOptions(creds_file=forged), "refused|Authorization|authentication")


def test_redact_url_masks_every_secret_and_keeps_the_rest() -> None:
    assert redact_url("nats://alice:pw@h:4222, tls://tok@h2") == "nats://alice:***@h:4222, tls://***@h2"
    assert redact_url("cannot reach nats://h:4222") == "cannot reach nats://h:4222"


def test_connect_options_come_from_file_then_environment_then_flags() -> None:
    import argparse

    from protocol.cli_common import connect_options

    base = NatsConnectOptions(user="from-file", password="file-pw", tls_ca="/file/ca.pem")
    args = argparse.Namespace(creds=None, nkey=None, user=None, tls_ca="/flag/ca.pem", tls_cert=None, tls_key=None,
                              tls_hostname=None, tls_first=False, inbox_prefix=None, connect_timeout=None)  # fmt: skip
    environ = {"LLOOM_NATS_PASSWORD": "env-pw", "LLOOM_NATS_INBOX_PREFIX": "_INBOX_x", "LLOOM_NATS_TLS_CA": "/env/ca.pem"}
    got = connect_options(args, base, environ)
    assert (got.user, got.password, got.tls_ca, got.inbox_prefix) == ("from-file", "env-pw", "/flag/ca.pem", "_INBOX_x")
    # Choosing another way to authenticate drops the configured user and password.
    got = connect_options(argparse.Namespace(**{**vars(args), "nkey": "/k.nk"}), base, {})
    assert (got.nkey_file, got.user, got.password) == ("/k.nk", None, None)
    with pytest.raises(ValueError, match="one way"):
        connect_options(args, base, {"LLOOM_NATS_TOKEN": "t", "LLOOM_NATS_USER": "u"})


def test_the_executor_reads_nats_options_from_its_config_with_secrets_from_the_environment() -> None:
    from executor.config import ConfigError, parse_config

    toml = '[nats]\nuser = "executor-1"\npassword = "${PW}"\ntls_ca = "/ca.pem"\ninbox_prefix = "_INBOX_executor-1"\n'
    config = parse_config(toml, source="t.toml", environ={"PW": "from-env"})
    assert (config.nats.user, config.nats.password, config.nats.inbox_prefix) == (
        "executor-1", "from-env", "_INBOX_executor-1")  # fmt: skip
    with pytest.raises(ConfigError, match="one way"):
        parse_config('[nats]\nuser = "u"\ntoken = "t"\n', source="t.toml", environ={})


# -- the command-line tools ------------------------------------------------------------------------


def client_env(env: dict[str, str], bus: SecureBus, user: str = "alice") -> dict[str, str]:
    """`lloom`'s environment for `user`: the password travels only in the environment."""
    return {**env, "LLOOM_NATS_USER": user, "LLOOM_NATS_PASSWORD": bus.passwords[user],
            "LLOOM_NATS_INBOX_PREFIX": f"_INBOX_{user}"}  # fmt: skip


@pytest.mark.slow
async def test_lloom_models_connects_with_env_credentials_and_the_ca_and_fails_fast_with_another_ca(
    tls_bus: SecureBus, pki: Pki, other_ca: Pki, env: dict[str, str]
) -> None:
    ok = await run(LLOOM, "models", "--nats", tls_bus.url, "--tls-ca", pki.ca, env=client_env(env, tls_bus))
    assert ok.returncode == 0, ok.stderr
    assert "no executors on the network" in ok.stdout

    started = time.monotonic()
    bad = await run(LLOOM, "models", "--nats", tls_bus.url, "--tls-ca", other_ca.ca, env=client_env(env, tls_bus))
    assert bad.returncode == 2
    assert "certificate is not trusted" in bad.stderr and tls_bus.url in bad.stderr
    assert time.monotonic() - started < 5.0


@pytest.mark.slow
async def test_lloom_masks_a_wrong_password_in_the_url(secure_bus: SecureBus, env: dict[str, str]) -> None:
    host = secure_bus.url.removeprefix("nats://")
    result = await run(LLOOM, "models", "--nats", f"nats://alice:WRONGpw@{host}", env=env)
    assert result.returncode == 2
    assert f"nats://alice:***@{host}" in result.stderr and "WRONGpw" not in result.stderr + result.stdout


@pytest.mark.slow
async def test_the_executor_fails_fast_on_an_untrusted_server_certificate(
    tls_bus: SecureBus, other_ca: Pki, start_executor: StartExecutor, tmp_path: Path
) -> None:
    password = tls_bus.passwords["executor-1"]
    url = tls_bus.url.replace("nats://", f"nats://executor-1:{password}@")
    started = time.monotonic()
    executor = await start_executor("--nats", url, "--tls-ca", other_ca.ca, "--log-level", "info")
    assert await executor.exit_code() == 2
    assert time.monotonic() - started < 6.0
    stderr = "\n".join(executor.lines)
    assert "certificate is not trusted" in stderr
    assert "nats://executor-1:***@" in stderr and password not in stderr


@pytest.mark.slow
async def test_sigterm_stops_an_executor_whose_connect_hangs(start_executor: StartExecutor) -> None:
    # A listener that accepts and never speaks: the NATS handshake waits for an INFO that never comes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        executor = await start_executor("--nats", url, "--connect-timeout", "30")
        await executor.wait_for("connecting to NATS")
        started = time.monotonic()
        executor.proc.send_signal(signal.SIGTERM)
        assert await executor.exit_code(timeout=5.0) == 0
        assert time.monotonic() - started < 3.0
        assert executor.logged("stop requested while connecting to NATS; exiting") is not None
    finally:
        silent.close()


async def test_a_client_without_its_inbox_prefix_is_told_at_connect_instead_of_timing_out(
    secure_bus: SecureBus,
) -> None:
    options = msgspec.structs.replace(secure_bus.options("alice"), inbox_prefix=None)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="inbox prefix"):
        await LloomClient.connect(secure_bus.url, options=options, timeout=WAIT)
    assert time.monotonic() - started < 2.0


async def test_an_executor_without_its_inbox_prefix_stops_at_start_with_the_reason(
    secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path
) -> None:
    config = ExecutorConfig(
        node=NodeConfig(id="executor-1", nats_url=secure_bus.url),
        nats=NatsConnectOptions(user="executor-1", password=secure_bus.passwords["executor-1"]),
        llm_client=LlmClientConfig(backend="openai_compatible", base_url=double.base_url),
        receipts=ReceiptsConfig(outbox_dir=str(tmp_path / "outbox")),
    )
    with pytest.raises(ConnectionError, match="inbox prefix"):
        await within(serve(config), "an executor refused its inbox stops")


async def test_a_job_whose_reply_to_aims_at_the_jetstream_api_is_not_answered_and_deletes_nothing(
    secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path, alice: LloomClient
) -> None:
    # NATS checks the publisher's permission on the subject, never on the reply-to; an executor's
    # allow_responses would let it publish there, over its deny list. Found by an attack review:
    # a streamed job's empty end message is a valid empty JetStream API request.
    from protocol.messages import encoder

    async with AsyncExitStack() as stack:
        node = await executor_node(stack, secure_bus, double, tmp_path, queue=True)
        await alice.complete(ask(max_tokens=1))  # the receipts stream exists, and the queue's
        stored = await receipts_in_stream(secure_bus, node)
        attacker = await watched(secure_bus, "alice")
        assert attacker.nc is not None
        aims = [f"$JS.API.STREAM.DELETE.{STREAM}", "$JS.API.STREAM.DELETE.LLOOM_JOBS", "$KV.LLOOM_RESULTS.victim",
                "lloom.v1.receipts.executor-2"]  # fmt: skip
        before = node.node.stats.bad_requests
        for aim in aims:
            await attacker.nc.publish(subj.complete_subject(MODEL), encoder.encode(ask(stream=True)), reply=aim)
            await attacker.nc.publish(subj.CATALOG_QUERY, b"", reply=aim)
        await attacker.nc.flush()
        await eventually(lambda: node.node.stats.bad_requests - before == len(aims), timeout=WAIT,
                         what="the executor refusing every job aimed elsewhere")  # fmt: skip
        admin = await connect_nats(secure_bus.url, name="admin", options=secure_bus.options("admin"))
        try:
            js = admin.jetstream()
            assert (await js.stream_info(STREAM)).state.messages == stored >= 1  # still there, not re-made empty
            await js.stream_info("LLOOM_JOBS")
            with pytest.raises(nats.js.errors.NotFoundError):
                await js.get_last_msg("KV_LLOOM_RESULTS", "$KV.LLOOM_RESULTS.victim")
        finally:
            await close_nats(admin)
        assert double.completed == 1  # only alice's genuine job reached the backend
        assert (await alice.complete(ask(max_tokens=1))).receipt is not None  # the normal path still works
        await close_nats(attacker.nc)


def test_only_inboxes_are_reply_subjects() -> None:
    for ok in ("_INBOX.abc.def", "_INBOX_alice.x.y"):
        assert subj.is_reply_inbox(ok), ok
    for bad in ("$JS.API.STREAM.DELETE.LLOOM_JOBS", "$KV.LLOOM_RESULTS.x", "lloom.v1.receipts.e", "_INBOX",
                "_INBOX.", "_INBOX.>", "_INBOX.*", "_INBOX.a b", "_INBOX." + "a" * 300):  # fmt: skip
        assert not subj.is_reply_inbox(bad), bad
