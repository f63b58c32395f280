"""The async client: send chat jobs to the network and read results or streams.

    async with await LloomClient.connect("nats://127.0.0.1:4222") as client:
        reply = await client.complete(ChatRequest(model="m", messages=[...]))
        async with client.stream(request) as stream:
            async for chunk in stream:
                print(chunk.delta, end="")
        print(stream.end.usage)

All replies arrive on one wildcard inbox subscription (`<inbox>.*`), routed to
the waiting call by the last token, which is the job id: no subscription per
request. The same dispatcher answers executors' liveness pings, so a job whose
caller has gone (cancelled, crashed, disconnected) is stopped at the executor.

Errors are the `protocol.errors` types the executor raised. `NoExecutors` comes
at once from the server's "no responders" status. A `busy` reply is retried
(another executor of the queue group usually takes it) while the deadline
allows; nothing else is retried here, since a job whose outcome is unknown may
have run.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import msgspec
import nats.aio.subscription
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.nuid import NUID

from protocol import subjects as subj
from protocol.connection import close_nats, connect_nats
from protocol.errors import (
    Cancelled,
    DeadlineExceeded,
    ExecutorBusy,
    InternalError,
    LloomError,
    NoExecutors,
    PayloadTooLarge,
    StreamInterrupted,
)
from protocol.messages import (
    ChatRequest,
    ChatResponse,
    ErrorReply,
    StreamChunk,
    StreamEnd,
    encoder,
    error_from_wire,
    stream_reply_decoder,
    unary_reply_decoder,
)

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_TIMEOUT_S = 120.0

_Waiter = asyncio.Future[bytes] | asyncio.Queue[bytes | LloomError]


def _headers_size(headers: dict[str, str]) -> int:
    # NATS/1.0\r\n, then "Key: Value\r\n" per header, then a blank line.
    return 10 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


class LloomClient:
    """Sends jobs over an existing NATS connection (which it does not own unless made by `connect`)."""

    def __init__(self, nc: NATS, *, timeout: float = DEFAULT_TIMEOUT_S, busy_retries: int = 3) -> None:
        self._nc = nc
        self.timeout = timeout
        self.busy_retries = busy_retries
        self._owns_nc = False
        self._prefix = nc.new_inbox()
        self._prefix_len = len(self._prefix) + 1
        self._pending: dict[str, _Waiter] = {}
        self._nuid = NUID()
        self._sub: nats.aio.subscription.Subscription | None = None

    @classmethod
    async def connect(
        cls, servers: str | list[str] = DEFAULT_URL, *, timeout: float = DEFAULT_TIMEOUT_S, busy_retries: int = 3
    ) -> LloomClient:
        """Connect to NATS and return a started client that closes the connection with itself.

        Raises `ConnectionError` naming the URL and the cause when no server answers.
        """
        nc = await connect_nats(servers, name="lloom-client", on_error=_report_nats_error)
        client = cls(nc, timeout=timeout, busy_retries=busy_retries)
        client._owns_nc = True
        await client.start()
        return client

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._dispatch)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            if not self._nc.is_closed:
                await sub.unsubscribe()
        for waiter in self._pending.values():
            _fail(waiter, Cancelled("client closed"))
        self._pending.clear()
        if self._owns_nc:
            await close_nats(self._nc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def new_job_id(self) -> str:
        return self._nuid.next().decode()

    async def complete(
        self, request: ChatRequest, *, timeout: float | None = None, executor: str | None = None
    ) -> ChatResponse:
        """Run one job and return its normalized response; raises the job's typed error."""
        if request.stream:
            request = msgspec.structs.replace(request, stream=False)
        loop = asyncio.get_running_loop()
        budget = timeout or self.timeout
        deadline = loop.time() + budget
        payload = encoder.encode(request)
        for attempt in range(self.busy_retries + 1):
            # A busy executor never ran the job, so a retry is a new job: replies
            # still in flight for the old id can then not be mistaken for its own.
            job_id = self.new_job_id()
            fut: asyncio.Future[bytes] = loop.create_future()
            self._pending[job_id] = fut
            try:
                await self._publish(request.model, executor, payload, job_id, deadline)
                data = await self._wait(fut, deadline, job_id, budget, request.model)
            except NoExecutors:
                raise self._no_responders(request.model, executor) from None
            finally:
                self._pending.pop(job_id, None)
            reply = _decode(unary_reply_decoder, data)
            if type(reply) is ChatResponse:
                return reply
            assert isinstance(reply, ErrorReply)
            err = error_from_wire(reply)
            if not await self._may_retry(err, attempt, deadline):
                raise err
        raise AssertionError("unreachable")

    def stream(self, request: ChatRequest, *, timeout: float | None = None, executor: str | None = None) -> ChatStream:
        """Start a streamed job; iterate the result for chunks, then read `.end`."""
        if not request.stream:
            request = msgspec.structs.replace(request, stream=True)
        return ChatStream(self, request, timeout or self.timeout, executor)

    async def cancel(self, job_id: str) -> None:
        """Tell whichever executor runs `job_id` to stop it (best effort, at most once)."""
        if not self._nc.is_closed:
            await self._nc.publish(subj.cancel_subject(job_id))

    # -- internals shared with ChatStream --

    async def _publish(self, model: str, executor: str | None, payload: bytes, job_id: str, deadline: float) -> None:
        remaining_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
        if remaining_ms <= 0:
            raise DeadlineExceeded("deadline passed before the job could be sent", job_id=job_id)
        headers = {subj.HDR_JOB_ID: job_id, subj.HDR_TIMEOUT_MS: str(remaining_ms), subj.HDR_LIVENESS: "1"}
        size = len(payload) + _headers_size(headers)
        if size > self._nc.max_payload:
            # The server would close the whole connection for this; refuse it here instead.
            raise PayloadTooLarge(
                f"request is {size} bytes with headers; the NATS server accepts at most {self._nc.max_payload}"
            )
        subject = subj.direct_subject(executor) if executor else subj.complete_subject(model)
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{job_id}", headers=headers)

    async def _wait(self, fut: asyncio.Future[bytes], deadline: float, job_id: str, budget: float, model: str) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                return await fut
        except TimeoutError:
            await self.cancel(job_id)
            raise DeadlineExceeded(f"no reply for model {model!r} within {budget:g}s", job_id=job_id) from None
        except asyncio.CancelledError:
            await asyncio.shield(self.cancel(job_id))
            raise

    async def _may_retry(self, err: LloomError, attempt: int, deadline: float) -> bool:
        if not isinstance(err, ExecutorBusy) or attempt >= self.busy_retries:
            return False
        # Jittered, short and capped: the queue group picks another member at random.
        delay = min(0.25, random.uniform(0.005, 0.02) * (2**attempt))
        if asyncio.get_running_loop().time() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True

    def _no_responders(self, model: str, executor: str | None) -> NoExecutors:
        if executor:
            return NoExecutors(f"executor {executor!r} is not on the network")
        return NoExecutors(f"no executor on the network serves model {model!r}")

    async def _dispatch(self, msg: Msg) -> None:
        token = msg.subject[self._prefix_len :]
        waiter = self._pending.get(token)
        headers = msg.headers
        if headers:
            if subj.HDR_PING in headers:
                if msg.reply:
                    await self._nc.publish(msg.reply, subj.PING_ALIVE if waiter is not None else subj.PING_GONE)
                return
            if headers.get(subj.HDR_STATUS) == subj.STATUS_NO_RESPONDERS:
                if waiter is not None:
                    _fail(waiter, NoExecutors("no responders"))
                return
        if waiter is None:
            return  # a late reply for a job its caller gave up on
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(msg.data)
        elif not waiter.done():
            waiter.set_result(msg.data)


