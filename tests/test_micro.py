"""Executors are NATS micro services: `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` find and describe them.

Real nats-server, real nodes (`make_node` plus the node's `MicroResponder`, or the whole
node from `runtime.builder.assemble`), the OpenAI test double as the backend. Requests are
sent with nats-py as NATS tooling sends them (one request, many replies) and the replies
are parsed with nats-py's own micro types (`nats.micro.service.ServiceInfo.from_dict`, ...),
so what `nats micro ls/info/stats` and every micro client read is what is checked. The
shipped permissions (who may ask, who may answer) are tried at the end with `secure_bus`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.catalog.micro import MicroResponder, package_version
from executor.config import parse_config
from executor.jobs.node import ExecutorNode, State
from executor.process.embedded_nats import EmbeddedNats
from executor.runtime.builder import RunningNode, assemble
from protocol import subjects as subj
from protocol.connection import close_nats, connect_nats
from protocol.identity import Identity
from protocol.messages import encoder
from protocol.micro import INFO_TYPE, PING_TYPE, STATS_TYPE, info_decoder, ping_decoder, stats_decoder
from tests.conftest import MODEL, NodeFactory, SecureBus
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask
from tests.helpers.processes import StartExecutor
from tests.helpers.wait import WAIT_S, eventually, within
from tests.test_daemon import write_config
from tests.test_security_bus import executor_node, watched

# After the replies a test expects have come, how long more is listened for one too many:
# the idle gap that ends a request-many (ADR-47), not a wait for anything to happen.
EXTRA_WINDOW_S = 0.3
DOUBLE_MODELS = sorted([MODEL, "qwen2.5:7b", "meta-llama/Llama-3-8B"])


async def request_many(nc: NATS, subject: str, *, expect: int) -> list[dict[str, object]]:
    """Ask on `subject` and collect the JSON replies: at least `expect` of them (within WAIT_S),
    then any more that arrive before an idle gap of EXTRA_WINDOW_S."""
    replies: list[dict[str, object]] = []
    more = asyncio.Event()

    async def keep(msg: Msg) -> None:
        replies.append(msgspec.json.decode(msg.data))
        more.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=keep)
    try:
        await nc.publish(subject, b"", reply=inbox)
        async with asyncio.timeout(WAIT_S):
            while len(replies) < expect:
                more.clear()
                await more.wait()
        while True:
            more.clear()
            try:
                async with asyncio.timeout(EXTRA_WINDOW_S):
                    await more.wait()
            except TimeoutError:
                return replies
    finally:
        await sub.unsubscribe()


async def micro(stack: AsyncExitStack, node: ExecutorNode) -> MicroResponder:
    responder = MicroResponder(node.nc, node)
    await stack.enter_async_context(responder)
    return responder


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


def chat_job(model: str = MODEL) -> bytes:
    return encoder.encode(ask(model, max_tokens=2))


async def job(nc: NATS, subject: str, payload: bytes) -> Msg:
    return await nc.request(subject, payload, timeout=WAIT_S)


def is_error(reply: Msg) -> bool:
    return bool(reply.headers and subj.HDR_SERVICE_ERROR in reply.headers)


def test_discovery_subjects_are_the_specs_and_refuse_what_would_widen_them() -> None:
    assert subj.micro_subjects("PING", "ex-1") == ("$SRV.PING", "$SRV.PING.lloom-executor",
                                                  "$SRV.PING.lloom-executor.ex-1")  # fmt: skip
    for bad in (lambda: subj.micro_subject("DELETE"), lambda: subj.micro_subject("PING", "lloom-executor", "a.b"),
                lambda: subj.micro_subject("INFO", ">"), lambda: subj.micro_subject("STATS", None, "ex-1")):  # fmt: skip
        with pytest.raises(subj.SubjectError):
            bad()


# -- what each verb says ------------------------------------------------------------------------


async def test_ping_names_the_executor_as_an_instance_of_the_lloom_executor_service(
    make_node: NodeFactory, nc: NATS, stack: AsyncExitStack
) -> None:
    node = await make_node()
    await micro(stack, node)
    [raw] = await request_many(nc, subj.micro_subject("PING"), expect=1)

    assert raw["type"] == PING_TYPE
    ping = ServicePing.from_dict(raw)
    assert (ping.name, ping.id, ping.version) == ("lloom-executor", node.id, package_version())
    assert ping.metadata["executor_id"] == node.id
    assert msgspec.json.decode(ping.metadata["models"]) == DOUBLE_MODELS
    assert ping_decoder.decode(msgspec.json.encode(raw)).id == node.id


async def test_info_lists_one_endpoint_per_job_subject_the_node_subscribes(
    make_node: NodeFactory, nc: NATS, stack: AsyncExitStack
) -> None:
    node = await make_node()
    await micro(stack, node)
    [raw] = await request_many(nc, subj.micro_subject("INFO"), expect=1)

    assert raw["type"] == INFO_TYPE
    info = ServiceInfo.from_dict(raw)
    assert (info.name, info.id, info.version) == ("lloom-executor", node.id, package_version())
    assert info.description and "Lloom executor" in info.description
    got = {(e.name, e.subject, e.queue_group, e.metadata.get("model"), e.metadata["kind"]) for e in info.endpoints}
    expected = {("direct", subj.direct_subject(node.id), "", None, "chat")}
    for model in DOUBLE_MODELS:
        expected |= {("complete", subj.complete_subject(model), "lloom-executors", model, "chat"),
                     ("embed", subj.embed_subject(model), "lloom-executors", model, "embeddings"),
                     ("text", subj.text_subject(model), "lloom-executors", model, "text")}  # fmt: skip
    assert got == expected
    # The subjects listed are the ones jobs really reach: a job sent to a listed subject is answered.
    reply = await job(nc, subj.complete_subject("qwen2.5:7b"), chat_job("qwen2.5:7b"))
    assert not is_error(reply)
    assert info_decoder.decode(msgspec.json.encode(raw)).endpoints


async def test_stats_count_each_endpoints_jobs_errors_and_time(
    make_node: NodeFactory, nc: NATS, double: OpenAIDouble, stack: AsyncExitStack
) -> None:
    node = await make_node()
    responder = await micro(stack, node)
    [fresh] = await request_many(nc, subj.micro_subject("STATS"), expect=1)
    assert fresh["type"] == STATS_TYPE
    assert all(e["num_requests"] == 0 and e["last_error"] == "" for e in fresh["endpoints"])  # type: ignore[index, union-attr]

    ok, failed = 5, 2
    for _ in range(ok):
        assert not is_error(await job(nc, subj.complete_subject(MODEL), chat_job()))
    double.faults.extend(Fault.status(500, "the model fell over") for _ in range(failed))
    for _ in range(failed):
        assert is_error(await job(nc, subj.complete_subject(MODEL), chat_job()))
    bad = await job(nc, subj.complete_subject(MODEL), b"{not json")  # refused at admission
    assert is_error(bad)
    assert not is_error(await job(nc, subj.direct_subject(node.id), chat_job()))

    [raw] = await request_many(nc, subj.micro_subject("STATS", "lloom-executor", node.id), expect=1)
    stats = ServiceStats.from_dict(raw)
    assert (stats.name, stats.id) == ("lloom-executor", node.id)
    assert abs((stats.started - responder.started.replace(tzinfo=None)).total_seconds()) < 1e-3
    by_subject = {e.subject: e for e in stats.endpoints}
    complete = by_subject[subj.complete_subject(MODEL)]
    assert (complete.num_requests, complete.num_errors) == (ok + failed + 1, failed + 1)
    assert complete.last_error.startswith("400:bad_request: invalid request")
    assert complete.processing_time > 0
    assert complete.average_processing_time == complete.processing_time // complete.num_requests
    direct = by_subject[subj.direct_subject(node.id)]
    assert (direct.num_requests, direct.num_errors, direct.last_error) == (1, 0, "")
    untouched = by_subject[subj.embed_subject(MODEL)]
    assert (untouched.num_requests, untouched.processing_time, untouched.average_processing_time) == (0, 0, 0)
    # The same jobs the node's own status counts.
    assert node.stats.received == sum(e.num_requests for e in stats.endpoints)
    assert stats_decoder.decode(msgspec.json.encode(raw)).endpoints


async def test_a_backend_error_is_the_last_error_of_its_endpoint_and_busy_refusals_count(
    make_node: NodeFactory, nc: NATS, double: OpenAIDouble, stack: AsyncExitStack
) -> None:
    node = await make_node(max_concurrent_jobs=1)
    await micro(stack, node)
    double.faults.append(Fault.slow(0.5))
    first = asyncio.create_task(job(nc, subj.complete_subject(MODEL), chat_job()))
    await eventually(lambda: node.in_flight == 1, timeout=WAIT_S, what="the first job running")
    busy = await job(nc, subj.complete_subject(MODEL), chat_job())
    assert busy.headers and busy.headers[subj.HDR_SERVICE_ERROR_CODE] == "503"
    assert not is_error(await within(first, "the slow job's answer"))
    double.faults.append(Fault.status(500, "the model fell over"))
    assert is_error(await job(nc, subj.complete_subject(MODEL), chat_job()))

    [raw] = await request_many(nc, subj.micro_subject("STATS", "lloom-executor"), expect=1)
    complete = next(e for e in ServiceStats.from_dict(raw).endpoints if e.subject == subj.complete_subject(MODEL))
    assert (complete.num_requests, complete.num_errors) == (3, 2)
    assert complete.last_error.startswith("502:backend_error:") and "fell over" in complete.last_error


# -- many executors, and who answers what ----------------------------------------------------------


async def test_two_executors_both_answer_a_ping_for_all_and_for_the_service_name(
    make_node: NodeFactory, nc: NATS, stack: AsyncExitStack
) -> None:
    a, b = await make_node(), await make_node()
    await micro(stack, a)
    await micro(stack, b)
    for subject in (subj.micro_subject("PING"), subj.micro_subject("PING", "lloom-executor")):
        replies = await request_many(nc, subject, expect=2)
        assert sorted(ServicePing.from_dict(r).id for r in replies) == sorted([a.id, b.id])
    infos = await request_many(nc, subj.micro_subject("INFO"), expect=2)
    assert {ServiceInfo.from_dict(r).id for r in infos} == {a.id, b.id}


async def test_the_id_and_name_variants_answer_only_when_they_match(
    make_node: NodeFactory, nc: NATS, stack: AsyncExitStack
) -> None:
    a, b = await make_node(), await make_node()
    await micro(stack, a)
    await micro(stack, b)
    for verb in subj.MICRO_VERBS:
        only_a = await request_many(nc, subj.micro_subject(verb, "lloom-executor", a.id), expect=1)
        assert [r["id"] for r in only_a] == [a.id]
    # Another service's name, or an id no executor has: nobody listens, and NATS says so at once.
    for subject in (subj.micro_subject("PING", "other-service"), subj.micro_subject("INFO", "lloom-executor", "nobody"),
                    subj.micro_subject("STATS", "other-service", a.id)):  # fmt: skip
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(subject, b"", timeout=WAIT_S)


async def test_a_reply_subject_that_is_not_an_inbox_gets_no_answer(
    make_node: NodeFactory, nc: NATS, stack: AsyncExitStack
) -> None:
    node = await make_node()
    await micro(stack, node)
    target = await nc.subscribe("lloom.v1.catalog.announce.spoofed")
    await nc.publish(subj.micro_subject("INFO"), b"", reply="lloom.v1.catalog.announce.spoofed")
    # The same subscription answers in order: once this answer is here, the first was handled.
    [answer] = await request_many(nc, subj.micro_subject("INFO"), expect=1)
    assert answer["id"] == node.id
    assert target.pending_msgs == 0


async def test_an_executor_that_leaves_stops_answering_before_its_jobs_drain(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    config = parse_config(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\nmodels = ["{MODEL}"]\n'
        f'[node]\nid = "leaving-1"\n[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\n',
        source="test.toml", environ={},
    )  # fmt: skip
    nc = await nats.connect(js_server.url)  # the asker's connection outlives the node's stack
    stack = AsyncExitStack()
    async with stack:
        stack.push_async_callback(nc.close)  # unwound last of all
        node_nc = await nats.connect(js_server.url)
        stack.push_async_callback(node_nc.close)
        backend = OpenAICompatibleBackend(base_url=double.base_url)
        stack.push_async_callback(backend.aclose)
        running: RunningNode = await assemble(config, node_nc, backend, stack, identity=Identity.generate())
        mine = subj.micro_subject("PING", "lloom-executor", "leaving-1")
        assert [r["id"] for r in await request_many(nc, mine, expect=1)] == ["leaving-1"]

        double.faults.append(Fault.slow(1.0))
        slow = asyncio.create_task(job(nc, subj.complete_subject(MODEL), chat_job()))
        await eventually(lambda: running.node.in_flight == 1, timeout=WAIT_S, what="the slow job running")
        leaving = asyncio.create_task(stack.aclose())
        await eventually(lambda: running.node.state is State.DRAINING, timeout=WAIT_S, what="the node draining")
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(mine, b"", timeout=WAIT_S)
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(subj.micro_subject("PING"), b"", timeout=WAIT_S)
        assert not is_error(await within(slow, "the draining node's last answer"))
        await within(leaving, "the node leaving")


@pytest.mark.slow
async def test_a_lloom_executor_process_is_listed_by_micro_discovery(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    config.write_text(config.read_text() + 'id = "proc-1"\n')
    executor = await start_executor("--config", str(config))
    url = await executor.started()
    await executor.wait_for("answering NATS micro discovery")
    nc = await nats.connect(url)
    try:
        [ping] = await request_many(nc, subj.micro_subject("PING"), expect=1)
        assert (ServicePing.from_dict(ping).id, ping["version"]) == ("proc-1", package_version())
        [info] = await request_many(nc, subj.micro_subject("INFO", "lloom-executor", "proc-1"), expect=1)
        subjects = {e.subject for e in ServiceInfo.from_dict(info).endpoints}
        assert subjects == {subj.direct_subject("proc-1")} | {f(m) for m in DOUBLE_MODELS for f in
                                                               (subj.complete_subject, subj.embed_subject, subj.text_subject)}  # fmt: skip
    finally:
        await nc.close()


# -- the shipped permissions (compose/nats/secure.conf) ------------------------------------------


@pytest.fixture
async def secure_executor(secure_bus: SecureBus, double: OpenAIDouble, tmp_path: Path) -> AsyncIterator[RunningNode]:
    """executor-1 with everything `assemble` starts, micro discovery included; its teardown checks
    that none of its own subscriptions ran into the permissions."""
    async with AsyncExitStack() as s:
        yield await executor_node(s, secure_bus, double, tmp_path)


Connect = Callable[[str], Awaitable[NATS]]


@pytest.fixture
async def connect_as(secure_bus: SecureBus) -> AsyncIterator[Connect]:
    made: list[NATS] = []

    async def connect(user: str) -> NATS:
        conn = await connect_nats(secure_bus.url, name=f"test {user}", options=secure_bus.options(user))
        made.append(conn)
        return conn

    yield connect
    for conn in made:
        await close_nats(conn)


@pytest.mark.parametrize("user", ["alice", "bob"])
async def test_a_client_pings_and_reads_info_and_gets_the_real_executors_answer(
    secure_executor: RunningNode, connect_as: Connect, user: str
) -> None:
    client = await connect_as(user)
    [ping] = await request_many(client, subj.micro_subject("PING"), expect=1)
    assert ServicePing.from_dict(ping).id == "executor-1"
    info = ServiceInfo.from_dict((await request_many(client, subj.micro_subject("INFO", "lloom-executor"), expect=1))[0])
    assert {e.subject for e in info.endpoints} >= {subj.complete_subject(MODEL), subj.direct_subject("executor-1")}


async def test_stats_are_for_the_admin_not_for_clients(
    secure_bus: SecureBus, secure_executor: RunningNode, connect_as: Connect
) -> None:
    admin = await connect_as("admin")
    [stats] = await request_many(admin, subj.micro_subject("STATS"), expect=1)
    assert ServiceStats.from_dict(stats).id == "executor-1"

    spy = await watched(secure_bus, "alice")
    assert spy.nc is not None
    inbox = spy.nc.new_inbox()
    answers = await spy.nc.subscribe(inbox)
    await spy.nc.publish(subj.micro_subject("STATS"), b"", reply=inbox)
    await spy.violation("Publish", "$SRV.STATS")
    # The server dropped it: by the time a later ping is answered, no stats have come.
    await spy.nc.request(subj.micro_subject("PING"), b"", timeout=WAIT_S)
    assert answers.pending_msgs == 0
    await close_nats(spy.nc)


@pytest.mark.parametrize("user", ["alice", "bob"])
async def test_a_client_cannot_subscribe_to_discovery_to_answer_in_an_executors_place(
    secure_bus: SecureBus, secure_executor: RunningNode, connect_as: Connect, user: str
) -> None:
    impostor = await watched(secure_bus, user)
    assert impostor.nc is not None
    forged: list[Msg] = []

    async def answer_as_executor(msg: Msg) -> None:
        forged.append(msg)
        await msg.respond(msgspec.json.encode({"type": PING_TYPE, "name": "lloom-executor", "id": "executor-1",
                                               "version": "9.9.9", "metadata": {}}))  # fmt: skip

    await impostor.nc.subscribe("$SRV.>", cb=answer_as_executor)
    await impostor.violation("Subscription", "$SRV.>")
    await impostor.nc.subscribe(subj.micro_subject("PING", "lloom-executor", "executor-1"), cb=answer_as_executor)
    await impostor.violation("Subscription", "$SRV.PING.lloom-executor.executor-1")

    client = await connect_as("alice")
    replies = await request_many(client, subj.micro_subject("PING"), expect=1)
    assert [(r["id"], r["version"]) for r in replies] == [("executor-1", package_version())]
    assert forged == []
    await close_nats(impostor.nc)


async def test_an_executor_cannot_answer_discovery_under_another_executors_id(
    secure_bus: SecureBus, secure_executor: RunningNode, connect_as: Connect
) -> None:
    other = await watched(secure_bus, "executor-2")
    assert other.nc is not None
    await other.nc.subscribe(subj.micro_subject("INFO", "lloom-executor", "executor-1"))
    await other.violation("Subscription", "$SRV.INFO.lloom-executor.executor-1")

    # Under its own id it may answer (a real executor-2 does), and a client hears it.
    async def own(msg: Msg) -> None:
        await msg.respond(b'{"id": "executor-2"}')

    await other.nc.subscribe(subj.micro_subject("INFO", "lloom-executor", "executor-2"), cb=own)
    await other.nc.flush()
    client = await connect_as("alice")
    reply = await client.request(subj.micro_subject("INFO", "lloom-executor", "executor-2"), b"", timeout=WAIT_S)
    assert msgspec.json.decode(reply.data) == {"id": "executor-2"}
    await close_nats(other.nc)
