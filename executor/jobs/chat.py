"""One job: check it, run it on the backend, and put the result or error on the wire.

A `Job` is created by the node for a decoded request and runs in its own task.
Whatever happens (backend failure, deadline, cancellation, a bug) the caller
gets exactly one terminal message: a `ChatResponse`, a `StreamEnd`, or an
`ErrorReply`; streams are then closed with the empty ADR-47 sentinel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

import structlog
from nats.aio.client import Client as NATS

from executor.backends.base import Backend, Completion, Delta, Finish, StreamEvent
from executor.cache.memory import cache_key, cacheable
from protocol import subjects as subj
from protocol.errors import (
    BackendError,
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    JobQueued,
    LloomError,
    ModelNotFound,
    ResponseTooLarge,
    StreamInterrupted,
)
from protocol.messages import (
    ChatRequest,
    ChatResponse,
    ErrorReply,
    FinishReason,
    StreamChunk,
    StreamEnd,
    Usage,
    encoder,
    error_to_wire,
)
from protocol.receipts import Outcome, SignedReceipt

if TYPE_CHECKING:
    from executor.jobs.node import ExecutorNode

log = structlog.get_logger(logger_name=__name__)

_SENTINEL = b""


class JobBase:
    """What the node keeps of every job, whatever its kind: who asked, until when, and how to
    stop it (cancel subject, departed caller, drain); `run()` then tells the caller why."""

    __slots__ = ("_client", "_node", "_payload", "_started_ms", "cancel_reason", "deadline", "id", "liveness",
                 "reply", "request", "started", "task")  # fmt: skip

    def __init__(self, node: ExecutorNode, job_id: str, request: object, reply: str, deadline: float, *,
                 liveness: bool, payload: bytes, client: str | None) -> None:  # fmt: skip
        self._node = node
        self.id = job_id
        self.request = request
        self.reply = reply
        self.deadline = deadline
        self.started = asyncio.get_running_loop().time()
        self._started_ms = time.time_ns() // 1_000_000
        self._payload = payload  # exactly as received: the receipt hashes it
        self._client = client
        self.liveness = liveness
        self.cancel_reason: LloomError | None = None
        self.task: asyncio.Task[None] | None = None

    def cancel(self, reason: LloomError) -> None:
        """Stop the job (and its backend call); the caller is told `reason`."""
        if self.task is not None and not self.task.done() and self.cancel_reason is None:
            self.cancel_reason = reason
            self.task.cancel()


class Job(JobBase):
    """A chat completion, unary or streamed."""

    __slots__ = ("_completion_tokens", "_parts", "_ttft", "missed_pings", "sink")
    request: ChatRequest

    def __init__(
        self,
        node: ExecutorNode,
        job_id: str,
        request: ChatRequest,
        reply: str,
        deadline: float,
        *,
        liveness: bool,
        payload: bytes = b"",
        client: str | None = None,
        sink: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(node, job_id, request, reply, deadline, liveness=liveness, payload=payload, client=client)
        # Where the reply goes instead of `reply` (a queued job's result goes to the results bucket).
        self.sink = sink
        self._parts: list[str] = []  # a stream's text so far, for its receipt
        self.missed_pings = 0
        self._ttft: float | None = None
        self._completion_tokens = 0

    async def run(self) -> None:
        node = self._node
        err: LloomError | None = None
        try:
            async with asyncio.timeout_at(self.deadline):
                self._check()
                if self.request.stream:
                    await self._run_stream(node.backend, node.nc)
                else:
                    await self._run_unary(node.backend, node.nc)
        except TimeoutError:
            err = DeadlineExceeded(
                f"job did not finish within the caller's deadline"
                f" ({self.deadline - self.started:.3g}s) on {node.backend.name}"
            )
        except LloomError as e:
            err = e
        except asyncio.CancelledError:
            if self.cancel_reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            err = self.cancel_reason
        except Exception:
            # The caller gets a code, never a repr: internals stay in our log.
            log.exception("job failed", job_id=self.id, model=self.request.model)
            err = InternalError(f"internal error in executor {node.id}; job {self.id} is in its log")
        elapsed = asyncio.get_running_loop().time() - self.started
        if err is None:
            node.stats.completed += 1
            node.perf.record(
                self.request.model, ok=True, seconds=elapsed, completion_tokens=self._completion_tokens, ttft_s=self._ttft
            )
            return
        node.stats.count_error(err)
        if not isinstance(err, (InvalidRequest, Cancelled)):  # the caller's doing, not the model's
            node.perf.record(self.request.model, ok=False, seconds=elapsed)
        if not isinstance(err, Cancelled):
            log.info("job error", job_id=self.id, model=self.request.model, code=err.code.value, error=err.message)
        if self._should_queue(err):
            err = await self._enqueue(err)
        receipt = None
        if self._parts:  # a stream that ended early is billed for what it produced
            outcome: Outcome = "cancelled" if isinstance(err, (Cancelled, DeadlineExceeded)) else "failed"
            try:
                receipt = await self._receipt(outcome, None, self.request.model, None, "".join(self._parts))
            except Exception:
                log.exception("receipt for an interrupted stream failed", job_id=self.id)
        if self.sink is not None:
            await self.sink(encoder.encode(_error_wire(node, err, self.id, receipt)))
            return
        await send_error(node, self.reply, err, job_id=self.id, stream=self.request.stream, receipt=receipt)

    def _should_queue(self, err: LloomError) -> bool:
        """A unary job that no backend could serve, for a model whose fallback is `queue`."""
        queue = self._node.job_queue
        return (
            queue is not None and self.sink is None and not self.request.stream and not self._parts
            and isinstance(err, BackendError) and err.retryable and queue.is_fallback_for(self.request.model)
        )  # fmt: skip

    async def _enqueue(self, err: LloomError) -> LloomError:
        queue = self._node.job_queue
        assert queue is not None
        try:
            await queue.enqueue(self.id, self.request.model, self._payload, self._client)
        except Exception as e:  # JetStream away: the caller gets the backend's error, as without a queue
            log.warning("could not queue the job", job_id=self.id, error=str(e) or type(e).__name__)
            return err
        log.info("job queued", job_id=self.id, model=self.request.model, reason=err.message)
        return JobQueued(
            f"no backend can serve {self.request.model!r} now ({err.message}); job {self.id} waits in the durable"
            " queue: await it with LloomClient.result(job_id) or `lloom result <job id>`",
            job_id=self.id,
        )

    def _check(self) -> None:
        node = self._node
        request = self.request
        if request.model not in node.models:
            raise ModelNotFound(
                f"executor {node.id} does not serve model {request.model!r}", available_models=sorted(node.models)
            )
        if request.max_tokens is not None and request.max_tokens > node.config.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens={request.max_tokens} is over this executor's limit of {node.config.max_tokens_cap}"
            )

    async def _receipt(
        self,
        outcome: Outcome,
        finish_reason: str | None,
        model: str,
        usage: Usage | None,
        text: str,
        *,
        cached: bool = False,
    ) -> SignedReceipt | None:
        node = self._node
        if node.receipts is None:
            return None
        return await node.receipts.issue(
            job_id=self.id,
            client=self._client,
            model=model,
            backend=node.backend_kind,
            outcome=outcome,
            finish_reason=finish_reason,
            usage=node.receipts.usage(self.id, self.request, usage, text, len(self._parts)),
            started_at_ms=self._started_ms,
            ttft_ms=None if self._ttft is None else int(self._ttft * 1000),
            request=self._payload,
            response_text=text,
            cached=cached,
        )

    async def _cache_lookup(self) -> tuple[bytes | None, Completion | None]:
        node = self._node
        cache = node.cache
        if cache is None or not cacheable(self.request):
            return None, None
        key = cache_key(self.request)
        hit = cache.get(key)
        if hit is None and node.shared_cache is not None:
            hit = await node.shared_cache.get(key)
            if hit is not None:
                cache.put(key, hit)
        return key, hit

    def _cache_store(self, key: bytes | None, result: Completion) -> None:
        # Only whole, as-asked answers: never a degraded or cut-short one.
        if key is not None and self._node.cache is not None and not result.degraded:
            if result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                self._node.cache.put(key, result)
                if self._node.shared_cache is not None:
                    self._node.shared_cache.put(key, result)

    async def _run_unary(self, backend: Backend, nc: NATS) -> None:
        key, hit = await self._cache_lookup()
        result = hit or await backend.complete(self.request)
        if hit is None:
            self._cache_store(key, result)
        receipt = await self._receipt(
            "completed", result.finish_reason.value, result.model, result.usage, result.content, cached=hit is not None
        )
        payload = encoder.encode(
            ChatResponse(
                job_id=self.id,
                executor_id=self._node.id,
                model=result.model,
                content=result.content,
                finish_reason=result.finish_reason,
                usage=result.usage,
                receipt=receipt,
                degraded=result.degraded,
                cached=hit is not None,
            )
        )
        if len(payload) > nc.max_payload:
            raise ResponseTooLarge(
                f"the completion is {len(payload)} bytes, over the NATS max_payload of {nc.max_payload};"
                " ask for it with stream=True"
            )
        if self.sink is not None:
            await self.sink(payload)
        else:
            await nc.publish(self.reply, payload)
        self._completion_tokens = result.usage.completion_tokens

    async def _run_stream(self, backend: Backend, nc: NATS) -> None:
        seq = 0
        finish: Finish | None = None
        key, hit = await self._cache_lookup()
        events = _replay(hit) if hit is not None else backend.stream(self.request)
        try:
            async for event in events:
                if type(event) is Delta:
                    await nc.publish(self.reply, encoder.encode(StreamChunk(seq, event.text)))
                    self._parts.append(event.text)
                    if seq == 0:
                        self._ttft = asyncio.get_running_loop().time() - self.started
                        # nats.py writes from its flusher task; let it run now, or the
                        # first token waits behind every chunk the backend already sent.
                        await asyncio.sleep(0)
                    seq += 1
                else:
                    assert isinstance(event, Finish)
                    finish = event
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        if finish is None:
            raise StreamInterrupted(f"{backend.name} ended the stream without a final event")
        text = "".join(self._parts)
        self._parts = []  # billed below in full; an error after this point is not "early"
        if hit is None:
            self._cache_store(
                key, Completion(model=finish.model, content=text, finish_reason=finish.finish_reason, usage=finish.usage,
                                degraded=finish.degraded)  # fmt: skip
            )
        receipt = await self._receipt(
            "completed", finish.finish_reason.value, finish.model, finish.usage, text, cached=hit is not None
        )
        end = StreamEnd(
            job_id=self.id,
            executor_id=self._node.id,
            model=finish.model,
            finish_reason=finish.finish_reason,
            usage=finish.usage,
            chunks=seq,
            receipt=receipt,
            degraded=finish.degraded,
            cached=hit is not None,
        )
        await nc.publish(self.reply, encoder.encode(end))
        await nc.publish(self.reply, _SENTINEL)
        self._completion_tokens = finish.usage.completion_tokens



async def send_error(
    node: ExecutorNode,
    reply: str,
    err: LloomError,
    *,
    job_id: str | None,
    stream: bool,
    receipt: SignedReceipt | None = None,
) -> None:
    """Answer `reply` with `err` (and close the stream); never raises, a failed reply is only logged."""
    payload = encoder.encode(_error_wire(node, err, job_id, receipt))
    headers = {
        subj.HDR_SERVICE_ERROR: err.message[:200].replace("\r", " ").replace("\n", " "),
        subj.HDR_SERVICE_ERROR_CODE: str(err.status),
    }
    try:
        await node.nc.publish(reply, payload, headers=headers)
        if stream:
            await node.nc.publish(reply, _SENTINEL)
    except Exception as e:  # the connection may be gone; the job is over either way
        log.warning("could not send error reply", job_id=job_id, code=err.code.value, error=str(e))


def _error_wire(node: ExecutorNode, err: LloomError, job_id: str | None, receipt: SignedReceipt | None) -> ErrorReply:
    wire = error_to_wire(err, job_id=job_id, executor_id=node.id)
    return wire if receipt is None else msgspec.structs.replace(wire, receipt=receipt)


async def _replay(hit: Completion) -> AsyncIterator[StreamEvent]:
    """A cached answer as a stream: its text in one chunk, then its end."""
    if hit.content:
        yield Delta(hit.content)
    yield Finish(model=hit.model, finish_reason=hit.finish_reason, usage=hit.usage)
