"""Delivery across NATS outages and dead executors, the client's side: resume and silence.

Core NATS delivers a reply only to a subscription the server knows at that moment.
When the server restarts, an executor that reconnects first flushes the replies it
buffered to a server where the caller has not yet resubscribed, and they are gone.
So executors keep each job's replies for a short while (executor/jobs/retained.py),
and after every reconnect this client publishes one `ResumeRequest` on
`lloom.v1.resume` naming the jobs it still waits for. An executor holding one of
them re-sends what it sent, to the reply subject the job came with (never to an
address in the request, so asking for someone else's job only makes the executor
repeat the answer to its owner). A reply the caller already has is dropped by job
id (unary) or chunk number (streams). Whichever of client and executor reconnects
last, one of the two paths delivers: the executor's own flush when the client was
back first, the resume otherwise.

Jobs whose request carried `Lloom-Keepalive` get a header-only keepalive from their
executor every second while they run. A job whose executor says nothing (no keepalive,
no reply) for `silence_s` of connected time fails with `ExecutorLost`, so a SIGKILLed
executor is noticed in seconds, not at the deadline. The count starts when the job is
sent, with `FIRST_HEARD_GRACE_S` more for the first keepalive (it comes within two
keepalive periods of the start): a job whose executor died before its first keepalive,
or whose request was lost with a NATS node (published to a server that died before
routing it, so nobody will ever answer or re-send it), fails the same way, and is
retried where it may be, instead of waiting out its deadline. Before it fails a job,
the watch checks that its own server answers a PING within a second: when it does not
(the server is paused or cut off, the socket still open), the silence is this client's,
and a retry would only run the job twice.
Time while this client is disconnected does not count, and a reconnect restarts
every job's count (its executor may come back later than we did).

One ticker task per client does all of it; the per-message cost is one dict
lookup (and a store for watched jobs).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
import nats.errors
from msgspec import Meta
from nats.aio.client import Client as NATS

from protocol import subjects as subj
from protocol.errors import ExecutorLost
from protocol.replies import Waiter, fail

# Silence (connected time, since the job's last message, or its send plus FIRST_HEARD_GRACE_S) after which
# a call fails with ExecutorLost.
DEFAULT_SILENCE_S = 3.0
# A job just sent may be silent this much longer: an executor's first keepalive comes up to two of its
# keepalive periods (1 s by default) after the job started.
FIRST_HEARD_GRACE_S = 2.0
# How often the ticker looks: silence is noticed within silence_s + TICK_S.
TICK_S = 0.25
# A tick this much later than due means this process itself stood still: nobody's silence.
STALL_S = 1.0
# Before a silent job is failed, our own server must answer a PING within this: a server that does not
# (paused, cut off, its socket still open) silences every executor at once.
SERVER_CHECK_S = 1.0
# How long a PING to our server may stay unanswered before its probe ends (see _server_answers).
PROBE_MAX_S = 60.0
# Job ids per resume request (a request stays far below any max_payload).
MAX_RESUME_IDS = 1000

JobId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ResumeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Jobs whose replies the sender may have missed; executors re-send to each job's own reply subject."""

    job_ids: Annotated[list[JobId], Meta(max_length=MAX_RESUME_IDS)]


resume_decoder = msgspec.json.Decoder(ResumeRequest)
_encode = msgspec.json.Encoder().encode


