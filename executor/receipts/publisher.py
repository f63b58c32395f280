"""Where receipts reach JetStream: from the outbox, in the background, until each is acknowledged.

The publisher keeps the `LLOOM_RECEIPTS` stream (subjects `lloom.v1.receipts.>`,
file storage) and sends the pending outbox receipts to
`lloom.v1.receipts.<executor id>` in batches: one message holds up to `batch` (128)
consecutive receipts, one per line, so the server stores (and fsyncs) once per
batch rather than once per job, which was most of what receipts cost. A batch's
`Nats-Msg-Id` is a hash of its receipts' leaf hashes and its seq range is
recorded in the outbox before it leaves, so a batch sent twice (a retry after a
lost ack, a restart before the acked mark moved) goes out identical and is
stored once within the stream's duplicate window.

It publishes asynchronously: each batch goes out with a reply subject on one
wildcard ack inbox (`<inbox>.<first seq>`), up to `window` batches
unacknowledged at once, and acks are matched as they come. (nats.py's
`js.publish` awaits each ack with a request and a timer of its own.) A batch
without an ack after `ack_timeout_s` is sent again. No responders (no
JetStream) or an error ack means JetStream is away: back off and retry; nothing
is dropped. fsync, the acked mark and the outbox's probe (when it could not
write) happen every `sync_interval_s`, never on the request path: jobs only
write and wake it (the fsync and the mark's write run in a worker thread, so a
slow disk does not stall the event loop's replies meanwhile). While JetStream is
away, receipts wait in the outbox file: the publisher reads them from it
(`Outbox.entry`) in seq order as it sends, so
memory holds the outbox's bounded window, not every receipt waiting.

The stream is made with `deny_delete` and `deny_purge`, so no one can remove
receipts from it (deleting the whole stream is for the bus's permissions to
refuse, docs/security.md). If it disappears anyway (an admin deleted it), the
next publish finds no responders, and the publisher makes the stream again
before retrying: the outbox still holds every receipt that was not acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext

from executor.receipts.outbox import NOT_LOADED, Outbox
from protocol import subjects as subj
from protocol.jetstream import ensure_stream as ensure_js_stream
from protocol.backoff import Backoff, Retry

log = structlog.get_logger(logger_name=__name__)

STREAM = subj.RECEIPTS_STREAM
# A batch stops growing here, well under NATS's default 1 MiB max_payload.
MAX_BATCH_BYTES = 256 * 1024


async def ensure_stream(js: JetStreamContext, duplicate_window_s: float) -> None:
    """Create the receipts stream unless it exists (perhaps with an operator's settings, such as R3:
    used as it is, with a warning when it lets receipts be deleted or purged)."""
    config = StreamConfig(
        name=STREAM, subjects=[subj.RECEIPTS_ALL], storage=StorageType.FILE, duplicate_window=duplicate_window_s,
        # A ledger: receipts cannot be deleted or purged, by anyone.
        deny_delete=True, deny_purge=True,
    )  # fmt: skip
    await ensure_js_stream(js, config)
    info = await js.stream_info(STREAM)
    if not (info.config.deny_delete and info.config.deny_purge):
        log.warning("the receipts stream allows deleting or purging receipts", stream=STREAM,
                    hint="re-create it with deny_delete and deny_purge (docs/security.md)")  # fmt: skip


class _PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


class _Batch:
    __slots__ = ("seqs", "sent_at")

    def __init__(self, seqs: range) -> None:
        self.seqs = seqs  # consecutive
        self.sent_at = 0.0


class ReceiptPublisher:
    def __init__(
        self,
        nc: NATS,
        outbox: Outbox,
        *,
        duplicate_window_s: float = 7200.0,
        sync_interval_s: float = 0.2,
        retry_max_s: float = 5.0,
        ack_timeout_s: float = 5.0,
        window: int = 64,
        batch: int = 128,
        batch_delay_s: float = 0.05,
    ) -> None:
        self.batch = batch
        self.batch_delay_s = batch_delay_s
        self._batch_timer: asyncio.TimerHandle | None = None
        # Whether a batch short of `batch` receipts may leave now (its delay is up, a sync tick, a
        # start or stop); else only full batches do, however often the sender is woken.
        self._due = False
        self._nc = nc
        self._js = nc.jetstream()
        self.outbox = outbox
        self.duplicate_window_s = duplicate_window_s
        self.sync_interval_s = sync_interval_s
        self.retry_max_s = retry_max_s
        self.ack_timeout_s = ack_timeout_s
        self.window = window
        self._cursor = outbox.last_seq + 1  # the first seq not in a batch yet; the rest follow it
        self._ready: deque[_Batch] = deque()  # formed batches to (re)send, oldest first
        self._in_flight: dict[int, _Batch] = {}  # first seq -> batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._syncing: asyncio.Future[None] | None = None  # the outbox's sync under way, or the last one
        self._acks: Subscription | None = None
        self._ack_prefix = nc.new_inbox()
        self._stream_ready = False
        self._away_until = 0.0
        self._retry = Retry(Backoff(initial_s=0.1, max_s=retry_max_s))
        self.published = 0  # receipts acknowledged
        self.messages = 0  # batches acknowledged
        self.stored = 0  # batches acknowledged as stored anew (not as duplicates)
        self.idle = asyncio.Event()  # set whenever nothing is pending

    def notify(self, seq: int) -> None:
        """Receipt `seq` is in the outbox (called by the issuer; cheap).

        Receipts leave as a batch once `batch` of them wait or `batch_delay_s` after the
        first, so that publishing wakes neither the loop nor the server once per job.
        """
        self.idle.clear()
        if seq - self._cursor + 1 >= self.batch:
            self._wake.set()
        elif self._batch_timer is None:
            self._batch_timer = asyncio.get_running_loop().call_later(self.batch_delay_s, self._batch_due)

    def _batch_due(self) -> None:
        self._batch_timer = None
        self._due = True
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            # What a previous run left: its batches as they were, what lies between them as new ones.
            pos = self.outbox.acked_seq + 1
            for first, last in self.outbox.recorded_batches():
                if first < pos:
                    continue
                while pos < first:  # never batched (the `sent` line torn): form them now
                    gap = range(pos, min(first, pos + self.batch))
                    self.outbox.record_batch(gap[0], gap[-1])
                    self._ready.append(_Batch(gap))
                    pos = gap[-1] + 1
                self._ready.append(_Batch(range(first, last + 1)))
                pos = last + 1
            self._cursor = pos
            self._due = bool(self.outbox.waiting)  # what a previous run left goes at once
            self._acks = await self._nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
            self._wake.set()
            self._task = asyncio.create_task(self._run(), name="receipt-publisher")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Try to publish what is pending (bounded), then stop; the outbox keeps the rest."""
        if self._task is None:
            return
        if self.outbox.waiting:
            self._due = True
            self._wake.set()
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.idle.wait()
            except TimeoutError:
                log.warning("receipts left in the outbox for the next start", pending=self.outbox.waiting)
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self._syncing is not None:  # a sync's thread outlives the task's cancellation: let it end first
            await asyncio.gather(self._syncing, return_exceptions=True)
        if self._acks is not None and not self._nc.is_closed:
            await self._acks.unsubscribe()
        self.outbox.sync()

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        await ensure_stream(self._js, self.duplicate_window_s)
        self._stream_ready = True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + self.sync_interval_s
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_sync - loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            now = loop.time()
            if now >= next_sync:
                next_sync = now + self.sync_interval_s
                self._due = True  # what waits leaves at least every sync interval
                # Shielded: a cancelled publisher still finishes (and accounts for) a sync under way.
                self._syncing = asyncio.ensure_future(self.outbox.sync_async())
                await asyncio.shield(self._syncing)
                self._requeue_overdue(now)
            if not self.outbox.waiting:
                self.idle.set()
                continue
            if now < self._away_until:
                continue
            try:
                await self._ensure_stream()
                await self._send(now)
            except (nats.errors.Error, OSError) as e:
                self._away(now, str(e) or type(e).__name__)

    def _next_batch(self, partial: bool) -> _Batch | None:
        """The oldest formed batch, or a new one of consecutive fresh receipts (recorded first)."""
        if self._ready:
            return self._ready.popleft()
        outbox = self.outbox
        seq = self._cursor
        size = count = 0
        while seq <= outbox.last_seq and count < self.batch and size < MAX_BATCH_BYTES:
            entry = outbox.entry(seq, force=not self._in_flight and not count)
            if entry is NOT_LOADED:
                break  # the memory window is full: more after acknowledgements
            if entry is None and count:
                break  # a batch is a seq range with no holes: what `sent` records
            if entry is None:
                self._cursor = seq = seq + 1  # acknowledged meanwhile, or never written
                continue
            count += 1
            size += len(entry.line)
            seq += 1
        if not count or (not partial and count < self.batch and seq > outbox.last_seq):
            return None  # nothing, or a short batch before its time: `notify`'s timer sends it
        batch = range(self._cursor, self._cursor + count)
        outbox.record_batch(batch[0], batch[-1])  # may raise (a full disk): nothing is lost, it is formed again
        self._cursor = batch[-1] + 1
        return _Batch(batch)

    async def _send(self, now: float) -> None:
        outbox = self.outbox
        partial, self._due = self._due, False
        while True:
            if len(self._in_flight) >= self.window:
                self._due = self._due or partial  # the rest goes as acknowledgements make room
                return
            batch = self._next_batch(partial)
            if batch is None:
                return
            entries = []
            for seq in batch.seqs:
                # With nothing in flight no acknowledgement will make room: read it back past the window.
                entry = outbox.entry(seq, force=not self._in_flight)
                if entry is NOT_LOADED:  # a previous run's batch beyond the memory window: after acks
                    self._ready.appendleft(batch)
                    self._due = self._due or partial
                    return
                if entry is not None:
                    entries.append((seq, entry))
            if not entries:
                continue  # acknowledged meanwhile
            batch.sent_at = now
            self._in_flight[batch.seqs[0]] = batch
            msg_id = hashlib.sha256("".join(e.msg_id for _, e in entries).encode()).hexdigest()
            await self._nc.publish(
                subj.receipts_subject(entries[0][1].executor_id),
                b"\n".join(e.line for _, e in entries),
                reply=f"{self._ack_prefix}.{batch.seqs[0]}",
                headers={subj.HDR_MSG_ID: msg_id, subj.HDR_RECEIPTS: str(len(entries)),
                         subj.HDR_RECEIPT_SEQS: f"{entries[0][0]}-{entries[-1][0]}"},  # fmt: skip
            )

    async def _on_ack(self, msg: Msg) -> None:
        window_was_full = len(self._in_flight) >= self.window
        batch = self._in_flight.pop(int(msg.subject.rpartition(".")[2]), None)
        if batch is None:
            return  # a late ack of a batch already sent again
        if msg.headers and msg.headers.get(subj.HDR_STATUS) == subj.STATUS_NO_RESPONDERS:
            # No stream takes the subject any more (deleted?): look for it, make it again if need be.
            self._stream_ready = False
            self._retry_later(batch, "no JetStream stream answers (is JetStream enabled? was the stream deleted?)")
            return
        try:
            ack = _decode_ack(msg.data)
        except msgspec.DecodeError:
            self._retry_later(batch, f"unreadable ack: {msg.data[:100]!r}")
            return
        if ack.error is not None:
            self._stream_ready = False  # e.g. the stream was deleted: make it again
            self._retry_later(batch, f"JetStream refused it: {ack.error.get('description', ack.error)}")
            return
        for seq in batch.seqs:
            self.outbox.acked(seq)
        self.published += len(batch.seqs)
        self.messages += 1
        self.stored += not ack.duplicate
        self._retry.reset()
        if not self.outbox.waiting:
            self.idle.set()
        elif self._ready or (window_was_full and self._cursor <= self.outbox.last_seq):
            self._wake.set()  # a batch to send again, or the window had filled: more can go now
        # Otherwise the receipts issued since wait for their batch (`notify`): an ack that woke
        # the sender would send them a few at a time, one stored message (and fsync) each.

    def _retry_later(self, batch: _Batch, why: str) -> None:
        self._ready.appendleft(batch)
        self._away(asyncio.get_running_loop().time(), why)

    def _away(self, now: float, why: str) -> None:
        if now >= self._away_until:  # one line per outage step, not per receipt
            delay = self._retry.next_delay()
            oldest = self.outbox.oldest_waiting_ms()
            log.warning("receipts not published yet; retrying", error=why, pending=self.outbox.waiting,
                        in_memory=len(self.outbox.window), retry_in_s=round(delay, 2),
                        oldest_waiting_s=None if oldest is None else round(time.time() - oldest / 1000, 1))  # fmt: skip
            self._away_until = now + delay
        self._wake.set()

    def _requeue_overdue(self, now: float) -> None:
        overdue = [b for b in self._in_flight.values() if now - b.sent_at > self.ack_timeout_s]
        for batch in sorted(overdue, key=lambda b: b.seqs[0], reverse=True):
            del self._in_flight[batch.seqs[0]]
            self._ready.appendleft(batch)
