"""Executors of one machine share one embedded NATS bus, and one JetStream store has one server.

A second `lloom-executor` with no `nats_url` joins the bus the first one runs
(one network, twice the capacity); the JetStream store is locked by the server
that uses it, so a second server on it is refused instead of overwriting
acknowledged receipts; and when the executor that runs the bus stops, the other
one starts it again on the same port and store, and the network goes on.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from executor.process.embedded_nats import EmbeddedNats, StoreInUse, StoreLock, free_port
from executor.process.shared_bus import SharedBus
from protocol.client import LloomClient
from protocol.errors import LloomError
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.processes import JOINED, LLOOM, Result, StartExecutor, children, run
from tests.helpers.wait import WAIT_S
from tests.test_daemon import CONTENT, write_config
from tests.helpers.jobs import ask


async def eventually(check: Callable[[], Awaitable[Result]], ok: Callable[[Result], bool], what: str) -> Result:
    """Run `check` until `ok` holds for its result (each run is a real CLI call), within WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        result = await check()
        if ok(result):
            return result
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {WAIT_S}s; last output:\n{result.stdout}{result.stderr}")


def executors_listed(result: Result) -> set[str]:
    return {e["executor_id"] for e in json.loads(result.stdout)} if result.returncode == 0 else set()


# -- one store, one server ------------------------------------------------------------------


