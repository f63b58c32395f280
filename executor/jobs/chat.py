"""A chat completion job: check it, run it on the backend (or the cache), answer, and bill it.

A `Job` is created by the node for a decoded request and runs in its own task
(guarded by `JobBase.run`). The caller gets exactly one terminal message: a
`ChatResponse`, a `StreamEnd`, or an `ErrorReply`; streams are then closed with
the empty ADR-47 sentinel. A stream's chunks carry text, reasoning and pieces of tool
calls as the backend sends them (a chunk with only reasoning or tool-call pieces has an
empty `delta`). A unary job no backend could serve goes to the durable
queue when its model's fallback says so; a stream cut short is billed for what
it produced.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import structlog

from executor.backends.base import Backend, Completion, Delta, Finish, StreamEvent
from executor.cache.memory import cache_key, cacheable
from executor.jobs.base import JobBase, send_error
from executor.jobs.context import JobContext, ReplyChannel
from executor.jobs.image_urls import check_image_urls
from protocol import subjects as subj
from protocol.chat_checks import check_chat_request
from protocol.chat_types import ToolCallDelta
from protocol.errors import (
    BackendError,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    JobQueued,
    LloomError,
    ReceiptsUnavailable,
    ResponseTooLarge,
    StreamInterrupted,
)
from protocol.messages import ChatRequest, ChatResponse, FinishReason, StreamChunk, StreamEnd, Usage, encoder
from protocol.receipts import Outcome, SignedReceipt
from protocol.verify import signed_answer

log = structlog.get_logger(logger_name=__name__)


class Job(JobBase):
    """A chat completion, unary or streamed."""

    __slots__ = ("_completion_tokens", "_parts", "_ttft")
    request: ChatRequest

    def __init__(self, ctx: JobContext, job_id: str, request: ChatRequest, channel: ReplyChannel, deadline: float,
                 *, liveness: bool = False, payload: bytes = b"", client: str | None = None,
                 trace: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(ctx, job_id, request, channel, deadline, liveness=liveness, payload=payload, client=client,
                         trace=trace)  # fmt: skip
        self._parts: list[str] = []  # a stream's text so far, for its receipt
        self._ttft: float | None = None
        self._completion_tokens = 0

    async def _work(self) -> None:
        request = self.request
        check_chat_request(request)  # the rules between fields: the same typed error the client raises
        self.ctx.check(request.model, request.max_tokens or request.max_completion_tokens)
        self.ctx.check_features(request)  # before the cache too: a hit must not serve what is refused
        check_image_urls(request, self.ctx.image_urls)  # before the backend could be made to fetch one (SSRF)
        if self.request.stream:
            await self._run_stream(self.ctx.backend)
        else:
            await self._run_unary(self.ctx.backend)

    def _first_token_s(self) -> float | None:
        return self._ttft

    def _backend_span(self, hit: Completion | None) -> AbstractContextManager[Any]:
        """The backend call's client span (its HTTP request carries its trace context), when traced."""
        if self.trace is None or hit is not None:
            return _UNTRACED
        return self.trace.backend_call(f"chat {self.request.model}", **{
            "gen_ai.operation.name": "chat", "gen_ai.request.model": self.request.model,
            "gen_ai.system": self.ctx.backend_kind, "server.address": self.ctx.backend.name})  # fmt: skip

    def _on_success(self, elapsed: float) -> None:
        self.ctx.perf.record(self.request.model, ok=True, seconds=elapsed, completion_tokens=self._completion_tokens,
                             ttft_s=self._ttft)  # fmt: skip

    async def _on_error(self, err: LloomError, elapsed: float) -> None:
        if not isinstance(err, (InvalidRequest, Cancelled, ReceiptsUnavailable)):  # not the model's doing
            self.ctx.perf.record(self.request.model, ok=False, seconds=elapsed)
        if self._should_queue(err):
            err = await self._enqueue(err)
        receipt = None
        if self._parts:  # a stream that ended early is billed for what it produced
            outcome: Outcome = "cancelled" if isinstance(err, (Cancelled, DeadlineExceeded)) else "failed"
            try:
                receipt = await self._receipt(outcome, None, self.request.model, None, "".join(self._parts))
            except LloomError as e:  # receipts unavailable: the caller gets its error, with no receipt
                log.warning("no receipt for an interrupted stream", error=e.message)
            except Exception:
                log.exception("receipt for an interrupted stream failed")
        await send_error(self.ctx, self.channel, err, job_id=self.id, stream=self.request.stream, receipt=receipt)

    def _should_queue(self, err: LloomError) -> bool:
        """A unary job that no backend could serve, for a model whose fallback is `queue`."""
        queue = self.ctx.queue
        return (
            queue is not None and self.channel.subject is not None and not self.request.stream and not self._parts
            and not self.channel.sealed  # the durable queue holds requests in clear
            and isinstance(err, BackendError) and err.retryable and queue.is_fallback_for(self.request.model)
        )  # fmt: skip

    async def _enqueue(self, err: LloomError) -> LloomError:
        queue = self.ctx.queue
        assert queue is not None
        try:
            await queue.enqueue(self.id, self.request.model, self._payload, self._client)
        except Exception as e:  # JetStream away: the caller gets the backend's error, as without a queue
            log.warning("could not queue the job", error=str(e) or type(e).__name__)
            return err
        log.info("job queued", reason=err.message)
        return JobQueued(
            f"no backend can serve {self.request.model!r} now ({err.message}); job {self.id} waits in the durable"
            " queue: await it with LloomClient.result(job_id) or `lloom result <job id>`",
            job_id=self.id,
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
        signed: bytes | None = None,
    ) -> SignedReceipt | None:
        """The job's signed receipt, as the JSON its outbox line holds (`msgspec.Raw`, which a reply's
        encoder copies as it is: the receipt is encoded once), or None with receipts off."""
        receipts = self.ctx.receipts
        if receipts is None:
            return None
        with _UNTRACED if self.trace is None else self.trace.child("receipt", **{"lloom.receipt.outcome": outcome}):
            return await self._issue(receipts, outcome, finish_reason, model, usage, text, cached=cached, signed=signed)

    async def _issue(self, receipts: Any, outcome: Outcome, finish_reason: str | None, model: str, usage: Usage | None,
                     text: str, *, cached: bool, signed: bytes | None) -> SignedReceipt:  # fmt: skip
        # A Raw stands in for the SignedReceipt it encodes: replies only encode it.
        return await receipts.issue_encoded(  # type: ignore[no-any-return]
            job_id=self.id,
            client=self._client,
            model=model,
            backend=self.ctx.backend_kind,
            outcome=outcome,
            finish_reason=finish_reason,
            usage=receipts.usage(self.id, self.request, usage, text, len(self._parts)),
            started_at_ms=self._started_ms,
            ttft_ms=None if self._ttft is None else int(self._ttft * 1000),
            request=self._payload,
            response_text=text,
            cached=cached,
            signed=signed,
            alone=self.ctx.in_flight() <= 1,
        )

    async def _cache_lookup(self) -> tuple[bytes | None, Completion | None]:
        cache = self.ctx.cache
        # A sealed job's answer is cached nowhere: the shared bucket is readable on the bus, and a
        # local hit would tell whoever guesses the prompt that someone asked it.
        if cache is None or not cacheable(self.request) or self.channel.sealed:
            return None, None
        if self.trace is not None:
            with self.trace.child("cache lookup") as span:
                key, hit = await self._cache_get(cache)
                span.set_attribute("lloom.cache.hit", hit is not None)
                return key, hit
        return await self._cache_get(cache)

    async def _cache_get(self, cache: Any) -> tuple[bytes, Completion | None]:
        key = cache_key(self.request)
        hit = cache.get(key)
        if hit is None and self.ctx.shared_cache is not None:
            hit = await self.ctx.shared_cache.get(key)
            if hit is not None:
                cache.put(key, hit)
        return key, hit

    def _cache_store(self, key: bytes | None, result: Completion) -> None:
        # Only whole, as-asked answers: never a degraded or cut-short one.
        cache = self.ctx.cache
        if key is not None and cache is not None and not result.degraded:
            if result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                cache.put(key, result)
                if self.ctx.shared_cache is not None:
                    self.ctx.shared_cache.put(key, result)

    async def _run_unary(self, backend: Backend) -> None:
        key, hit = await self._cache_lookup()
        if hit is None:
            t0 = self.loop.time()
            with self._backend_span(hit):
                result = await backend.complete(self.request)
            self.backend_s = self.loop.time() - t0
            self._cache_store(key, result)
        else:
            result = hit
        calls = encoder.encode(result.tool_calls) if result.tool_calls else None
        receipt = await self._receipt(
            "completed", result.finish_reason.value, result.model, result.usage, result.content, cached=hit is not None,
            signed=signed_answer(result.content, result.reasoning_content, calls),
        )
        payload = encoder.encode(
            ChatResponse(
                job_id=self.id,
                executor_id=self.ctx.executor_id,
                model=result.model,
                content=result.content,
                finish_reason=result.finish_reason,
                usage=result.usage,
                receipt=receipt,
                degraded=result.degraded,
                cached=hit is not None,
                tool_calls=result.tool_calls,
                reasoning_content=result.reasoning_content,
                logprobs=result.logprobs,
            )
        )
        if len(payload) > self.ctx.limits.max_payload:
            raise ResponseTooLarge(
                f"the completion is {len(payload)} bytes, over the NATS max_payload of {self.ctx.limits.max_payload};"
                " ask for it with stream=True"
            )
        await self.channel.send(payload)
        self._completion_tokens = result.usage.completion_tokens
        self.tokens = (result.usage.prompt_tokens, result.usage.completion_tokens)

    async def _run_stream(self, backend: Backend) -> None:
        seq = 0
        finish: Finish | None = None
        key, hit = await self._cache_lookup()
        events = _replay(hit) if hit is not None else backend.stream(self.request)
        reasoning: list[str] = []  # kept for the cache, which replays it, and the receipt
        tool_pieces: list[ToolCallDelta] = []  # for the receipt
        send = self.channel.send
        t0 = self.loop.time()
        with self._backend_span(hit) as span:
            try:
                async for event in events:
                    if type(event) is Delta:
                        # The first chunk names this executor (a header), so a relay can say who serves
                        # the stream before its end (the gateway's X-Lloom-Executor); the end's receipt proves it.
                        await send(encoder.encode(StreamChunk(seq, event.text, event.reasoning, event.tool_calls,
                                                              event.logprobs)),
                                   None if seq else {subj.HDR_EXECUTOR: self.ctx.executor_id})  # fmt: skip
                        self._parts.append(event.text)
                        if event.reasoning is not None:
                            reasoning.append(event.reasoning)
                        if event.tool_calls is not None:
                            tool_pieces += event.tool_calls
                        if seq == 0:
                            self._ttft = self.loop.time() - self.started
                            if span is not None:
                                span.add_event("gen_ai.first_token")
                            # nats.py writes from its flusher task; let it run now, or the
                            # first token waits behind every chunk the backend already sent.
                            await asyncio.sleep(0)
                        seq += 1
                    else:
                        assert isinstance(event, Finish)
                        finish = event
            finally:
                await events.aclose()  # type: ignore[attr-defined]
        if hit is None:
            self.backend_s = self.loop.time() - t0
        if finish is None:
            raise StreamInterrupted(f"{backend.name} ended the stream without a final event")
        text = "".join(self._parts)
        self._parts = []  # billed below in full; an error after this point is not "early"
        if hit is None:
            self._cache_store(
                key, Completion(model=finish.model, content=text, finish_reason=finish.finish_reason, usage=finish.usage,
                                degraded=finish.degraded, reasoning_content="".join(reasoning) or None)  # fmt: skip
            )
        receipt = await self._receipt(
            "completed", finish.finish_reason.value, finish.model, finish.usage, text, cached=hit is not None,
            signed=signed_answer(text, "".join(reasoning), encoder.encode(tool_pieces) if tool_pieces else None),
        )
        end = StreamEnd(
            job_id=self.id,
            executor_id=self.ctx.executor_id,
            model=finish.model,
            finish_reason=finish.finish_reason,
            usage=finish.usage,
            chunks=seq,
            receipt=receipt,
            degraded=finish.degraded,
            cached=hit is not None,
        )
        await send(encoder.encode(end))
        await self.channel.end()
        self._completion_tokens = finish.usage.completion_tokens
        self.tokens = (finish.usage.prompt_tokens, finish.usage.completion_tokens)



_UNTRACED: AbstractContextManager[Any] = nullcontext()  # reusable: enters as None, holds nothing


async def _replay(hit: Completion) -> AsyncIterator[StreamEvent]:
    """A cached answer as a stream: its reasoning and its text in one chunk each, then its end."""
    if hit.reasoning_content:
        yield Delta("", hit.reasoning_content)
    if hit.content:
        yield Delta(hit.content)
    yield Finish(model=hit.model, finish_reason=hit.finish_reason, usage=hit.usage)
