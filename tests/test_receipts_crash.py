"""Receipts across a crash mid-burst: a `lloom-executor` process SIGKILLed under load loses no receipt.

Every receipt a client got in a reply was in the outbox before the reply left (one write()
per event-loop turn, then the replies), and the publisher only sends what the outbox holds,
in batches that wait up to their delay: so a kill between the write and JetStream's ack, or
between the write and the reply, must lose nothing. The test counts receipts the clients
got, receipts on disk, and receipts in the stream after a restart, and checks the chain.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.js.errors
import pytest

from executor.process.embedded_nats import EmbeddedNats
from protocol.client import LloomClient
from protocol.errors import LloomError
from protocol.receipts import SignedReceipt, check_chain, receipt_lines, signed_receipt_decoder, verify_receipt
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.figures import record
from tests.helpers.jobs import ask
from tests.helpers.processes import StartExecutor
from tests.helpers.wait import eventually, within
from tests.test_daemon import durable_config
from tests.test_receipts import stored_receipts

pytestmark = pytest.mark.slow

WAIT = 20.0


@pytest.mark.timeout(180)
# 32 callers: receipts written a batch per loop turn; 1 caller: each job alone, its receipt signed
# and written at once (executor/receipts/issuer.py): the same guarantee by the other path.
@pytest.mark.parametrize("callers", [32, 1], ids=["burst-of-32", "one-at-a-time"])
async def test_an_executor_killed_mid_burst_loses_and_doubles_no_receipt(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, callers: int
) -> None:
    cfg = durable_config(tmp_path, base_url=double.base_url, executor_id="crash-exec")
    got: dict[str, SignedReceipt] = {}  # job id -> the receipt its reply carried
    failed = 0
    async with EmbeddedNats(jetstream=True, store_dir=str(tmp_path / "js")) as server:
        executor = await start_executor("--config", str(cfg), "--nats", server.url)
        await executor.started()
        stop = asyncio.Event()
        async with await LloomClient.connect(server.url, timeout=5.0) as client:

            async def worker() -> None:
                nonlocal failed
                while not stop.is_set():
                    try:
                        reply = await client.complete(ask())
                    except LloomError:  # the executor is gone: executor_lost, or the deadline
                        failed += 1
                        return
                    assert reply.receipt is not None
                    assert reply.job_id not in got
                    got[reply.job_id] = reply.receipt

            workers = [asyncio.create_task(worker()) for _ in range(callers)]
            await eventually(lambda: len(got) >= 300, timeout=WAIT, what="300 replies before the kill")
            executor.proc.kill()  # mid-burst: no drain, no last publish
            await executor.exit_code()
            stop.set()
            await within(asyncio.gather(*workers), "the workers, after the kill", WAIT)
        on_disk = [signed_receipt_decoder.decode(line)
                   for line in receipt_lines((tmp_path / "outbox" / "receipts.jsonl").read_bytes())]  # fmt: skip

        # The same executor again: it publishes what the killed one left.
        executor = await start_executor("--config", str(cfg), "--nats", server.url)
        await executor.started()
        nc = await nats.connect(server.url)
        js = nc.jetstream()

        async def all_stored() -> bool:
            try:
                return len(await stored_receipts(js)) >= len(on_disk)
            except nats.js.errors.NotFoundError:
                return False

        await eventually(all_stored, timeout=WAIT, what="the killed run's receipts in the stream")
        stored = await stored_receipts(js)
        await nc.close()

    by_seq = {s.receipt.seq: s for s in stored}
    duplicated = len(stored) - len(by_seq)
    stored_jobs = {s.receipt.job_id for s in stored}
    lost = [job for job in got if job not in stored_jobs]
    written_not_answered = len(on_disk) - len(got)
    record("crash_mid_burst" if callers > 1 else "crash_one_at_a_time", {"replies_with_receipts": len(got), "jobs_failed_by_the_kill": failed,
                               "receipts_on_disk": len(on_disk), "receipts_stored": len(stored),
                               "lost": len(lost), "duplicated": duplicated,
                               "written_reply_not_received": written_not_answered})  # fmt: skip
    assert lost == []  # every receipt a client got is in the stream
    assert duplicated == 0
    assert sorted(by_seq) == list(range(1, len(on_disk) + 1)) == sorted(s.receipt.seq for s in on_disk)
    assert check_chain([(s, verify_receipt(s)) for s in stored]) == []
    for job, receipt in got.items():  # what the client holds is what was stored, byte for byte as signed
        assert by_seq[receipt.receipt.seq] == receipt and receipt.receipt.job_id == job
    # A receipt on disk whose reply the kill cut off is billed, but was never answered: at most
    # the jobs in flight when the process died.
    assert 0 <= written_not_answered <= failed
