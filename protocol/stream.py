"""A streamed job as the caller sees it: chunks in order, then the final message.

`ChatStream` is made by `LloomClient.stream`, which gives it the client's
`Pending` inbox (protocol/pending.py) and its routing, not the client. It sends
the job on first iteration, checks that chunk numbers have no gap (a gap means NATS dropped
messages for a reader that fell behind), and ends at the `StreamEnd` or raises
the typed error that ended the stream. Before the first chunk it may move the
job elsewhere: to the next candidate of a route, or again after a `busy`.
Leaving early cancels the job at the executor.

With a verifier (the default), the end must carry a receipt that proves it came from
the executor it names for this request (protocol/verify.py); an end that does not is
ignored and counted, and the stream waits for the genuine one (at the deadline it
raises `ReplyForged`). The genuine end's receipt must also hash the text of the chunks
received: if not, the text already delivered was not what the executor sent and the
stream raises `UnverifiedReply`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from collections.abc import Awaitable, Callable
from typing import Self

import msgspec

from protocol.chat_types import ToolCall
from protocol.errors import (
    DeadlineExceeded,
    InternalError,
    LloomError,
    NoExecutors,
    ReplyForged,
    StreamInterrupted,
    UnverifiedReply,
)
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
from protocol.sealing import ClientSeal, SealError
from protocol.tool_calls import ToolCallAccumulator
from protocol.verify import ReplyVerifier, sha256_hex, signed_answer

Candidates = Callable[[ChatRequest, ModelRequest, Constraints | None], Awaitable[list[Candidate]]]
NoResponders = Callable[[Target], Awaitable[NoExecutors]]
Bind = Callable[[Target], Awaitable[None]]


async def _no_binding(_target: Target) -> None:
    return None


class ChatStream:
    """An async iterator of `StreamChunk`s and an async context manager; `end` holds the final message,
    `reasoning` the reasoning text and `tool_calls` the assembled tool calls."""

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
        verifier: ReplyVerifier | None = None,
        bind: Bind = _no_binding,
        sealed: bool = False,
    ) -> None:
        self._pending = pending
        # A sealed stream (protocol/sealing.py) goes only to candidates with a curve key; each
        # attempt seals its job with a fresh key pair, and every message is opened before it is read.
        self._sealed = sealed
        self._seal: ClientSeal | None = None
        self._verifier = verifier
        self._bind = bind
        self._request_sha = ""
        self._texts: list[str] = []  # the chunks' text, for the receipt's response hash
        self._forged: ReplyForged | None = None
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
        self._reasoning: list[str] = []
        self._tool_pieces = ToolCallAccumulator()
        self._queue: asyncio.Queue[bytes | LloomError] = asyncio.Queue()
        self._started = False
        self._finished = False

    @property
    def executor(self) -> str | None:
        """Who serves the stream: the end's (verified) executor once it ended; before, the one asked
        for, else the one the first chunk named (None before it, or from an executor that names none)."""
        if self.end is not None:
            return self.end.executor_id
        return self._executor or self._pending.served_by(self.job_id)

    @property
    def reasoning(self) -> str:
        """The reasoning text received so far (each chunk's `reasoning` joined)."""
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the model asked for, whole, once the stream has ended; `StreamInterrupted`
        if it ended mid call (protocol/tool_calls.py). The chunks carry the same calls in pieces."""
        return self._tool_pieces.calls(finished=self.end is not None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._started and not self._finished:
            self._finished = True
            try:
                await self._pending.cancel(self.job_id)  # while the job's cancel token is still known
            finally:
                self._pending.unregister(self.job_id)

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._iterate()

    async def _targets(self) -> list[tuple[Target, bool, str | None]]:
        """Where to send the job, in order, each with whether a `busy` there means waiting and retrying,
        and the curve key to seal it to (sealed streams only)."""
        if self._route is None and self._constraints is None and not self._sealed:
            target = (self._request.model, self._executor)
            return [(target, True, None)] * (self._busy_retries + 1)
        route = self._route or Specific(self._request.model)
        found = await self._candidates(self._request, route, self._constraints)
        return [((c.model, c.executor_id), False, c.curve_key if self._sealed else None) for c in found]

    async def _send_to(self, target: Target, deadline: float, sealed_to: str | None = None) -> None:
        pending = self._pending
        pending.unregister(self.job_id)
        self.job_id = pending.new_job_id()  # a new attempt is a new job: stale replies cannot mix in
        self._queue = asyncio.Queue()
        pending.register(self.job_id, self._queue)
        request = self._request
        if target[0] != request.model:
            request = msgspec.structs.replace(request, model=target[0])
        payload = encoder.encode(request)
        if self._verifier is not None:
            await self._bind(target)
            self._request_sha = sha256_hex(payload)
        self._texts = []
        self._forged = None
        if sealed_to is None:
            self._seal = None
            await pending.send(target, payload, self.job_id, deadline)
        else:
            self._seal = seal = ClientSeal(sealed_to)
            await pending.send(target, seal.box.seal(payload), self.job_id, deadline, sealed_by=seal.header)

    async def _iterate(self) -> AsyncIterator[StreamChunk]:
        if self._started:
            raise RuntimeError("a ChatStream can be iterated once")
        self._started = True
        deadline = asyncio.get_running_loop().time() + self._budget
        try:
            targets = await self._targets()
            for attempt, (target, wait_if_busy, sealed_to) in enumerate(targets):
                await self._send_to(target, deadline, sealed_to)
                expected_seq = 0
                while True:
                    item = await self._next(deadline)
                    if isinstance(item, LloomError):
                        err: LloomError = (await self._no_responders(target)
                                           if isinstance(item, NoExecutors) else item)  # fmt: skip
                    elif not item:
                        raise StreamInterrupted("stream ended without a final message", job_id=self.job_id)
                    else:
                        if self._seal is not None:
                            try:
                                item = self._seal.box.open(item)
                            except SealError as e:
                                forged = ReplyForged(f"sealed stream message cannot be opened: {e}", job_id=self.job_id)
                                if self._verifier is None:
                                    raise forged from None
                                self._verifier.forgeries["unsealed"] += 1  # not the executor's: ignored
                                self._forged = forged
                                continue
                        try:
                            msg = decode_reply(stream_reply_decoder, item)
                        except InternalError:
                            if self._verifier is None:
                                raise
                            self._verifier.forgeries["malformed"] += 1  # not the executor's: it sends JSON
                            continue
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
                            if self._verifier is not None:
                                self._texts.append(msg.delta)
                            if msg.reasoning is not None:
                                self._reasoning.append(msg.reasoning)
                            if msg.tool_calls is not None:
                                self._tool_pieces.add(msg.tool_calls)
                            yield msg
                            continue
                        if type(msg) is StreamEnd:
                            if self._verifier is not None and not self._genuine(msg, target, expected_seq):
                                continue  # a forged end: wait for the executor's own
                            _check_count(msg, expected_seq, self.job_id)
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

    def _genuine(self, end: StreamEnd, target: Target, received: int) -> bool:
        """Whether `end` is the executor's own; raises `StreamInterrupted` if it is but chunks were
        lost, `UnverifiedReply` if the text received is not what its receipt vouches for."""
        assert self._verifier is not None
        try:
            receipt = self._verifier.check_identity(
                end.receipt, executor_id=end.executor_id, job_id=self.job_id, client=self._pending.client_id,
                request_sha256=self._request_sha, target=target[1],
            )  # fmt: skip
        except ReplyForged as e:
            self._forged = e
            return False
        _check_count(end, received, self.job_id, extra_ok=True)  # lost chunks say more than a hash mismatch
        try:
            pieces = self._tool_pieces.pieces
            calls = encoder.encode(pieces) if pieces else None
            self._verifier.check_response(receipt, signed_answer("".join(self._texts), self.reasoning, calls))
        except ReplyForged as e:
            self._finished = True
            raise UnverifiedReply(
                f"the executor's receipt does not match the {len(self._texts)} chunks received: the text"
                f" delivered is unverified ({e.message})", job_id=self.job_id, executor_id=end.executor_id,
            ) from None  # fmt: skip
        return True

    async def _next(self, deadline: float) -> bytes | LloomError:
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            if self._forged is not None:
                raise ReplyForged(f"{self._forged.message}; no genuine end of the stream came in time",
                                  job_id=self.job_id) from None  # fmt: skip
            raise DeadlineExceeded(
                f"stream for model {self._request.model!r} did not finish within {self._budget:g}s", job_id=self.job_id
            ) from None


def _check_count(end: StreamEnd, received: int, job_id: str, *, extra_ok: bool = False) -> None:
    """Fewer chunks than the end counts: some were lost. More: someone else's were mixed in, which
    verification reports as unverified text (`extra_ok`); without it, the stream is broken too."""
    if received < end.chunks or (received > end.chunks and not extra_ok):
        raise StreamInterrupted(
            f"lost stream messages: {end.chunks} chunks were sent, {received} arrived", job_id=job_id
        )
