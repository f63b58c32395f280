"""Where receipts reach JetStream: from the outbox, in the background, until each is acknowledged.

The publisher keeps the `LLOOM_RECEIPTS` stream (subjects `lloom.v1.receipts.>`,
file storage) and sends every pending outbox receipt to
`lloom.v1.receipts.<executor id>` with `Nats-Msg-Id` set to the receipt's leaf
hash, so a receipt sent twice (a retry after a lost ack, a restart before the
acked mark moved) is stored once within the stream's duplicate window.

It publishes asynchronously: each receipt goes out with a reply subject on one
wildcard ack inbox (`<inbox>.<seq>`), up to `window` unacknowledged at once,
and the acks are matched by seq as they come. (nats.py's `js.publish` awaits each
ack with a request and a timer of its own: several times the CPU per receipt.)
A receipt without an ack after `ack_timeout_s` is sent again. No responders
(no JetStream) or an error ack means JetStream is away: back off and retry;
nothing is dropped. fsync and the acked mark happen every `sync_interval_s`,
not per receipt, and never on the request path: jobs only append and wake it.
"""

from __future__ import annotations

import asyncio
from collections import deque

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StorageType, StreamConfig

from executor.outbox import Outbox
from protocol import subjects as subj

log = structlog.get_logger(logger_name=__name__)

STREAM = "LLOOM_RECEIPTS"


class _PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


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
        window: int = 512,
        batch: int = 64,
        batch_delay_s: float = 0.01,
    ) -> None:
        self.batch = batch
        self.batch_delay_s = batch_delay_s
        self._batch_timer: asyncio.TimerHandle | None = None
        self._nc = nc
        self._js = nc.jetstream()
        self.outbox = outbox
        self.duplicate_window_s = duplicate_window_s
        self.sync_interval_s = sync_interval_s
        self.retry_max_s = retry_max_s
        self.ack_timeout_s = ack_timeout_s
        self.window = window
        self._queue: deque[int] = deque()  # seqs to send, oldest first
        self._in_flight: dict[int, float] = {}  # seq -> when sent
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._acks: Subscription | None = None
        self._ack_prefix = nc.new_inbox()
        self._stream_ready = False
        self._away_until = 0.0
        self._backoff = 0.1
        self.published = 0
        self.idle = asyncio.Event()  # set whenever nothing is pending

    def notify(self) -> None:
        """A new receipt is in the outbox (called by the issuer; cheap).

        Receipts go out in batches (`batch` of them, or after `batch_delay_s`), so that
        publishing does not wake the loop, and the server, once per job.
        """
        self._queue.append(self.outbox.last_seq)
        self.idle.clear()
        if len(self._queue) >= self.batch:
            self._wake.set()
        elif self._batch_timer is None:
            self._batch_timer = asyncio.get_running_loop().call_later(self.batch_delay_s, self._batch_due)

    def _batch_due(self) -> None:
        self._batch_timer = None
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._queue.extend(sorted(self.outbox.pending))  # what a previous run left
            self._acks = await self._nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
            self._wake.set()
            self._task = asyncio.create_task(self._run(), name="receipt-publisher")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Try to publish what is pending (bounded), then stop; the outbox keeps the rest."""
        if self._task is None:
            return
        if self.outbox.pending:
            self._wake.set()
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.idle.wait()
            except TimeoutError:
                log.warning("receipts left in the outbox for the next start", pending=len(self.outbox.pending))
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self._acks is not None and not self._nc.is_closed:
            await self._acks.unsubscribe()
        self.outbox.sync()

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        config = StreamConfig(
            name=STREAM,
            subjects=[f"{subj.PREFIX}.receipts.>"],
            storage=StorageType.FILE,
            duplicate_window=self.duplicate_window_s,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            pass  # exists already (perhaps with an operator's settings): use it as it is
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
                self.outbox.sync()
                self._requeue_overdue(now)
            if not self.outbox.pending:
                self.idle.set()
                continue
            if now < self._away_until:
                continue
            try:
                await self._ensure_stream()
                await self._send_queued()
            except (nats.errors.Error, OSError) as e:
                self._away(now, str(e) or type(e).__name__)

    async def _send_queued(self) -> None:
        nc = self._nc
        sent_at = asyncio.get_running_loop().time()
        while self._queue and len(self._in_flight) < self.window:
            seq = self._queue.popleft()
            entry = self.outbox.pending.get(seq)
            if entry is None or seq in self._in_flight:
                continue  # acknowledged meanwhile, or already on its way
            self._in_flight[seq] = sent_at
            await nc.publish(
                f"{subj.PREFIX}.receipts.{entry.executor_id}",
                entry.line,
                reply=f"{self._ack_prefix}.{seq}",
                headers={"Nats-Msg-Id": entry.msg_id},
            )

    async def _on_ack(self, msg: Msg) -> None:
        seq = int(msg.subject.rpartition(".")[2])
        self._in_flight.pop(seq, None)
        if msg.headers and msg.headers.get(subj.HDR_STATUS) == subj.STATUS_NO_RESPONDERS:
            self._retry_later(seq, "no JetStream stream answers (is JetStream enabled?)")
            return
        try:
            ack = _decode_ack(msg.data)
        except msgspec.DecodeError:
            self._retry_later(seq, f"unreadable ack: {msg.data[:100]!r}")
            return
        if ack.error is not None:
            self._stream_ready = False  # e.g. the stream was deleted: make it again
            self._retry_later(seq, f"JetStream refused it: {ack.error.get('description', ack.error)}")
            return
        self.outbox.acked(seq)
        self.published += 1
        self._backoff = 0.1
        if not self.outbox.pending:
            self.idle.set()

    def _retry_later(self, seq: int, why: str) -> None:
        self._queue.appendleft(seq)
        self._away(asyncio.get_running_loop().time(), why)

    def _away(self, now: float, why: str) -> None:
        if now >= self._away_until:  # one line per outage step, not per receipt
            log.warning("receipts not published yet; retrying", error=why, pending=len(self.outbox.pending),
                        retry_in_s=self._backoff)  # fmt: skip
            self._away_until = now + self._backoff
            self._backoff = min(self._backoff * 2, self.retry_max_s)
        self._wake.set()

    def _requeue_overdue(self, now: float) -> None:
        overdue = [s for s, t in self._in_flight.items() if now - t > self.ack_timeout_s]
        for seq in sorted(overdue, reverse=True):
            del self._in_flight[seq]
            self._queue.appendleft(seq)
