"""Jobs for the batchable endpoints (embeddings, legacy text completions) on the node.

They live in the node's job table beside chat jobs (capacity, cancel, drain and
deadlines work the same); they have no stream and no liveness pings (they are
short), and go through the node's `Batcher` when it has one. Each kind says how
to get its result and how to put it on the wire; the rest (deadline, typed
errors, the size check before anything is billed, the receipt) is shared here.
"""

from __future__ import annotations

import msgspec
import structlog

from executor.backends.base import EmbeddingBackend, TextBackend, TextParams
from executor.batching.coalescer import Share, TextShare
from executor.jobs.base import JobBase
from protocol.errors import InvalidRequest, ResponseTooLarge
from protocol.messages import (
    EmbeddingRequest,
    EmbeddingResponse,
    TextRequest,
    TextResponse,
    Usage,
    encoder,
)
from protocol.receipts import ReceiptUsage, SignedReceipt

log = structlog.get_logger(logger_name=__name__)
# Room for everything in a reply besides its content (ids, usage, a receipt).
_ENVELOPE = 4096


class _Done(msgspec.Struct, frozen=True, kw_only=True):
    """What a finished batched job bills and returns."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    counted_by: str
    finish_reason: str | None
    content: bytes  # what the receipt's response hash covers, and what must fit in a reply


class BatchedJob(JobBase):
    __slots__ = ()

    async def _work(self) -> None:
        ctx = self.ctx
        ctx.check(self.model, getattr(self.request, "max_tokens", None))
        done = await self._result()
        self.tokens = (done.prompt_tokens, done.completion_tokens)
        if len(done.content) + _ENVELOPE > ctx.limits.max_payload:  # before the receipt: nothing is billed
            raise ResponseTooLarge(
                f"the result is {len(done.content)} bytes, over the NATS max_payload of {ctx.limits.max_payload};"
                " send less per request"
            )
        await self.channel.send(encoder.encode(self._response(done, await self._receipt(done))))

    async def _receipt(self, done: _Done) -> SignedReceipt | None:
        receipts = self.ctx.receipts
        if receipts is None:
            return None
        total = done.prompt_tokens + done.completion_tokens
        return await receipts.issue(
            job_id=self.id, client=self._client, model=done.model, backend=self.ctx.backend_kind, outcome="completed",
            finish_reason=done.finish_reason,
            usage=ReceiptUsage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                               total_tokens=total, counted_by=done.counted_by),
            started_at_ms=self._started_ms, ttft_ms=None, request=self._payload,
            response_text=done.content.decode(),
        )  # fmt: skip

    async def _result(self) -> _Done:
        raise NotImplementedError

    def _response(self, done: _Done, receipt: SignedReceipt | None) -> msgspec.Struct:
        raise NotImplementedError


def _counted_by(estimated: bool, apportioned: bool) -> str:
    return "estimate" if estimated else "backend-share" if apportioned else "backend"


class EmbedJob(BatchedJob):
    __slots__ = ("_share",)
    operation = "embeddings"
    _share: Share

    async def _result(self) -> _Done:
        ctx, request = self.ctx, self.request
        assert isinstance(request, EmbeddingRequest)
        if ctx.batcher is not None:
            share = await ctx.batcher.embed(request.model, request.input, request.dimensions)
        elif isinstance(ctx.backend, EmbeddingBackend):
            share = Share(await ctx.backend.embed(request.model, request.input, request.dimensions), 1, False)
        else:
            raise InvalidRequest(f"{ctx.backend.name} does not compute embeddings")
        self._share = share
        e = share.embeddings
        return _Done(model=e.model, prompt_tokens=e.prompt_tokens, completion_tokens=0, finish_reason=None,
                     counted_by=_counted_by(e.estimated, share.apportioned), content=msgspec.json.encode(e.vectors))  # fmt: skip

    def _response(self, done: _Done, receipt: SignedReceipt | None) -> EmbeddingResponse:
        e = self._share.embeddings
        return EmbeddingResponse(
            job_id=self.id, executor_id=self.ctx.executor_id, model=done.model, embeddings=e.vectors,
            usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=0, total_tokens=done.prompt_tokens,
                        estimated=e.estimated),
            receipt=receipt, batched_with=self._share.batched_with,
        )  # fmt: skip


class TextJob(BatchedJob):
    __slots__ = ("_share",)
    operation = "text_completion"
    _share: TextShare

    async def _result(self) -> _Done:
        ctx, request = self.ctx, self.request
        assert isinstance(request, TextRequest)
        params = TextParams(request.max_tokens, request.temperature, request.top_p,
                            tuple(request.stop) if request.stop else None)  # fmt: skip
        if ctx.batcher is not None:
            share = await ctx.batcher.complete_text(request.model, request.prompt, params)
        elif isinstance(ctx.backend, TextBackend):
            share = TextShare(await ctx.backend.complete_texts(request.model, [request.prompt], params), 1, False)
        else:
            raise InvalidRequest(f"{ctx.backend.name} does not serve text completions")
        self._share = share
        c = share.completions
        [choice] = c.choices
        return _Done(model=c.model, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                     finish_reason=choice.finish_reason.value, counted_by=_counted_by(c.estimated, share.apportioned),
                     content=choice.text.encode())  # fmt: skip

    def _response(self, done: _Done, receipt: SignedReceipt | None) -> TextResponse:
        c = self._share.completions
        return TextResponse(
            job_id=self.id, executor_id=self.ctx.executor_id, model=done.model, text=c.choices[0].text,
            finish_reason=c.choices[0].finish_reason,
            usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                        total_tokens=done.prompt_tokens + done.completion_tokens, estimated=c.estimated),
            receipt=receipt, batched_with=self._share.batched_with,
        )  # fmt: skip
