"""Executors announce signed offers; clients see the live network and route jobs by policy."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from executor.catalog.announcer import Announcer
from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import ModelConfig, NodeConfig
from executor.process.embedded_nats import EmbeddedNats, free_port
from executor.jobs.node import ExecutorNode
from protocol import subjects as subj
from protocol.announcements import HDR_SIGNATURE, Announcement, Load, ModelCategory, catalog_decoder
from protocol.catalog import Catalog
from protocol.client import LloomClient
from protocol.errors import NoExecutors
from protocol.identity import Identity
from protocol.routing import Category, Cheapest, Constraints, Fastest, Specific
from tests.conftest import Signing
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask
from tests.helpers.wait import within

HEARTBEAT = 0.25
# Generous: these bound waits for events that normally take milliseconds, on a loaded CI machine too.
WAIT = 10.0


class Executor:
    def __init__(self, node: ExecutorNode, announcer: Announcer, double: OpenAIDouble, nc: NATS) -> None:
        self.node = node
        self.announcer = announcer
        self.double = double
        self.nc = nc

    @property
    def id(self) -> str:
        return self.node.id


MakeExecutor = Callable[..., Awaitable[Executor]]


@pytest.fixture
async def make_executor(nats_server: EmbeddedNats, signing: Signing) -> AsyncIterator[MakeExecutor]:
    made: list[Executor] = []

    async def factory(
        *models: ModelConfig | str,
        heartbeat: float = HEARTBEAT,
        base_url: str | None = None,
        **node_config: object,
    ) -> Executor:
        configs = [m if isinstance(m, ModelConfig) else ModelConfig(name=m) for m in models]
        double = OpenAIDouble(models=[m.name for m in configs])
        await double.start()
        nc = await nats.connect(nats_server.url)
        backend = OpenAICompatibleBackend(base_url=base_url or double.base_url, timeout_secs=5)
        identity = Identity.generate()  # one key for the announcements and the receipts, as a real executor has
        node = ExecutorNode(nc, backend, NodeConfig(**node_config), models=[m.name for m in configs],  # type: ignore[arg-type]
                            **signing(node_config.get("id"), identity))  # fmt: skip
        await node.start()
        announcer = Announcer(nc, node, identity, models=configs, heartbeat_interval=heartbeat)
        await announcer.start()
        made.append(executor := Executor(node, announcer, double, nc))
        return executor

    yield factory
    for e in made:
        await e.announcer.stop()
        await e.node.stop(drain_timeout=1)
        await e.nc.close()
        await e.node.backend.aclose()
        await e.double.stop()


def priced(name: str, inp: str, out: str, **kw: object) -> ModelConfig:
    return ModelConfig(name=name, input_price=Decimal(inp), output_price=Decimal(out), **kw)  # type: ignore[arg-type]


async def test_client_started_last_sees_the_whole_catalogue_on_its_first_call(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    a = await make_executor(priced("llama-3-8b", "0.10", "0.20", context_length=8192))
    b = await make_executor(priced("gpt-4o", "2.50", "10.00", category=ModelCategory.QUALITY), "qwen2.5:7b")
    c = await make_executor("llama-3-8b")

    catalog = await client.catalog()

    by_id = {e.executor_id: e for e in catalog.entries()}
    assert set(by_id) == {a.id, b.id, c.id}
    assert [m.name for m in by_id[b.id].models] == ["gpt-4o", "qwen2.5:7b"]
    gpt = by_id[b.id].models[0]
    assert (gpt.pricing.input, gpt.pricing.output, gpt.pricing.unit) == (
        Decimal("2.50"), Decimal("10.00"), "USD per 1M tokens",
    )  # fmt: skip
    assert gpt.category is ModelCategory.QUALITY
    assert by_id[a.id].models[0].context_length == 8192
    assert by_id[a.id].load == Load(in_flight=0, capacity=32)
    assert by_id[a.id].key == a.announcer.identity.public_key


async def test_prices_travel_as_decimal_strings_never_floats(make_executor: MakeExecutor, nc: NATS) -> None:
    await make_executor(priced("m", "0.15", "0.60"))
    reply = await nc.request(subj.CATALOG_QUERY, b"", timeout=WAIT)
    offer = msgspec.json.decode(reply.data)["models"][0]
    assert offer["pricing"] == {"input": "0.15", "output": "0.60", "unit": "USD per 1M tokens"}


async def test_executor_started_later_appears_and_a_graceful_stop_removes_it_at_once(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    catalog = await client.catalog()
    assert catalog.entries() == []
    # A long heartbeat: the removal below cannot be an expiry.
    late = await make_executor("m", heartbeat=30)
    while not catalog.entries():
        assert await catalog.wait_changed(timeout=WAIT)
    assert catalog.entries()[0].executor_id == late.id

    await late.announcer.stop()
    while catalog.entries():
        assert await catalog.wait_changed(timeout=WAIT)


async def test_model_loaded_on_the_backend_is_announced_without_a_restart(
    make_executor: MakeExecutor, client: LloomClient, nats_server: EmbeddedNats
) -> None:
    double = OpenAIDouble(models=["first"])
    await double.start()
    nc = await nats.connect(nats_server.url)
    node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), NodeConfig())
    async with node:
        announcer = Announcer(nc, node, Identity.generate(), heartbeat_interval=30)
        await announcer.start()
        catalog = await client.catalog()
        assert [m.name for _, m in catalog.offers()] == ["first"]
        double.models.append("loaded-later")
        await node.refresh_models()
        while {m.name for _, m in catalog.offers()} != {"first", "loaded-later"}:
            assert await catalog.wait_changed(timeout=WAIT)
        await announcer.stop()
    await node.backend.aclose()
    await nc.close()
    await double.stop()


async def test_heartbeats_carry_load(make_executor: MakeExecutor, client: LloomClient) -> None:
    executor = await make_executor("m", max_concurrent_jobs=4)
    executor.double.fault = Fault.stall()
    catalog = await client.catalog()
    task = asyncio.create_task(client.complete(ask(model="m"), timeout=5))
    await within(executor.double.started.wait(), "the backend got the job", WAIT)
    while catalog.entries()[0].load.in_flight != 1:
        assert await catalog.wait_changed(timeout=WAIT)
    assert catalog.entries()[0].load == Load(in_flight=1, capacity=4)
    await cancel(task)


# -- forged, replayed, stale and impostor announcements --


async def test_forged_unsigned_replayed_stale_and_impostor_announcements_are_dropped(
    make_executor: MakeExecutor, nc: NATS, nats_server: EmbeddedNats
) -> None:
    real = await make_executor("m", heartbeat=30)
    catalog = Catalog(nc)
    await catalog.start()
    assert len(catalog.entries()) == 1
    # A genuine announcement of the executor, signed by it: sent once, then replayed.
    payload = real.announcer._announcement()
    sig = real.announcer.identity.sign(payload)
    genuine = catalog_decoder.decode(payload)
    assert isinstance(genuine, Announcement)
    mallory = Identity.generate()

    def evil(**changes: object) -> bytes:
        fields = {"seq": genuine.seq + 1000, "sent_at_ms": time.time_ns() // 1_000_000, **changes}
        return msgspec.json.encode(msgspec.structs.replace(genuine, **fields))

    cheaper = evil(models=[])  # e.g. pretend the executor serves nothing
    stale = Identity.generate()
    stale_payload = evil(key=stale.public_key, executor_id="old-one", sent_at_ms=1_000)
    impostor = evil(key=mallory.public_key)
    cases = [
        (payload, sig),  # genuine: accepted
        (payload, sig),  # the same again: replayed
        (cheaper, ""),  # unsigned
        (cheaper, mallory.sign(cheaper)),  # forged: signed by someone else
        (cheaper[:-5], real.announcer.identity.sign(cheaper[:-5])),  # malformed
        (stale_payload, stale.sign(stale_payload)),  # stale
        (impostor, mallory.sign(impostor)),  # another key claiming this executor's id
    ]
    # A genuine newcomer, sent last on the same connection: NATS keeps one publisher's order,
    # so once the catalogue has it, it has judged every message before it.
    newcomer = Identity.generate()
    marker = evil(key=newcomer.public_key, executor_id="newcomer", seq=1)
    cases.append((marker, newcomer.sign(marker)))
    publisher = await nats.connect(nats_server.url)
    for data, signature in cases:
        await publisher.publish(subj.CATALOG_ANNOUNCE, data, headers={HDR_SIGNATURE: signature} if signature else None)
    await publisher.flush()
    await publisher.close()
    while "newcomer" not in {e.executor_id for e in catalog.entries()}:
        assert await catalog.wait_changed(timeout=WAIT)

    assert catalog.rejected == {"replayed": 1, "unsigned": 1, "forged": 1, "malformed": 1, "stale": 1, "impostor": 1}
    entry = next(e for e in catalog.entries() if e.executor_id == real.id)
    assert entry.key == real.announcer.identity.public_key
    assert [m.name for m in entry.models] == ["m"]
    await catalog.stop()


# -- routing --


@pytest.fixture
async def market(make_executor: MakeExecutor) -> dict[str, Executor]:
    return {
        "cheap": await make_executor(priced("llama-3-8b", "0.10", "0.20", context_length=8192)),
        "pricey": await make_executor(
            priced("gpt-4o", "2.50", "10.00", context_length=128000, category=ModelCategory.QUALITY,
                   features=["chat", "stream", "tools"])  # fmt: skip
        ),
        "fast": await make_executor(priced("phi-3-mini", "0.50", "0.50", category=ModelCategory.FAST)),
    }


async def test_each_policy_picks_what_it_should(market: dict[str, Executor], client: LloomClient) -> None:
    async def served_by(**kw: object) -> str:
        reply = await client.complete(ask(model="any"), **kw)  # type: ignore[arg-type]
        return next(name for name, e in market.items() if e.id == reply.executor_id)

    assert await served_by(route=Cheapest()) == "cheap"
    assert await served_by(route=Category(ModelCategory.FAST)) == "fast"
    assert await served_by(route=Category(ModelCategory.QUALITY)) == "pricey"
    assert await served_by(route=Specific("gpt-4o")) == "pricey"
    reply = await client.complete(ask(model="any"), route=Cheapest())
    assert reply.model == "llama-3-8b"  # the job was sent with the chosen model's name


async def test_constraints_exclude_what_they_should(market: dict[str, Executor], client: LloomClient) -> None:
    async def served_by(constraints: Constraints, route=Cheapest()) -> str:  # type: ignore[no-untyped-def]
        reply = await client.complete(ask(model="any"), route=route, constraints=constraints)
        return next(name for name, e in market.items() if e.id == reply.executor_id)

    assert await served_by(Constraints(min_context=100_000)) == "pricey"
    assert await served_by(Constraints(features=frozenset({"tools"}))) == "pricey"
    assert await served_by(Constraints(max_output_price=Decimal("1")), route=Fastest()) in {"cheap", "fast"}
    assert await served_by(Constraints(min_context=8000, max_input_price=Decimal("1"))) == "cheap"
    with pytest.raises(NoExecutors, match="within the constraints"):
        await client.complete(ask(), route=Cheapest(), constraints=Constraints(min_context=10**6))


async def test_fastest_prefers_what_the_client_measured(make_executor: MakeExecutor, client: LloomClient) -> None:
    slow = await make_executor("shared")
    quick = await make_executor("shared")
    slow.double.fault = Fault.slow(0.15)
    # Nothing measured yet: Fastest tries each unmeasured executor once, then goes by what it saw.
    first_two = {(await client.complete(ask(model="shared"), route=Fastest())).executor_id for _ in range(2)}
    assert first_two == {slow.id, quick.id}
    for _ in range(5):
        assert (await client.complete(ask(model="shared"), route=Fastest())).executor_id == quick.id


async def test_failover_to_the_next_candidate_sends_each_executor_the_job_once(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    broken = await make_executor(priced("m", "0.01", "0.01"), base_url=f"http://127.0.0.1:{free_port()}/v1")
    healthy = await make_executor(priced("m", "1", "1"))
    reply = await client.complete(ask(model="m"), route=Cheapest())
    assert reply.executor_id == healthy.id
    assert (broken.node.stats.received, healthy.node.stats.received) == (1, 1)


async def test_busy_candidate_is_skipped(make_executor: MakeExecutor, client: LloomClient) -> None:
    # A long heartbeat: the catalogue still shows the full executor as idle, so it is tried first.
    full = await make_executor(priced("m", "0.01", "0.01"), max_concurrent_jobs=1, heartbeat=30)
    spare = await make_executor(priced("m", "1", "1"), heartbeat=30)
    await client.catalog()  # loads taken now, while both are idle
    full.double.faults.append(Fault.stall())
    stalled = asyncio.create_task(client.complete(ask(model="m"), executor=full.id))
    await within(full.double.started.wait(), "the backend got the job", WAIT)
    reply = await client.complete(ask(model="m"), route=Cheapest())
    assert reply.executor_id == spare.id
    assert full.node.stats.busy == 1
    await cancel(stalled)


async def test_executor_announced_at_capacity_is_tried_last(make_executor: MakeExecutor, client: LloomClient) -> None:
    full = await make_executor(priced("m", "0.01", "0.01"), max_concurrent_jobs=1)
    spare = await make_executor(priced("m", "1", "1"))
    catalog = await client.catalog()
    full.double.faults.append(Fault.stall())
    stalled = asyncio.create_task(client.complete(ask(model="m"), executor=full.id))
    while next(e for e in catalog.entries() if e.executor_id == full.id).load.in_flight == 0:
        assert await catalog.wait_changed(timeout=WAIT)  # a heartbeat that changes the load is a change
    reply = await client.complete(ask(model="m"), route=Cheapest())
    assert reply.executor_id == spare.id
    assert (full.node.stats.received, full.node.stats.busy) == (1, 0)  # never asked: no busy round trip
    await cancel(stalled)


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_hedging_asks_a_second_executor_when_the_first_is_slow(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    sluggish = await make_executor(priced("m", "0.01", "0.01"))
    backup = await make_executor(priced("m", "1", "1"))
    sluggish.double.faults.append(Fault.stall())
    reply = await client.complete(ask(model="m"), route=Cheapest(), hedge_after=0.05)
    assert reply.executor_id == backup.id
    await within(sluggish.double.disconnected.wait(), "the loser cancelled at its backend", WAIT)
    await within(sluggish.node.wait_idle(), "the loser's node idle again", WAIT)
    assert sluggish.node.stats.cancelled == 1


async def test_routed_stream_fails_over_before_its_first_chunk(make_executor: MakeExecutor, client: LloomClient) -> None:
    await make_executor(priced("m", "0.01", "0.01"), base_url=f"http://127.0.0.1:{free_port()}/v1")
    healthy = await make_executor(priced("m", "1", "1"))
    async with client.stream(ask(model="m"), route=Cheapest()) as stream:
        chunks = [c.delta async for c in stream]
    assert chunks and stream.end is not None
    assert stream.end.executor_id == healthy.id


async def test_executors_measure_and_advertise_their_speed(make_executor: MakeExecutor, client: LloomClient) -> None:
    executor = await make_executor("m")
    for _ in range(3):
        await client.complete(ask(model="m"), executor=executor.id)
    catalog = await client.catalog()  # started by the first job (to learn the executor's key)
    await catalog.refresh()  # a query is answered with a fresh announcement
    perf = catalog.entries()[0].models[0].perf
    assert perf.samples == 3
    assert perf.latency_ms is not None and perf.latency_ms > 0
    assert perf.success_rate == 1.0
