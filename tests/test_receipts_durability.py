"""Receipts fail closed and survive what disks do: a full disk, a torn last line, a long JetStream outage.

In-process nodes on real nats-servers. The full disk here is a fault hook in the
outbox's write() (a partial write, then ENOSPC), so the test can fill and free it
at will; tests/test_receipts_full_disk.py does the same with a real tmpfs and
`lloom-executor` processes. Every test counts what clients got against what the
outbox and the stream hold: receipts lost, duplicated, sequence numbers reused.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import structlog

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import NodeConfig
from executor.jobs.node import ExecutorNode
from executor.process.embedded_nats import EmbeddedNats, free_port
from executor.receipts.issuer import ReceiptIssuer
from executor.receipts.outbox import Outbox
from executor.receipts.publisher import ReceiptPublisher
from protocol.client import LloomClient
from protocol.errors import ReceiptsUnavailable
from protocol.identity import Identity
from protocol.receipts import SignedReceipt, check_chain, signed_receipt_decoder, verify_receipt
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.figures import record
from tests.helpers.jobs import ask
from tests.helpers.wait import eventually, within
from tests.test_receipts import flushed, stored_receipts

WAIT = 15.0


class Disk:
    """os.write, until `fill(room)`: then `room` more bytes go in and every write after fails with ENOSPC."""

    def __init__(self) -> None:
        self.room: int | None = None  # None: plenty
        self.refused = 0

    def fill(self, room: int) -> None:
        self.room = room

    def free(self) -> None:
        self.room = None

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.room is None:
            return os.write(fd, data)
        if self.room > 0:  # a full disk takes what fits, then refuses the rest
            n = os.write(fd, data[: self.room])
            self.room -= n
            return n
        self.refused += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def outbox_lines(directory: Path) -> list[SignedReceipt]:
    data = (directory / "receipts.jsonl").read_bytes()
    assert data.endswith(b"\n"), "the outbox ends with a whole line"
    return [signed_receipt_decoder.decode(line) for line in data.splitlines()]


def reused(receipts: list[SignedReceipt]) -> int:
    """Sequence numbers carried by two different receipts."""
    by_seq: dict[int, set[str]] = {}
    for s in receipts:
        by_seq.setdefault(s.receipt.seq, set()).add(s.receipt.job_id)
    return sum(len(jobs) - 1 for jobs in by_seq.values())


class Rig:
    def __init__(self, node: ExecutorNode, issuer: ReceiptIssuer, publisher: ReceiptPublisher, directory: Path) -> None:
        self.node, self.issuer, self.publisher, self.directory = node, issuer, publisher, directory


@pytest.fixture
async def disk() -> Disk:
    return Disk()


@pytest.fixture
async def rig(js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path, disk: Disk) -> AsyncIterator[Rig]:
    nc = await nats.connect(js_server.url)
    outbox = Outbox(tmp_path / "outbox", write=disk.write)
    publisher = ReceiptPublisher(nc, outbox, sync_interval_s=0.05)
    issuer = ReceiptIssuer(Identity.generate(), "exe-1", outbox, on_issue=publisher.notify)
    node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), NodeConfig(), executor_id="exe-1",
                        receipts=issuer)  # fmt: skip
    await publisher.start()
    await node.start()
    yield Rig(node, issuer, publisher, tmp_path / "outbox")
    await node.stop(drain_timeout=1)
    await publisher.stop()
    outbox.close()
    await node.backend.aclose()
    await nc.close()


async def test_a_full_disk_fails_jobs_typed_stops_taking_them_and_resumes_when_space_returns(
    rig: Rig, disk: Disk, double: OpenAIDouble, js_client: LloomClient
) -> None:
    js_client.busy_retries = 0  # each attempt one job (it would retry receipts_unavailable like busy)
    got = [(await js_client.complete(ask())).receipt for _ in range(3)]

    disk.fill(room=100)  # part of the next batch's line fits, then the disk is full
    with pytest.raises(ReceiptsUnavailable) as failed:
        await js_client.complete(ask())
    assert failed.value.retryable and "No space left on device" in failed.value.message
    status = rig.node.status().receipts
    assert status is not None
    assert (status.durable, status.failed, status.refused) == (False, 1, 0)
    assert status.error is not None and "No space left on device" in status.error
    # The job after is refused before it runs: the backend never sees it.
    served = double.completed
    with pytest.raises(ReceiptsUnavailable):
        await js_client.complete(ask())
    assert double.completed == served
    assert rig.node.status().receipts.refused == 1  # type: ignore[union-attr]
    # The failed write was cut back: the file holds exactly the receipts clients got.
    assert [s.receipt.seq for s in outbox_lines(rig.directory)] == [1, 2, 3]

    disk.free()
    await eventually(lambda: rig.issuer.durable, timeout=WAIT, what="the outbox probed writable again")
    assert rig.node.status().receipts.durable  # type: ignore[union-attr]
    got += [(await js_client.complete(ask())).receipt for _ in range(2)]

    assert all(r is not None for r in got)
    held = [r for r in got if r is not None]
    record("full_disk_hook", {"jobs_attempted": 7, "jobs_completed": len(held), "jobs_failed_typed": 2})
    # The failed job's number was never sent anywhere, so the chain goes on from the last one on disk.
    assert [r.receipt.seq for r in held] == [1, 2, 3, 4, 5]
    await flushed(rig.issuer.outbox, rig.publisher)
    stored = await stored_receipts(rig.node.nc.jetstream())
    assert sorted(s.receipt.job_id for s in stored) == sorted(r.receipt.job_id for r in held)  # none lost
    assert (len(stored), reused(stored + held)) == (5, 0)  # no duplicate, no seq on two receipts
    assert check_chain([(s, verify_receipt(s)) for s in stored]) == []


async def test_a_torn_last_line_is_cut_off_on_start_and_the_chain_continues_without_reuse(tmp_path: Path) -> None:
    identity = Identity.generate()
    outbox = Outbox(tmp_path)
    issuer = ReceiptIssuer(identity, "exe", outbox)
    first = await _issue(issuer, 3)
    outbox.close()
    whole = (tmp_path / "receipts.jsonl").read_bytes()
    with open(tmp_path / "receipts.jsonl", "ab") as f:  # what a crash or a full disk mid-write leaves
        f.write(b'{"receipt":{"executor_id":"exe","executor_key":"U')

    with structlog.testing.capture_logs() as logs:
        reopened = Outbox(tmp_path)
    cut = [e for e in logs if e["event"] == "cut a torn last line off the receipts outbox"]
    assert len(cut) == 1 and cut[0]["kept_bytes"] == len(whole)
    assert (tmp_path / "receipts.jsonl").read_bytes() == whole
    assert (reopened.last_seq, reopened.waiting) == (3, 3)
    later = await _issue(ReceiptIssuer(identity, "exe", reopened), 2)
    reopened.close()

    lines = outbox_lines(tmp_path)
    assert [s.receipt.seq for s in lines] == [1, 2, 3, 4, 5]
    assert [s.receipt.job_id for s in lines] == [s.receipt.job_id for s in first + later]
    assert reused(lines) == 0
    assert check_chain([(s, verify_receipt(s)) for s in lines]) == []


async def test_a_write_that_fails_mid_batch_leaves_no_part_of_it_and_the_next_batch_reuses_no_held_seq(
    tmp_path: Path,
) -> None:
    disk = Disk()
    outbox = Outbox(tmp_path, write=disk.write)
    issuer = ReceiptIssuer(Identity.generate(), "exe", outbox)
    held = await _issue(issuer, 2)
    disk.fill(room=2500)  # one whole line of the next batch of three fits, then the disk is full
    results = await asyncio.gather(*(_one(issuer, f"b{i}") for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ReceiptsUnavailable) for r in results)
    assert [s.receipt.seq for s in outbox_lines(tmp_path)] == [1, 2]  # the whole line was cut back too
    with pytest.raises(ReceiptsUnavailable):  # refused at once while unwritable
        await _one(issuer, "refused")
    disk.free()
    outbox.sync()  # the probe the publisher runs every sync interval
    assert outbox.durable
    held += await _issue(issuer, 2)
    outbox.close()
    lines = outbox_lines(tmp_path)
    assert [s.receipt.seq for s in lines] == [1, 2, 3, 4]
    assert [s.receipt.job_id for s in lines] == [s.receipt.job_id for s in held]
    assert check_chain([(s, verify_receipt(s)) for s in lines]) == []



async def test_a_slow_fsync_runs_beside_the_loop_and_a_failed_one_still_stops_jobs(tmp_path: Path) -> None:
    """The periodic fsync and acked mark run in a thread: jobs get receipts (written before they
    return) while an fsync hangs; when the fsync fails, the outbox fails closed as before."""
    import threading

    release, entered = threading.Event(), threading.Event()
    fail = False

    def fsync(fd: int) -> None:
        entered.set()
        release.wait(WAIT)
        if fail:
            raise OSError(errno.EIO, "I/O error")
        os.fsync(fd)

    outbox = Outbox(tmp_path, fsync=fsync)
    issuer = ReceiptIssuer(Identity.generate(), "exe", outbox)
    first = await _issue(issuer, 2)
    outbox.acked(1)
    syncing = asyncio.ensure_future(outbox.sync_async())
    await eventually(entered.is_set, timeout=WAIT, what="the fsync began")
    during = await within(_issue(issuer, 3), "receipts while an fsync hangs", WAIT)  # the loop is free
    assert [s.receipt.seq for s in outbox_lines(tmp_path)] == [1, 2, 3, 4, 5]  # on disk before they returned
    assert not syncing.done()
    release.set()
    await within(syncing, "the fsync, released", WAIT)
    assert (tmp_path / "acked").read_text() == "1"
    assert outbox.durable
    # Written after the fsync began: dirty again, fsynced by the next round, which fails here.
    fail = True
    await within(outbox.sync_async(), "a failing fsync", WAIT)
    assert not outbox.durable and "fsync" in (outbox.error or "")
    with pytest.raises(ReceiptsUnavailable):
        await _one(issuer, "refused")
    outbox.close()
    assert check_chain([(s, verify_receipt(s)) for s in outbox_lines(tmp_path)]) == []
    assert [s.receipt.job_id for s in outbox_lines(tmp_path)] == [s.receipt.job_id for s in first + during]

async def test_receipts_waiting_for_jetstream_are_held_on_disk_not_in_memory_and_all_published_once(
    double: OpenAIDouble, tmp_path: Path
) -> None:
    """5,000 jobs while the server has no JetStream: memory holds the window, the rest waits on disk;
    when JetStream comes up (same port, same store), every receipt is stored exactly once."""
    n, window = 5000, 256
    port, store = free_port(), tmp_path / "js"
    outbox = Outbox(tmp_path / "outbox", memory_window=window)
    high_water = 0
    async with EmbeddedNats(port=port, jetstream=False) as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        publisher = ReceiptPublisher(nc, outbox, sync_interval_s=0.05, retry_max_s=0.5)
        issuer = ReceiptIssuer(Identity.generate(), "exe-w", outbox, on_issue=publisher.notify)
        node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), NodeConfig(max_concurrent_jobs=64),
                            executor_id="exe-w", receipts=issuer)  # fmt: skip
        await publisher.start()
        await node.start()
        async with await LloomClient.connect(server.url, timeout=WAIT) as client:
            held: list[SignedReceipt] = []

            async def worker(count: int) -> None:
                nonlocal high_water
                for _ in range(count):
                    reply = await client.complete(ask())
                    assert reply.receipt is not None
                    held.append(reply.receipt)
                    high_water = max(high_water, len(outbox.window))

            await within(asyncio.gather(*(worker(n // 25) for _ in range(25))), f"{n} jobs", 120)
        assert len(held) == n
        assert (outbox.waiting, publisher.published) == (n, 0)  # nothing could be published
        assert high_water <= window and len(outbox.window) <= window
        status = node.status().receipts
        assert status is not None and (status.unpublished, status.in_memory, status.memory_window) == (n, window, window)
        assert status.oldest_waiting_age_s is not None and status.oldest_waiting_age_s >= 0
    # The same server comes back with JetStream: the node's connection reconnects, the outbox drains.
    async with EmbeddedNats(port=port, jetstream=True, store_dir=str(store)):
        await within(flushed(outbox, publisher), "every waiting receipt published", 60)
        stored = await stored_receipts(nc.jetstream())
        assert len(outbox.window) == 0
        await node.stop(drain_timeout=1)
        await publisher.stop(flush_timeout=0.1)
        outbox.close()
        await node.backend.aclose()
        await nc.close()

    seqs = [s.receipt.seq for s in stored]
    record("jetstream_outage", {"jobs": n, "memory_window": window, "window_high_water": high_water,
                                "receipts_expected": len(held), "receipts_stored": len(set(seqs)),
                                "receipts_duplicated": len(stored) - len(set(seqs)), "seqs_reused": reused(stored + held)})  # fmt: skip
    assert (len(stored), len(set(seqs))) == (n, n)  # each once: none lost, none duplicated
    assert sorted(seqs) == list(range(1, n + 1))
    assert {s.receipt.job_id for s in stored} == {r.receipt.job_id for r in held}
    assert reused(stored + held) == 0


async def _one(issuer: ReceiptIssuer, job_id: str) -> SignedReceipt:
    from protocol.receipts import ReceiptUsage

    return await issuer.issue(
        job_id=job_id, client=None, model="m", backend="b", outcome="completed", finish_reason="stop",
        usage=ReceiptUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2, counted_by="backend"),
        started_at_ms=0, ttft_ms=None, request=b"{}", response_text="x",
    )  # fmt: skip


async def _issue(issuer: ReceiptIssuer, n: int) -> list[SignedReceipt]:
    """`n` receipts, one loop turn each (so each is its own batch)."""
    return [await _one(issuer, f"job-{issuer.outbox.last_seq + 1}") for _ in range(n)]