async def test_a_second_nats_server_on_the_same_store_is_refused_naming_the_first(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    async with EmbeddedNats(jetstream=True, store_dir=str(store)) as first:
        # What the second executor used to do: its own server, on another port, on the same store.
        second = EmbeddedNats(jetstream=True, store_dir=str(store))
        with pytest.raises(StoreInUse) as refused:
            await second.start()
        message = str(refused.value)
        assert str(store) in message and f"pid {first.pid} on 127.0.0.1:{first.port}" in message
        assert "lose acknowledged messages" in message
        assert second.pid is None  # no server was started
    async with EmbeddedNats(jetstream=True, store_dir=str(store)) as again:  # free once the first is gone
        assert again.pid is not None


async def test_the_store_stays_locked_while_its_server_runs_even_if_its_starter_died(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    server = EmbeddedNats(jetstream=True, store_dir=str(store))
    await server.start()
    try:
        # A SIGKILLed executor closes its copy of the lock; the server it started still holds it.
        assert server._lock is not None
        server._lock.release()
        assert StoreLock.try_acquire(store) is None
    finally:
        await server.stop()
    lock = StoreLock.try_acquire(store)
    assert lock is not None, "the store stayed locked after its server exited"
    lock.release()


async def test_a_nats_server_someone_runs_on_the_port_is_joined_and_its_store_left_alone(tmp_path: Path) -> None:
    async with EmbeddedNats() as theirs:
        bus = SharedBus(port=theirs.port, store_dir=tmp_path / "nats")
        await bus.start()
        try:
            assert (bus.url, bus.owner) == (theirs.url, False)
            lock = StoreLock.try_acquire(tmp_path / "nats")  # joining took no lock on our store
            assert lock is not None
            lock.release()
        finally:
            await bus.stop()


async def test_a_store_locked_with_no_server_answering_is_a_clear_error(tmp_path: Path) -> None:
    held = StoreLock.acquire(tmp_path / "nats")  # e.g. a nats-server of this machine that is wedged
    try:
        bus = SharedBus(port=free_port(), store_dir=tmp_path / "nats", start_timeout_s=0.3)
        with pytest.raises(StoreInUse, match="is in use by another nats-server .* set \\[node\\] nats_url"):
            await bus.start()
        assert bus.url == "" and not bus.owner
    finally:
        held.release()


# -- a second executor joins, and the bus survives the first one stopping -------------------


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_second_executor_joins_the_bus_shares_the_jobs_and_takes_the_bus_over_when_the_first_stops(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str], stop: signal.Signals
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url, port=port)
    first = await start_executor("--config", str(cfg))
    url = await first.started()
    assert url == f"nats://127.0.0.1:{port}"
    second = await start_executor("--config", str(cfg))  # same data home, same port, no nats_url
    assert await second.started() == url
    assert second.logged(JOINED) is not None
    assert children(second.proc.pid) == []  # no second nats-server (and no second network)
    ids = {str(e.logged("executor node started")["executor_id"]) for e in (first, second)}  # type: ignore[index]

    models = lambda: run(LLOOM, "--nats", url, "models", "--json", env=env)  # noqa: E731
    await eventually(models, lambda r: executors_listed(r) == ids, "`lloom models` lists both executors")

    jobs = 20
    async with await LloomClient.connect(url, timeout=WAIT_S) as client:
        replies = [await client.complete(ask()) for _ in range(jobs)]
        served = Counter(r.executor_id for r in replies)
        assert set(served) == ids and all(n > 0 for n in served.values()), served
        assert all(r.content.strip() == CONTENT for r in replies)

        # Both executors' receipts land in the one stream, every chain whole.
        # Executors that have stopped announce no key any more: this is about the chain, not whose keys.
        verify = lambda: run(LLOOM, "--nats", url, "receipts", "verify", "--stream", "--any-key", env=env)  # noqa: E731
        await eventually(verify, lambda r: f"{jobs} receipts: {jobs} valid" in r.stdout, "all receipts stored")
        assert (await verify()).returncode == 0

        # The first executor (which runs the bus) stops, or dies; the second starts the bus again,
        # on the same port and store, once the first one's nats-server has exited.
        first.proc.send_signal(stop)
        assert await first.exit_code() == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
        await second.wait_for("took over the embedded NATS server")
        survivor = ids - {str(first.logged("executor node started")["executor_id"])}  # type: ignore[index]
        await eventually(models, lambda r: executors_listed(r) == survivor, "the second is listed again")

        # The same client reconnected by itself: every job attempted now completes, on the second.
        attempted, completed, failed = 10, 0, 0
        for _ in range(attempted):
            try:
                reply = await client.complete(ask())
            except LloomError:
                failed += 1
                continue
            completed += reply.executor_id in survivor
        assert (attempted, completed, failed) == (10, 10, 0)

    # The stream kept the first executor's receipts across the takeover and gained the new ones.
    total = jobs + attempted
    done = await eventually(verify, lambda r: f"{total} receipts: {total} valid" in r.stdout, "receipts after takeover")
    assert done.returncode == 0 and "chain problems: 0" in done.stdout


@pytest.mark.slow
async def test_a_second_executor_on_the_same_outbox_exits_2_saying_so_and_the_first_keeps_serving(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    cfg.write_text(cfg.read_text() + 'id = "same-id"\n')  # the same id: the same outbox directory
    first = await start_executor("--config", str(cfg))
    url = await first.started()
    second = await start_executor("--config", str(cfg))
    assert await second.exit_code() == 2
    outbox = tmp_path / ".local" / "share" / "lloom" / "receipts" / "same-id"
    assert f"lloom-executor: the receipts outbox {outbox} is in use by another running executor" in second.stderr
    async with await LloomClient.connect(url, timeout=WAIT_S) as client:
        assert (await client.complete(ask())).executor_id == "same-id"


@pytest.mark.slow
async def test_the_issue_12_lost_receipt_cannot_happen_the_second_executor_writes_through_the_same_server(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    """The order of the report: 10 receipts from the first, the second starts, 1 from each.

    Before, the second's own server on the same store put its receipt 1 at stream message 11
    and the first's acknowledged receipt 11 was gone (`receipts 11..11 are missing`)."""
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    cfg.write_text(cfg.read_text() + "\n[receipts]\nsync_interval_secs = 0.05\n")
    first = await start_executor("--config", str(cfg))
    url = await first.started()
    first_id = str(first.logged("executor node started")["executor_id"])  # type: ignore[index]
    async with await LloomClient.connect(url, timeout=WAIT_S) as client:
        for _ in range(10):
            await client.complete(ask(), executor=first_id)
        second = await start_executor("--config", str(cfg))
        assert await second.started() == url  # joined: no second server on the store
        second_id = str(second.logged("executor node started")["executor_id"])  # type: ignore[index]
        await client.complete(ask(), executor=second_id)
        await client.complete(ask(), executor=first_id)
    # Executors that have stopped announce no key any more: this is about the chain, not whose keys.
    verify = lambda: run(LLOOM, "--nats", url, "receipts", "verify", "--stream", "--any-key", env=env)  # noqa: E731
    result = await eventually(verify, lambda r: "12 receipts: 12 valid" in r.stdout, "all 12 receipts stored")
    assert result.returncode == 0 and "chain problems: 0" in result.stdout, result.stdout
    report = await run(LLOOM, "--nats", url, "receipts", "report", "--stream", "--json", env=env)
    by_executor = json.loads(report.stdout)["executor"]
    assert {k: v["jobs"] for k, v in by_executor.items()} == {first_id: 11, second_id: 1}
