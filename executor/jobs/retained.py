"""Replies kept after they were sent, re-sent on a caller's resume request; keepalives for running jobs.

Core NATS drops a message published while its subscriber is not (yet) known to the
server, which is what happens to replies an executor flushes right after a NATS
restart, before the caller has resubscribed. So each job's messages go through a
`RetainingReply`, which keeps a reference to every payload it published (bytes
already encoded: nothing is copied), and after the job ends its entry stays for
`retain_secs`, within `max_bytes` for all finished entries (oldest dropped first).
A stream keeps at most `per_job_bytes` of its most recent messages; a caller that
needs older ones sees a gap in the chunk numbers, which its `ChatStream` raises as
`StreamInterrupted`.

A client that reconnected publishes a `ResumeRequest` (protocol/resume.py) on
`lloom.v1.resume`. For each job id found here, a finished job's messages are sent
again, in order; a running one gets a keepalive now and re-sends its earlier
messages before its next one, from its own task, so the order on the wire stays the
job's order. Everything goes to the reply subject the job came with: the request
names jobs, never an address, so only the job's owner can receive what is re-sent.
Job ids are not secrets; asking for someone else's job makes its owner get its
answer again, which it drops as a duplicate.

Jobs whose caller asked for keepalives (`Lloom-Keepalive` on the request) get a
header-only keepalive every `keepalive_secs` once they have run that long, from one
timer for all jobs, so the caller can tell a slow job from a dead executor.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from protocol import subjects as subj
from protocol.resume import resume_decoder

log = structlog.get_logger(logger_name=__name__)

_SENTINEL = b""  # ADR-47: an empty message ends a multi-message reply
Message = bytes | tuple[bytes, dict[str, str]]  # a payload, with its headers when it had any
# What an entry costs beyond its payloads (the entry, its list, the key), counted against max_bytes.
ENTRY_OVERHEAD = 300
# How often a finished job's replies are sent again on request: one per reconnect of its caller.
MAX_RESENDS = 3


class RetainingReply:
    """The caller's reply subject, keeping what was sent (a `ReplyChannel`, see jobs/context.py).

    It is also the job's entry in `RetainedReplies` (one object per job, not two)."""

    __slots__ = ("_nc", "_store", "bytes", "dropped", "finished_at", "keepalive", "messages", "replay", "resent",
                 "started", "subject")  # fmt: skip
    sealed = False  # a sealed job's channel wraps this one (jobs/context.py `SealedReply`)

    def __init__(self, nc: NATS, store: RetainedReplies, subject: str, keepalive: bool, started: float) -> None:
        self._nc = nc
        self._store = store
        self.subject = subject
        self.keepalive = keepalive
        self.started = started
        self.messages: list[Message] = []  # references to the bytes published: nothing is copied
        self.bytes = 0  # of its payloads
        self.dropped = 0  # oldest messages no longer held (a long stream)
        self.replay = False  # a resume came while the job runs: re-send before the next message
        self.resent = 0  # times a finished job's replies went out again (capped: see _on_resume)
        self.finished_at = 0.0

    async def send(self, payload: bytes, headers: dict[str, str] | None = None) -> None:
        if self.replay:
            await self._store.replay(self)
        self.messages.append(payload if headers is None else (payload, headers))
        self.bytes += len(payload)
        if self.bytes > self._store.per_job_bytes:
            self._store.trim(self)
        await self._nc.publish(self.subject, payload, headers=headers)

    async def end(self) -> None:
        await self.send(_SENTINEL)


