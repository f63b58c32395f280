"""One embedding job on the node: through the batcher to the backend, vectors and receipt back.

It lives in the node's job table beside chat jobs (capacity, cancel, drain and
deadlines work the same); it has no stream and no liveness pings (embeddings
are short).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec
import structlog

from executor.backends.base import EmbeddingBackend, Embeddings
from executor.batcher import Share
from executor.job import send_error
from protocol.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    LloomError,
    ModelNotFound,
    ResponseTooLarge,
)
from protocol.messages import EmbeddingRequest, EmbeddingResponse, Usage, encoder
from protocol.receipts import ReceiptUsage

if TYPE_CHECKING:
    from executor.node import ExecutorNode

log = structlog.get_logger(logger_name=__name__)
# Room for everything in a reply besides the vectors (ids, usage, a receipt).
_ENVELOPE = 4096


class EmbedJob:
    __slots__ = ("_client", "_node", "_payload", "_started_ms", "cancel_reason", "deadline", "id", "liveness", "reply",
                 "request", "started", "task")  # fmt: skip

    def __init__(self, node: ExecutorNode, job_id: str, request: EmbeddingRequest, reply: str, deadline: float, *,
                 payload: bytes, client: str | None) -> None:  # fmt: skip
        self._node = node
        self.id = job_id
        self.request = request
        self.reply = reply
        self.deadline = deadline
        self.started = asyncio.get_running_loop().time()
        self._started_ms = time.time_ns() // 1_000_000
        self._payload = payload
        self._client = client
        self.liveness = False
        self.cancel_reason: LloomError | None = None
        self.task: asyncio.Task[None] | None = None

    def cancel(self, reason: LloomError) -> None:
        if self.task is not None and not self.task.done() and self.cancel_reason is None:
            self.cancel_reason = reason
            self.task.cancel()

    async def run(self) -> None:
        node = self._node
        try:
            try:
                async with asyncio.timeout_at(self.deadline):
                    share = await self._embed()
            except TimeoutError:
                raise DeadlineExceeded(
                    f"embeddings did not finish within the caller's deadline ({self.deadline - self.started:.3g}s)"
                ) from None
            except asyncio.CancelledError:
                if self.cancel_reason is None:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                raise self.cancel_reason from None
            await self._reply(share)
            node.stats.completed += 1
        except LloomError as err:
            node.stats.count_error(err)
            await send_error(node, self.reply, err, job_id=self.id, stream=False)
        except Exception:
            log.exception("embedding job failed", job_id=self.id, model=self.request.model)
            err = InternalError(f"internal error in executor {node.id}; job {self.id} is in its log")
            node.stats.count_error(err)
            await send_error(node, self.reply, err, job_id=self.id, stream=False)

    async def _embed(self) -> Share:
        node = self._node
        request = self.request
        if request.model not in node.models:
            raise ModelNotFound(
                f"executor {node.id} does not serve model {request.model!r}", available_models=sorted(node.models)
            )
        if node.batcher is not None:
            return await node.batcher.embed(request.model, request.input, request.dimensions)
        if not isinstance(node.backend, EmbeddingBackend):
            raise InvalidRequest(f"{node.backend.name} does not compute embeddings")
        result: Embeddings = await node.backend.embed(request.model, request.input, request.dimensions)
        return Share(result, 1, False)

    async def _reply(self, share: Share) -> None:
        node = self._node
        result = share.embeddings
        tokens = result.prompt_tokens
        vectors_json = msgspec.json.encode(result.vectors)
        if len(vectors_json) + _ENVELOPE > node.nc.max_payload:  # before the receipt: nothing is billed
            raise ResponseTooLarge(
                f"{len(self.request.input)} embeddings are {len(vectors_json)} bytes, over the NATS max_payload of"
                f" {node.nc.max_payload}; send fewer inputs per request"
            )
        receipt = None
        if node.receipts is not None:
            counted_by = "estimate" if result.estimated else "backend-share" if share.apportioned else "backend"
            receipt = await node.receipts.issue(
                job_id=self.id, client=self._client, model=result.model, backend=node.backend_kind,
                outcome="completed", finish_reason=None,
                usage=ReceiptUsage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens, counted_by=counted_by),
                started_at_ms=self._started_ms, ttft_ms=None, request=self._payload,
                response_text=vectors_json.decode(),
            )  # fmt: skip
        payload = encoder.encode(
            EmbeddingResponse(
                job_id=self.id,
                executor_id=node.id,
                model=result.model,
                embeddings=result.vectors,
                usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens, estimated=result.estimated),
                receipt=receipt,
                batched_with=share.batched_with,
            )
        )
        await node.nc.publish(self.reply, payload)