class ChatStream:
    """One streamed job: an async iterator of `StreamChunk`s and an async context manager.

    Leaving the `async with` block (or `aclose()`) before the end cancels the job
    at the executor. After a complete iteration, `end` holds the final message.
    """

    def __init__(self, client: LloomClient, request: ChatRequest, budget: float, executor: str | None) -> None:
        self._client = client
        self._request = request
        self._budget = budget
        self._executor = executor
        self.job_id = client.new_job_id()
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
            self._client._pending.pop(self.job_id, None)
            await self._client.cancel(self.job_id)

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamChunk]:
        if self._started:
            raise RuntimeError("a ChatStream can be iterated once")
        self._started = True
        client = self._client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        payload = encoder.encode(self._request)
        client._pending[self.job_id] = self._queue
        try:
            attempt = 0
            await client._publish(self._request.model, self._executor, payload, self.job_id, deadline)
            expected_seq = 0
            while True:
                item = await self._next(deadline)
                if isinstance(item, LloomError):
                    if isinstance(item, NoExecutors):
                        raise client._no_responders(self._request.model, self._executor)
                    raise item
                if not item:
                    raise StreamInterrupted("stream ended without a final message", job_id=self.job_id)
                msg = _decode(stream_reply_decoder, item)
                if type(msg) is StreamChunk:
                    if msg.seq != expected_seq:
                        raise StreamInterrupted(
                            f"lost stream messages: expected chunk {expected_seq}, got {msg.seq}"
                            " (is this reader too slow for the stream?)",
                            job_id=self.job_id,
                        )
                    expected_seq += 1
                    yield msg
                elif type(msg) is StreamEnd:
                    self.end = msg
                    self._finished = True
                    return
                else:
                    assert isinstance(msg, ErrorReply)
                    err = error_from_wire(msg)
                    if expected_seq == 0 and await client._may_retry(err, attempt, deadline):
                        attempt += 1
                        client._pending.pop(self.job_id, None)
                        self.job_id = client.new_job_id()
                        self._queue = asyncio.Queue()  # the old attempt's sentinel may be queued already
                        client._pending[self.job_id] = self._queue
                        await client._publish(self._request.model, self._executor, payload, self.job_id, deadline)
                        continue
                    self._finished = True
                    raise err
        except asyncio.CancelledError:
            await asyncio.shield(self.aclose())
            raise
        finally:
            if not self._finished:
                await self.aclose()
            client._pending.pop(self.job_id, None)

    async def _next(self, deadline: float) -> bytes | LloomError:
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            raise DeadlineExceeded(
                f"stream for model {self._request.model!r} did not finish within {self._budget:g}s", job_id=self.job_id
            ) from None


async def _report_nats_error(e: Exception) -> None:
    # A library must not print; applications see this through stdlib logging.
    logging.getLogger("protocol.client").warning("nats: %s", e or type(e).__name__)


def _fail(waiter: _Waiter, err: LloomError) -> None:
    if isinstance(waiter, asyncio.Queue):
        waiter.put_nowait(err)
    elif not waiter.done():
        waiter.set_exception(err)


def _decode(decoder: msgspec.json.Decoder, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as e:
        raise InternalError(f"malformed reply from executor: {e}") from e