class RetainedReplies:
    """Every running job's entry, and finished ones for `retain_secs`; answers resume requests."""

    def __init__(
        self,
        nc: NATS,
        executor_id: str,
        *,
        retain_secs: float,
        max_bytes: int,
        per_job_bytes: int,
        keepalive_secs: float,
    ) -> None:
        self._nc = nc
        self.executor_id = executor_id
        self.retain_secs = retain_secs
        self.max_bytes = max_bytes
        self.per_job_bytes = per_job_bytes
        self.keepalive_secs = keepalive_secs
        self._running: dict[str, RetainingReply] = {}
        self._finished: OrderedDict[str, RetainingReply] = OrderedDict()  # oldest first
        self._finished_bytes = 0
        self._keepalive_headers = {subj.HDR_KEEPALIVE: executor_id}
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.resent = 0  # jobs whose messages were sent again
        self.keepalives = 0

    @property
    def held(self) -> int:
        return len(self._running) + len(self._finished)

    @property
    def held_bytes(self) -> int:
        return self._finished_bytes + sum(e.bytes + ENTRY_OVERHEAD for e in self._running.values())

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(subj.RESUME, cb=self._on_resume)
            self._task = asyncio.create_task(self._every_keepalive(), name="keepalive")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        sub, self._sub = self._sub, None
        if sub is not None and not self._nc.is_closed:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # the connection is going away: so is the subscription

    def channel(self, subject: str, job_id: str, *, keepalive: bool) -> RetainingReply:
        """The reply channel of a job starting now."""
        entry = RetainingReply(self._nc, self, subject, keepalive, asyncio.get_running_loop().time())
        self._running[job_id] = entry
        if self._finished:
            old = self._finished.pop(job_id, None)  # a job id used again: the new job is what counts
            if old is not None:
                self._finished_bytes -= old.bytes + ENTRY_OVERHEAD
        return entry

    def finished(self, job_id: str) -> None:
        """The job has ended: keep its messages for `retain_secs` (none if it is 0)."""
        entry = self._running.pop(job_id, None)
        if entry is None or self.retain_secs <= 0:
            return
        now = asyncio.get_running_loop().time()
        entry.finished_at = now
        entry.replay = False
        self._finished[job_id] = entry
        self._finished_bytes += entry.bytes + ENTRY_OVERHEAD
        if self._finished_bytes > self.max_bytes:
            self._expire(now)  # by age, the keepalive timer does it every keepalive_secs

    def trim(self, entry: RetainingReply) -> None:
        """Drop a long stream's oldest messages down to 3/4 of `per_job_bytes` (keeps the newest, and
        leaves room, so a long stream trims once in a while, not at every chunk)."""
        messages = entry.messages
        goal = self.per_job_bytes * 3 // 4
        cut = 0
        while entry.bytes > goal and cut < len(messages) - 1:
            entry.bytes -= len(_payload(messages[cut]))
            cut += 1
        del messages[:cut]
        entry.dropped += cut

    async def replay(self, entry: RetainingReply) -> None:
        """Publish every message `entry` holds again, in order, to its own reply subject."""
        entry.replay = False
        self.resent += 1
        for message in list(entry.messages):
            if type(message) is tuple:
                await self._nc.publish(entry.subject, message[0], headers=message[1])
            else:
                await self._nc.publish(entry.subject, message)

    def _expire(self, now: float) -> None:
        finished = self._finished
        cutoff = now - self.retain_secs
        while finished:
            job_id, oldest = next(iter(finished.items()))
            if oldest.finished_at > cutoff and self._finished_bytes <= self.max_bytes:
                break
            del finished[job_id]
            self._finished_bytes -= oldest.bytes + ENTRY_OVERHEAD

    async def _on_resume(self, msg: Msg) -> None:
        try:
            request = resume_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.info("bad resume request", error=str(e))
            return
        resent = 0
        for job_id in request.job_ids:
            entry = self._finished.get(job_id)
            try:
                if entry is not None:
                    # Anyone may ask (the resume subject is shared), and each ask is a whole reply
                    # sent again: a caller needs one per outage, so a few per job are plenty.
                    if entry.resent >= MAX_RESENDS:
                        continue
                    entry.resent += 1
                    await self.replay(entry)
                    resent += 1
                    continue
                entry = self._running.get(job_id)
                if entry is not None:
                    entry.replay = bool(entry.messages)  # before its next message, from its own task
                    if entry.keepalive:
                        await self._nc.publish(entry.subject, b"", headers=self._keepalive_headers)
            except nats.errors.Error as e:
                log.info("could not re-send after a resume request", job_id=job_id, error=str(e))
                return
        if resent:
            log.info("re-sent replies after a resume request", jobs=resent, executor_id=self.executor_id)

    async def _every_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.keepalive_secs)  # the keepalive period
            now = loop.time()
            self._expire(now)
            if not self._nc.is_connected:
                continue  # nats.py would buffer them: stale by the time they arrive
            due = now - self.keepalive_secs
            try:
                for entry in list(self._running.values()):
                    if entry.keepalive and entry.started <= due:
                        await self._nc.publish(entry.subject, b"", headers=self._keepalive_headers)
                        self.keepalives += 1
            except nats.errors.Error as e:
                log.debug("keepalives not sent", error=str(e))


def _payload(message: Message) -> bytes:
    return message[0] if type(message) is tuple else message  # type: ignore[return-value]
