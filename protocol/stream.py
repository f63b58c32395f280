"""A streamed job as the caller sees it: chunks in order, then the final message.

`ChatStream` is made by `LloomClient.stream`, which gives it the client's
`Pending` inbox (protocol/pending.py) and its routing, not the client. It sends
the job on first iteration, checks that chunk numbers have no gap (a gap means NATS dropped
messages for a reader that fell behind), and ends at the `StreamEnd` or raises
the typed error that ended the stream. Before the first chunk it may move the
job elsewhere: to the next candidate of a route, or again after a `busy`.
Leaving early cancels the job at the executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from collections.abc import Awaitable, Callable
from typing import Self

import msgspec

from protocol.errors import DeadlineExceeded, LloomError, NoExecutors, StreamInterrupted
from protocol.messages import (
    ChatRequest,
    ErrorReply,
    StreamChunk,
    StreamEnd,
    encoder,
    error_from_wire,
    stream_reply_decoder,
)
from protocol.pending import Pending, may_retry_busy
from protocol.replies import Target, decode_reply, fails_over
from protocol.routing import Candidate, Constraints, ModelRequest, Specific

Candidates = Callable[[ChatRequest, ModelRequest, Constraints | None], Awaitable[list[Candidate]]]
NoResponders = Callable[[Target], Awaitable[NoExecutors]]


class ChatStream:
    """An async iterator of `StreamChunk`s and an async context manager; `end` holds the final message."""

    def __init__(
        self,
        pending: Pending,
        request: ChatRequest,
        budget: float,
        executor: str | None,
        route: ModelRequest | None = None,
        constraints: Constraints | None = None,
        *,
        busy_retries: int,
        candidates: Candidates,
        no_responders: NoResponders,
    ) -> None:
        self._pending = pending
        self._busy_retries = busy_retries
        self._candidates = candidates
        self._no_responders = no_responders
        self._request = request
        self._budget = budget
        self._executor = executor
        self._route = route
        self._constraints = constraints
        self.job_id = pending.new_job_id()
        self.end: StreamEnd | None = None
        self._queue: asyncio.Queue[bytes | LloomError] = asyncio.Queue()
        self._started = False
        self._finished = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._started and not self._finished:
            self._finished = True
            self._pending.unregister(self.job_id)
            await self._pending.cancel(self.job_id)

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._iterate()

    async def _targets(self) -> list[tuple[Target, bool]]:
        """Where to send the job, in order, each with whether a `busy` there means waiting and retrying."""
        if self._route is None and self._constraints is None:
            target = (self._request.model, self._executor)
            return [(target, True)] * (self._busy_retries + 1)
        route = self._route or Specific(self._request.model)
        found = await self._candidates(self._request, route, self._constraints)
        return [((c.model, c.executor_id), False) for c in found]

    async def _send_to(self, target: Target, deadline: float) -> None:
        pending = self._pending
        pending.unregister(self.job_id)
        self.job_id = pending.new_job_id()  # a new attempt is a new job: stale replies cannot mix in
        self._queue = asyncio.Queue()
        pending.register(self.job_id, self._queue)
        request = self._request
        if target[0] != request.model:
            request = msgspec.structs.replace(request, model=target[0])
        await pending.send(target, encoder.encode(request), self.job_id, deadline)

    async def _iterate(self) -> AsyncIterator[StreamChunk]:
        if self._started:
            raise RuntimeError("a ChatStream can be iterated once")
        self._started = True
        deadline = asyncio.get_running_loop().time() + self._budget
        try:
            targets = await self._targets()
            for attempt, (target, wait_if_busy) in enumerate(targets):
                await self._send_to(target, deadline)
                expected_seq = 0
                while True:
                    item = await self._next(deadline)
                    if isinstance(item, LloomError):
                        err: LloomError = (await self._no_responders(target)
                                           if isinstance(item, NoExecutors) else item)  # fmt: skip
                    elif not item:
                        raise StreamInterrupted("stream ended without a final message", job_id=self.job_id)
                    else:
                        msg = decode_reply(stream_reply_decoder, item)
                        if type(msg) is StreamChunk:
                            if msg.seq < expected_seq:
                                continue  # re-sent after an outage (protocol/resume.py): already yielded
                            if msg.seq > expected_seq and self._pending.watch.resuming():
                                continue  # lost in an outage: the executor re-sends from the first it holds
                            if msg.seq != expected_seq:
                                raise StreamInterrupted(
                                    f"lost stream messages: expected chunk {expected_seq}, got {msg.seq}"
                                    " (is this reader too slow for the stream?)",
                                    job_id=self.job_id,
                                )
                            expected_seq += 1
                            yield msg
                            continue
                        if type(msg) is StreamEnd:
                            if msg.chunks != expected_seq:
                                raise StreamInterrupted(
                                    f"lost stream messages: {msg.chunks} chunks were sent, {expected_seq} arrived",
                                    job_id=self.job_id,
                                )
                            self.end = msg
                            self._finished = True
                            return
                        assert isinstance(msg, ErrorReply)
                        err = error_from_wire(msg)
                    # An error ends this attempt; before any chunk, another may be made.
                    last = attempt == len(targets) - 1
                    if expected_seq or last:
                        self._finished = True
                        raise err
                    if wait_if_busy:
                        if not await may_retry_busy(err, attempt, len(targets) - 1, deadline):
                            self._finished = True
                            raise err
                    elif not fails_over(err):
                        self._finished = True
                        raise err
                    break
        except asyncio.CancelledError:
            await asyncio.shield(self.aclose())
            raise
        finally:
            if not self._finished:
                await self.aclose()
            self._pending.unregister(self.job_id)

    async def _next(self, deadline: float) -> bytes | LloomError:
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            raise DeadlineExceeded(
                f"stream for model {self._request.model!r} did not finish within {self._budget:g}s", job_id=self.job_id
            ) from None
