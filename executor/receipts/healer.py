"""Receipts heal themselves: what an outbox counts as acknowledged, the stream must hold; if not, it is sent again.

An acknowledged receipt can still go missing from `LLOOM_RECEIPTS`: a stream
purged, deleted or restored from an old backup, a message deleted, a store
overwritten by a second server. The outbox still has it, so the healer compares.
For an outbox it reads which receipt seqs the stream holds on that executor's
subject (an ordered, headers-only consumer: each message's `Lloom-Receipt-Seqs`
header, the body only for a message without it) and re-publishes each
acknowledged receipt that is missing, in batches marked `Lloom-Healed-By: <this
executor>`, which `lloom receipts verify` reports. A re-publish that races the
original is harmless: `verify` and `report` count identical receipts once.

It runs at start and every `interval_s`. Between full scans one `stream_info`
call is enough: the number of messages on the executor's subject only falls
when something removed some, so a full scan runs only when it is below what was
there at the last scan plus what the publisher has stored since.

Outboxes left on this machine by earlier identities (an executor with no
configured id has a new one each start) are healed at start too: each sibling
directory is opened (which takes its lock, so one process does it, and never to
an outbox a running executor holds), its pending receipts published, its
acknowledged ones reconciled, and it is closed again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from executor.receipts.outbox import Outbox, OutboxInUse
from executor.receipts.publisher import STREAM, ReceiptPublisher, ensure_stream
from protocol import subjects as subj
from protocol.receipts import receipt_lines, signed_receipt_decoder

log = structlog.get_logger(logger_name=__name__)
BATCH = 64
SCAN_IDLE_S = 5.0  # a scan's next message comes at once; this only bounds a server gone quiet


class _Seen(msgspec.Struct):
    count: int  # messages on the subject after the last full scan (and heal)
    stored: int  # the publisher's `stored` then


class ReceiptHealer:
    def __init__(
        self,
        nc: NATS,
        outbox: Outbox,
        publisher: ReceiptPublisher,
        *,
        executor_id: str,
        siblings: Path | None,
        interval_s: float,
        duplicate_window_s: float = 7200.0,
        flush_timeout_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.outbox = outbox
        self.publisher = publisher
        self.executor_id = executor_id
        self.siblings = siblings  # the directory of this machine's outboxes (None: only our own)
        self.interval_s = interval_s
        self.duplicate_window_s = duplicate_window_s
        self.flush_timeout_s = flush_timeout_s
        self.healed = 0  # receipts re-published
        self.rounds = 0  # reconciliations of our own outbox done
        self.scans = 0  # of them, those that had to read the stream (the rest cost one stream_info)
        self._changed = asyncio.Condition()  # notified after each round
        self._seen: _Seen | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="receipt-healer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        done_once = False
        while True:
            try:
                await ensure_stream(self._js, self.duplicate_window_s)
                if not done_once and self.siblings is not None:
                    await self._heal_siblings()
                await self._reconcile_own()
                done_once = True
                self.rounds += 1
            except (nats.errors.Error, OSError) as e:  # the bus is away: try again soon
                log.warning("could not reconcile receipts with the stream; will retry", error=str(e) or type(e).__name__)
            except Exception:  # a bug must not end healing for the node's life, nor pass silently
                log.exception("receipt reconciliation failed; will retry")
            async with self._changed:
                self._changed.notify_all()
            if done_once and self.interval_s <= 0:
                return
            await asyncio.sleep(self.interval_s if done_once else min(self.interval_s or 5.0, 5.0))

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, looking after each round (for status and tests)."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _reconcile_own(self) -> None:
        count = await self._count(self.executor_id)
        seen = self._seen
        if seen is not None and count >= seen.count + (self.publisher.stored - seen.stored):
            return  # nothing was removed since the last look
        stored = self.publisher.stored
        await self.reconcile(self.outbox, self.executor_id)
        self._seen = _Seen(await self._count(self.executor_id), stored)

    async def _heal_siblings(self) -> None:
        assert self.siblings is not None
        for directory in sorted(p for p in self.siblings.iterdir() if p.is_dir()):
            if directory.resolve() == self.outbox.directory.resolve() or not subj.is_id(directory.name):
                continue  # ours, or not an outbox of the default layout (receipts/<executor id>)
            try:
                outbox = Outbox(directory)
            except OutboxInUse:
                continue  # a running executor's own: it heals it itself
            except OSError as e:
                log.warning("cannot open an earlier identity's outbox", outbox=str(directory), error=str(e))
                continue
            try:
                if outbox.waiting:
                    publisher = ReceiptPublisher(self._nc, outbox, duplicate_window_s=self.duplicate_window_s)
                    await publisher.start()
                    await publisher.stop(flush_timeout=self.flush_timeout_s)
                    log.info("published an earlier identity's receipts", executor=directory.name,
                             published=publisher.published, left=outbox.waiting)  # fmt: skip
                await self.reconcile(outbox, directory.name)
            finally:
                outbox.close()

    async def _count(self, executor_id: str) -> int:
        subject = subj.receipts_subject(executor_id)
        info = await self._js.stream_info(STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    async def held(self, executor_id: str) -> set[int]:
        """The receipt seqs the stream holds on this executor's subject."""
        subject = subj.receipts_subject(executor_id)
        present: set[int] = set()
        if not await self._count(executor_id):
            return present
        self.scans += 1
        sub = await self._js.subscribe(subject, stream=STREAM, ordered_consumer=True, headers_only=True)
        try:
            while True:
                msg = await sub.next_msg(timeout=SCAN_IDLE_S)
                present |= await self._seqs_of(msg)
                if msg.metadata.num_pending == 0:
                    return present
        finally:
            await sub.unsubscribe()

    async def _seqs_of(self, msg: Msg) -> set[int]:
        headers = msg.headers or {}
        first, _, last = headers.get(subj.HDR_RECEIPT_SEQS, "").partition("-")
        try:
            a, b, n = int(first), int(last), int(headers.get(subj.HDR_RECEIPTS, ""))
            if b - a + 1 == n:
                return set(range(a, b + 1))
        except ValueError:
            pass
        # An older message (no seq header): read its body.
        body = await self._js.get_msg(STREAM, msg.metadata.sequence.stream)
        out = set()
        for line in receipt_lines(body.data or b""):
            try:
                out.add(signed_receipt_decoder.decode(line).receipt.seq)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not ours to judge: `lloom receipts verify` reports it
        return out

    async def reconcile(self, outbox: Outbox, executor_id: str) -> int:
        """Re-publish `outbox`'s acknowledged receipts that the stream lacks; how many were."""
        acked = outbox.acked_seq
        if acked <= 0:
            return 0
        present = await self.held(executor_id)
        missing = [s for s in range(1, acked + 1) if s not in present]
        if not missing:
            return 0
        lines = outbox.lines(set(missing))
        lost = len(missing) - len(lines)
        if lost:  # rotated away twice: nothing on this machine has them any more
            log.warning("receipts missing from the stream and no longer in the outbox", executor=executor_id,
                        missing=lost)  # fmt: skip
        stream_seq = (await self._js.stream_info(STREAM)).state.last_seq
        subject = subj.receipts_subject(executor_id)
        seqs = sorted(lines)
        runs: list[list[int]] = []
        for s in seqs:  # batches of consecutive receipts, as the publisher forms them
            if runs and s == runs[-1][-1] + 1 and len(runs[-1]) < BATCH:
                runs[-1].append(s)
            else:
                runs.append([s])
        for run in runs:
            entries = [lines[s] for s in run]
            # Not the original's id: that one may still be in the duplicate window, which would drop this.
            msg_id = hashlib.sha256(f"healed:{stream_seq}:".encode() + "".join(e.msg_id for e in entries).encode())
            await self._js.publish(
                subject,
                b"\n".join(e.line for e in entries),
                stream=STREAM,
                headers={subj.HDR_MSG_ID: msg_id.hexdigest(), subj.HDR_RECEIPTS: str(len(entries)),
                         subj.HDR_RECEIPT_SEQS: f"{run[0]}-{run[-1]}", subj.HDR_HEALED_BY: self.executor_id},
            )  # fmt: skip
        self.healed += len(seqs)
        log.warning("receipts were missing from the stream; re-published them", executor=executor_id,
                    healed=len(seqs), first=seqs[0], last=seqs[-1])  # fmt: skip
        return len(seqs)