class DeliveryWatch:
    """Watches the jobs of one `Pending` inbox: resumes them after a reconnect, fails them when silent.

    `last` maps each watched job id (every job sent and still waited for) to when it was
    last heard of; `Pending._dispatch` updates it for every message of a watched job."""

    def __init__(self, nc: NATS, waiting: dict[str, Waiter], *, silence_s: float = DEFAULT_SILENCE_S) -> None:
        self._nc = nc
        self._waiting = waiting
        self.silence_s = silence_s
        self.last: dict[str, float] = {}
        self._reconnects = 0
        self._reconnected_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None  # a PING to our server, left to finish (see _server_answers)
        self.resumed = 0  # resume requests sent (for tests and figures)
        self.lost = 0  # calls failed with ExecutorLost

    def start(self) -> None:
        if self._task is None:
            self._reconnects = self._nc.stats.get("reconnects", 0)
            self._task = asyncio.create_task(self._tick(), name="lloom-delivery-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        probe, self._probe = self._probe, None
        if probe is not None:
            # A healthy server answers at once; cancelling a PING the server may still answer is
            # what nats-py cannot take (see _server_answers), so it is the last resort.
            await asyncio.wait({probe}, timeout=SERVER_CHECK_S)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        self.last.clear()

    def sent(self, job_id: str) -> None:
        """`job_id` was just sent: watch it from now on, allowing for its first keepalive."""
        self.last[job_id] = asyncio.get_running_loop().time() + FIRST_HEARD_GRACE_S

    def keepalive(self, job_id: str) -> None:
        """The executor of `job_id` says it is alive: watch the job from now on."""
        self.last[job_id] = asyncio.get_running_loop().time()

    def forget(self, job_id: str) -> None:
        self.last.pop(job_id, None)

    def resuming(self) -> bool:
        """Whether replies lost in an outage may still be re-sent: within `silence_s` of the last reconnect.

        A stream that sees a gap in its chunks then waits for them instead of failing."""
        if self._nc.stats.get("reconnects", 0) != self._reconnects:
            return True  # back, and the resume not asked yet (the next tick asks)
        return asyncio.get_running_loop().time() - self._reconnected_at < self.silence_s

    async def reconnected(self) -> None:
        """Ask executors for whatever was sent to us while we were away (once per reconnect)."""
        count = self._nc.stats.get("reconnects", 0)
        if count == self._reconnects:
            return  # this reconnect was handled (by the callback or by a tick)
        self._reconnects = count
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.cancel()  # its PING went to the old socket, whose PONGs nats-py forgot: safe to cancel now
        now = asyncio.get_running_loop().time()
        self._reconnected_at = now
        for job_id in self.last:
            self.last[job_id] = now  # the executor may reconnect after us: count afresh
        ids = list(self._waiting)
        if not ids or not self._nc.is_connected:
            return
        try:
            for i in range(0, len(ids), MAX_RESUME_IDS):
                await self._nc.publish(subj.RESUME, _encode(ResumeRequest(job_ids=ids[i : i + MAX_RESUME_IDS])))
            self.resumed += 1
        except (nats.errors.Error, OSError):
            pass  # disconnected again: the next reconnect asks again

    async def _server_answers(self) -> bool:
        """Whether our NATS server answered a PING within `SERVER_CHECK_S` (asked only when a job fell silent).

        The PING is a `flush()` in a task of its own that is never cancelled early: in nats-py 2.16
        a PONG that arrives after a flush was given up on ends the client's read loop (it sets the
        result of the cancelled future) and the connection stays deaf. So a slow answer is waited
        for by the next tick, and `PROBE_MAX_S` is long past the ping window after which the client
        leaves an unanswering server (its pending PONGs are then dropped with the old socket)."""
        if self._probe is None:
            self._probe = asyncio.create_task(self._nc.flush(timeout=PROBE_MAX_S), name="lloom-server-probe")
        done, _ = await asyncio.wait({self._probe}, timeout=SERVER_CHECK_S)
        if not done:
            return False  # no PONG yet: the probe goes on, the next tick looks again
        probe, self._probe = self._probe, None
        return not probe.cancelled() and probe.exception() is None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        ticked = loop.time()
        while True:
            await asyncio.sleep(TICK_S)  # the ticker's pace, not a synchronization
            now = loop.time()
            late, ticked = now - ticked - TICK_S, now
            if not self._nc.is_connected or late > STALL_S:
                # Disconnected time is nobody's silence, and neither is time this process did not
                # run (SIGSTOP, a blocked loop, a suspended laptop): what executors sent meanwhile
                # waits unread in the socket, behind this tick.
                for job_id in self.last:
                    self.last[job_id] = now
                continue
            if self._nc.stats.get("reconnects", 0) != self._reconnects:
                # A connection without our reconnected callback (not made by LloomClient.connect)
                # is noticed here, within a tick.
                await self.reconnected()
                continue
            silent = [j for j, t in self.last.items() if now - t > self.silence_s]
            if any(j in self._waiting for j in silent) and not await self._server_answers():
                # Our own server is stuck (paused, cut off) while the socket looks open: the silence is
                # ours, and a job sent again would run twice. Wait for it like for a reconnect.
                now = loop.time()
                for job_id in self.last:
                    self.last[job_id] = now
                continue
            for job_id in silent:
                del self.last[job_id]
                waiter = self._waiting.get(job_id)
                if waiter is not None:
                    self.lost += 1
                    fail(waiter, ExecutorLost(
                        f"the executor running job {job_id} sent nothing for {self.silence_s:g}s (it died or is"
                        " cut off)", job_id=job_id))  # fmt: skip
