"""Where receipts reach JetStream: from the outbox, in the background, until each is acknowledged.

The publisher keeps the `LLOOM_RECEIPTS` stream (subjects `lloom.v1.receipts.>`,
file storage) and sends every pending outbox receipt to
`lloom.v1.receipts.<executor id>` with `Nats-Msg-Id` set to the receipt's leaf
hash, so a receipt sent twice (a retry after a lost ack, a restart before the
acked mark moved) is stored once within the stream's duplicate window. It works
off the request path: jobs only append to the outbox and wake it. When NATS or
JetStream is unavailable it backs off and tries again; nothing is dropped.
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig

from executor.outbox import Outbox
from protocol import subjects as subj
from protocol.receipts import leaf_hash

log = structlog.get_logger(logger_name=__name__)
_encode = msgspec.json.Encoder().encode

STREAM = "LLOOM_RECEIPTS"
IN_FLIGHT = 64  # publishes awaiting their ack at once


class ReceiptPublisher:
    def __init__(
        self,
        nc: NATS,
        outbox: Outbox,
        *,
        duplicate_window_s: float = 7200.0,
        sync_interval_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.outbox = outbox
        self.duplicate_window_s = duplicate_window_s
        self.sync_interval_s = sync_interval_s
        self.retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stream_ready = False
        self.published = 0
        self.idle = asyncio.Event()  # set whenever nothing is pending

    def notify(self) -> None:
        self.idle.clear()
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._wake.set()  # flush what a previous run left
            self._task = asyncio.create_task(self._run(), name="receipt-publisher")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Try to publish what is pending (bounded), then stop; the outbox keeps the rest."""
        if self._task is None:
            return
        if self.outbox.pending:
            self.notify()
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.idle.wait()
            except TimeoutError:
                log.warning("receipts left in the outbox for the next start", pending=len(self.outbox.pending))
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
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
        backoff = 0.1
        while True:
            try:
                async with asyncio.timeout(self.sync_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            self.outbox.sync()
            if not self.outbox.pending:
                self.idle.set()
                continue
            try:
                await self._ensure_stream()
                await self._publish_pending()
                backoff = 0.1
            except (nats.errors.Error, OSError) as e:
                log.warning("receipts not published yet; retrying", error=str(e) or type(e).__name__,
                            pending=len(self.outbox.pending), retry_in_s=backoff)  # fmt: skip
                self._stream_ready = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                self._wake.set()
            if not self.outbox.pending:
                self.idle.set()

    async def _publish_pending(self) -> None:
        seqs = sorted(self.outbox.pending)
        for i in range(0, len(seqs), IN_FLIGHT):
            batch = [self.outbox.pending[s] for s in seqs[i : i + IN_FLIGHT] if s in self.outbox.pending]
            acks = await asyncio.gather(*(self._publish(signed) for signed in batch), return_exceptions=True)
            for signed, ack in zip(batch, acks, strict=True):
                if isinstance(ack, BaseException):
                    raise ack if isinstance(ack, (nats.errors.Error, OSError)) else nats.errors.Error(str(ack))
                self.outbox.mark_acked(signed.receipt.seq)
                self.published += 1

    async def _publish(self, signed) -> None:  # type: ignore[no-untyped-def]
        r = signed.receipt
        await self._js.publish(
            f"{subj.PREFIX}.receipts.{r.executor_id}",
            _encode(signed),
            timeout=5,
            headers={"Nats-Msg-Id": leaf_hash(r).hex()},
        )
