"""`GET /v1/generation?id=JOB`: the signed receipt of a finished request, with its cost.

Receipts are stored in the JetStream stream LLOOM_RECEIPTS under `lloom.v1.receipts.<executor
id>`, batched (one message holds consecutive receipts of one executor), so the job id is in no
subject and no header: there is no direct get by job. The lookup is therefore, cheapest first:

1. the receipts of jobs this gateway answered lately (a bounded memory: one dict entry per
   job, filled from the replies it relayed, so a client asking its own gateway costs nothing);
2. the stream, read backwards from its end in growing windows (256 messages, then 4x each
   time) with an ordered consumer, matching the job id as bytes before decoding anything, up
   to `max_scan` messages. A generation asked for soon after it ran is in the first window:
   one consumer creation and at most 256 messages of a few receipts each (~1-3 ms); the cost
   grows with the number of receipt messages stored since the job, never with the stream's size
   beyond `max_scan`.

Either way the receipt is checked (Merkle path and signature) before it is returned, and one
read from the stream counts only if it was stored under its own executor's subject
(`lloom.v1.receipts.<executor id>`, where only that executor may publish under the shipped
permissions), so no one can shadow a job's receipt with one naming another executor.

Anyone who reaches the gateway may ask, and an id nobody answered costs a whole scan; so the
handler refuses ids that are not job ids (1-64 of A-Z a-z 0-9 _ -) before any I/O, and one
scan runs at a time per gateway (`scans_waiting` are queued behind it): a flood of made-up ids
costs at most one reader of the stream, never one per request.
"""

from __future__ import annotations

import asyncio
import datetime
from collections import OrderedDict

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from executor.gateway.openai_types import Generation
from protocol import subjects as subj
from protocol.receipts import ReceiptInvalid, SignedReceipt, receipt_lines, signed_receipt_decoder, verify_receipt

FIRST_WINDOW = 256
READ_TIMEOUT_S = 2.0
_encode = msgspec.json.Encoder(decimal_format="string").encode


class Generations:
    def __init__(self, nc: NATS, *, remember: int = 10_000, max_scan: int = 100_000) -> None:
        self._nc = nc
        self._recent: OrderedDict[str, SignedReceipt] = OrderedDict()
        self._remember = remember
        self.max_scan = max_scan
        self.scanned = 0  # stream messages read by lookups, for status and tests
        self.scans = 0  # stream lookups made (the memory did not have the id)
        self.most_concurrent_scans = 0
        self._scanning = 0
        self._one_scan = asyncio.Lock()

    def remember(self, receipt: SignedReceipt | None) -> None:
        if receipt is None or not self._remember:
            return
        self._recent[receipt.receipt.job_id] = receipt
        if len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    async def find(self, job_id: str) -> Generation | None:
        signed = self._recent.get(job_id)
        raw = _encode(signed) if signed is not None else await self._scan_one_at_a_time(job_id)
        if raw is None:
            return None
        signed = signed_receipt_decoder.decode(raw)
        try:
            verify_receipt(signed)
            verified = True
        except ReceiptInvalid:
            verified = False
        r = signed.receipt
        finished = datetime.datetime.fromtimestamp(r.finished_at_ms / 1000, tz=datetime.UTC)
        return Generation(
            id=job_id, model=r.model, provider_name=r.executor_id, total_cost=str(r.cost),
            tokens_prompt=r.usage.prompt_tokens, tokens_completion=r.usage.completion_tokens,
            created_at=finished.isoformat().replace("+00:00", "Z"), finish_reason=r.finish_reason,
            generation_time=r.finished_at_ms - r.started_at_ms, latency=r.ttft_ms, outcome=r.outcome,
            verified=verified, receipt=msgspec.Raw(raw),
        )  # fmt: skip

    async def _scan_one_at_a_time(self, job_id: str) -> bytes | None:
        async with self._one_scan:
            self.scans += 1
            self._scanning += 1
            self.most_concurrent_scans = max(self.most_concurrent_scans, self._scanning)
            try:
                return await self._scan(job_id)
            finally:
                self._scanning -= 1

    async def _scan(self, job_id: str) -> bytes | None:
        js = self._nc.jetstream()
        try:
            info = await js.stream_info(subj.RECEIPTS_STREAM)
        except nats.js.errors.NotFoundError:
            return None
        first, end = info.state.first_seq, info.state.last_seq
        if info.state.messages == 0:
            return None
        needle = b'"job_id":"' + job_id.encode() + b'"'
        window, scanned, found = FIRST_WINDOW, 0, None
        while end >= first and scanned < self.max_scan:
            start = max(first, end - window + 1, end - (self.max_scan - scanned) + 1)
            found = await self._read(js, start, end, needle, job_id)
            scanned += end - start + 1
            if found is not None:
                break
            end, window = start - 1, window * 4
        self.scanned += scanned
        return found

    async def _read(self, js, start: int, end: int, needle: bytes, job_id: str) -> bytes | None:  # type: ignore[no-untyped-def]
        # `stream=` spares a stream lookup by subject, which the gateway role may not make.
        sub = await js.subscribe(subj.RECEIPTS_ALL, stream=subj.RECEIPTS_STREAM, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                 config=ConsumerConfig(opt_start_seq=start))  # fmt: skip
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
                except nats.errors.TimeoutError:
                    return None
                if needle in msg.data:
                    for line in receipt_lines(msg.data):
                        if needle in line:
                            try:
                                r = signed_receipt_decoder.decode(line).receipt
                            except msgspec.MsgspecError:
                                continue
                            # Only from its executor's own subject, which the shipped permissions let
                            # no one else publish to: a receipt naming executor A stored by B is B's forgery.
                            if r.job_id == job_id and msg.subject == subj.receipts_subject(r.executor_id):
                                return line
                if msg.metadata.sequence.stream >= end or msg.metadata.num_pending == 0:
                    return None
        finally:
            await sub.unsubscribe()
