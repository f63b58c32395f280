"""A client's jobs in flight: one reply inbox, the calls waiting on it, and how a job is sent.

Every reply arrives on one wildcard subscription (`<inbox>.*`) and is routed to the
waiting call by the subject's last token, the job id: no subscription per request. The
same dispatcher answers executors' liveness pings (alive while a call waits, gone after),
so a job whose caller has left is stopped at the executor, and hears their keepalives: its
`DeliveryWatch` (protocol/resume.py) fails a call whose executor went silent and asks
executors to re-send replies after a reconnect. `LloomClient` and `ChatStream`
both send jobs through this object; neither knows the other's internals.

Each job sent carries a fresh secret (`Lloom-Cancel-Token`, 128 random bits) kept here
while the call waits; a cancel publishes it as its payload, and the executor accepts a
cancel only with the job's token, so nobody but the caller can cancel its jobs.
"""

from __future__ import annotations

import asyncio
import os
import random

import nats.aio.subscription
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from protocol import subjects as subj
from protocol import tracecontext
from protocol.backoff import Backoff
from protocol.errors import (
    Cancelled,
    DeadlineExceeded,
    ExecutorBusy,
    ExecutorLost,
    LloomError,
    NoExecutors,
    PayloadTooLarge,
    ReceiptsUnavailable,
)
from protocol.replies import Target, Waiter, fail
from protocol.resume import DEFAULT_SILENCE_S, DeliveryWatch

# A busy executor never ran the job: wait a little (jittered) and let the queue group pick again.
BUSY_BACKOFF = Backoff(initial_s=0.02, max_s=0.25, jitter=0.75)
# A busy reply with the executor's estimated wait is honoured, stretched by up to this
# fraction so callers told the same time do not come back together.
HINT_JITTER = 0.2
# Retries after busy replies that carry a wait estimate: bounded by the deadline, and this.
MAX_HINTED_RETRIES = 20
# Put in a unary call's inbox by its deadline timer (Pending.wait).
_EXPIRED = object()
# A stream's first chunk names its executor in a header; a longer value is not an id (and not kept).
MAX_EXECUTOR_ID = 256


class _Tokens:
    """128-bit random hex strings (job ids, cancel tokens) cut from one `os.urandom` read per 256:
    one system call per job was measurable."""

    __slots__ = ("_pool", "_at")
    SIZE = 16

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool = os.urandom(self.SIZE * 256)
            self._at = 0
        at = self._at
        self._at = at + self.SIZE
        return self._pool[at : at + self.SIZE].hex()



def payload_too_large(size: int, limit: int) -> PayloadTooLarge:
    """The error for a request of `size` bytes (headers included) on a server taking `limit`."""
    return PayloadTooLarge(
        f"request is {size} bytes with headers; the NATS server accepts at most {limit}:"
        " send images as http(s) URLs (the backend fetches them) or smaller, or shorten the prompt"
    )

class Pending:
    def __init__(self, nc: NATS, *, client_id: str | None = None, silence_s: float = DEFAULT_SILENCE_S) -> None:
        self._nc = nc
        self.client_id = client_id  # recorded in executors' receipts, for usage per client
        self._prefix = nc.new_inbox()
        self._prefix_len = len(self._prefix) + 1
        self._waiting: dict[str, Waiter] = {}
        self._cancel_tokens: dict[str, str] = {}  # job id -> its cancel secret, while the call waits
        self._served_by: dict[str, str] = {}  # job id -> the executor its first stream chunk names
        self._tokens = _Tokens()
        self._sub: nats.aio.subscription.Subscription | None = None
        self.watch = DeliveryWatch(nc, self._waiting, silence_s=silence_s)

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._dispatch)
            self.watch.start()

    async def stop(self) -> None:
        """Stop listening; every call still waiting fails with `Cancelled`."""
        await self.watch.stop()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            if not self._nc.is_closed:
                await sub.unsubscribe()
        for waiter in self._waiting.values():
            fail(waiter, Cancelled("client closed"))
        self._waiting.clear()

    @property
    def inbox(self) -> str:
        """The subject prefix every reply to this client arrives under."""
        return self._prefix

    def new_job_id(self) -> str:
        # 128 random bits, not a NUID: NUIDs of one client share a prefix and step by a small
        # random increment, so one job id would let its holder guess its neighbours, whose
        # receipts (/v1/generation) and queued results are read by job id. Hex: a subject
        # token, a KV key, and never an id starting with "-" that a command line takes for an option.
        return self._tokens.next()

    def register(self, job_id: str, waiter: Waiter) -> None:
        self._waiting[job_id] = waiter

    def unregister(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)
        self._cancel_tokens.pop(job_id, None)
        self.watch.forget(job_id)
        if self._served_by:
            self._served_by.pop(job_id, None)

    def served_by(self, job_id: str) -> str | None:
        """The executor a waiting stream's first chunk named (a claim its end's receipt proves or not)."""
        return self._served_by.get(job_id)

    def cancel_token(self, job_id: str) -> str:
        """The secret that lets this client (only) cancel `job_id`; made on first use."""
        token = self._cancel_tokens.get(job_id)
        if token is None:
            token = self._cancel_tokens[job_id] = self._tokens.next()
        return token

    def forget(self, job_id: str) -> None:
        self._cancel_tokens.pop(job_id, None)
        self.watch.last.pop(job_id, None)

    async def send(
        self, target: Target, payload: bytes, job_id: str, deadline: float, *, subject: str | None = None,
        sealed_by: str | None = None,
    ) -> None:
        """Publish a job to its model's queue group (or one executor), replies to this inbox.

        `sealed_by`: for a sealed `payload`, the job's ephemeral public curve key (protocol/sealing.py)."""
        model, executor = target
        remaining_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
        if remaining_ms <= 0:
            raise DeadlineExceeded("deadline passed before the job could be sent", job_id=job_id)
        headers = {subj.HDR_JOB_ID: job_id, subj.HDR_TIMEOUT_MS: str(remaining_ms), subj.HDR_LIVENESS: "1",
                   subj.HDR_CANCEL_TOKEN: self.cancel_token(job_id), subj.HDR_KEEPALIVE: "1"}  # fmt: skip
        if self.client_id:
            headers[subj.HDR_CLIENT] = self.client_id
        if sealed_by is not None:
            headers[subj.HDR_SEALED] = sealed_by
        tracecontext.inject(headers)
        size = len(payload) + subj.headers_size(headers)
        if size > self._nc.max_payload:
            # The server would close the whole connection for this; refuse it here instead.
            raise payload_too_large(size, self._nc.max_payload)
        if subject is None:
            subject = subj.direct_subject(executor) if executor else subj.complete_subject(model)
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{job_id}", headers=headers)
        self.watch.sent(job_id)  # a request lost on the way is noticed like a dead executor

    async def cancel(self, job_id: str) -> None:
        """Tell whichever executor runs `job_id` to stop it (best effort, at most once).

        Only a job this client sent (and still knows the token of) can be cancelled."""
        token = self._cancel_tokens.get(job_id)
        if token is not None and not self._nc.is_closed:
            await self._nc.publish(subj.cancel_subject(job_id), token.encode())

    async def wait(self, inbox: asyncio.Queue[bytes | LloomError], deadline: float, job_id: str,
                   target: Target) -> bytes:  # fmt: skip
        """The next message for one job; at the deadline, or when the caller is cancelled, the job is cancelled.

        Raises the error the dispatcher put there (no responders, client closed)."""
        if inbox.qsize():  # already here: no timer to arm
            item = inbox.get_nowait()
        else:
            # Not `asyncio.timeout_at` (an object and a cancellation per reply on the gateway's path):
            # at the deadline a timer puts a marker in the inbox. If it lands just after the reply,
            # the reply is taken first; the marker then ends any later wait of this job (past its deadline).
            timer = asyncio.get_running_loop().call_at(deadline, inbox.put_nowait, _EXPIRED)  # type: ignore[arg-type]
            try:
                item = await inbox.get()
            except asyncio.CancelledError:
                await asyncio.shield(self.cancel(job_id))
                raise
            finally:
                timer.cancel()
        if item is _EXPIRED:
            await self.cancel(job_id)
            where = f" on executor {target[1]}" if target[1] else ""
            raise DeadlineExceeded(f"no reply for model {target[0]!r}{where} in time", job_id=job_id)
        if isinstance(item, LloomError):
            raise item
        return item

    async def _dispatch(self, msg: Msg) -> None:
        token = msg.subject[self._prefix_len :]
        waiter = self._waiting.get(token)
        headers = msg.headers
        if headers:
            if subj.HDR_KEEPALIVE in headers:
                if waiter is not None:
                    self.watch.keepalive(token)
                return
            if subj.HDR_PING in headers:
                if msg.reply and subj.is_reply_inbox(msg.reply):  # never into a JetStream API (see there)
                    await self._nc.publish(msg.reply, subj.PING_ALIVE if waiter is not None else subj.PING_GONE)
                return
            if headers.get(subj.HDR_STATUS) == subj.STATUS_NO_RESPONDERS:
                if waiter is not None:
                    fail(waiter, NoExecutors("no responders"))
                return
            executor = headers.get(subj.HDR_EXECUTOR)
            if executor is not None and waiter is not None and len(executor) <= MAX_EXECUTOR_ID:
                self._served_by[token] = executor
        if waiter is None:
            return  # a late reply (or one re-sent after an outage) for a job its caller has done with
        last = self.watch.last
        if last and token in last:
            last[token] = asyncio.get_running_loop().time()
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(msg.data)
        elif not waiter.done():
            waiter.set_result(msg.data)


async def may_retry_busy(err: LloomError, attempt: int, retries: int, deadline: float) -> bool:
    """After a `busy` or a lost executor (neither ran the job to an answer), wait and say yes,
    unless retries or time ran out.

    A busy reply with the executor's estimated wait (`retry_after_s`) is waited out (plus
    jitter) and may be retried up to `MAX_HINTED_RETRIES` times within the deadline; without
    one, the wait doubles from 20 ms (jittered, capped) for `retries` attempts (`retries=0`:
    no retry at all); likewise `receipts_unavailable`. A lost executor is retried at once: the queue group (or the route)
    picks a live one."""
    if isinstance(err, ExecutorLost):
        limit, delay = retries, 0.0
    elif isinstance(err, ExecutorBusy) and err.retry_after_s is not None and retries > 0:
        limit, delay = max(retries, MAX_HINTED_RETRIES), err.retry_after_s * random.uniform(1.0, 1.0 + HINT_JITTER)
    elif isinstance(err, ExecutorBusy | ReceiptsUnavailable):
        # An executor that cannot record receipts took no job: another member may answer.
        limit, delay = retries, BUSY_BACKOFF.delay(attempt)
    else:
        return False
    if attempt >= limit:
        return False
    if asyncio.get_running_loop().time() + delay >= deadline:
        return False
    await asyncio.sleep(delay)
    return True
