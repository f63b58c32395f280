"""One job: check it, run it on the backend, and put the result or error on the wire.

A `Job` is created by the node for a decoded request and runs in its own task.
Whatever happens (backend failure, deadline, cancellation, a bug) the caller
gets exactly one terminal message: a `ChatResponse`, a `StreamEnd`, or an
`ErrorReply`; streams are then closed with the empty ADR-47 sentinel.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from nats.aio.client import Client as NATS

from executor.backends.base import Backend, Delta, Finish
from protocol import subjects as subj
from protocol.errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    LloomError,
    ModelNotFound,
    ResponseTooLarge,
    StreamInterrupted,
)
from protocol.messages import ChatRequest, ChatResponse, StreamChunk, StreamEnd, encoder, error_to_wire

if TYPE_CHECKING:
    from executor.node import ExecutorNode

log = structlog.get_logger(logger_name=__name__)

_SENTINEL = b""


class Job:
    __slots__ = (
        "id", "request", "reply", "deadline", "started", "liveness", "missed_pings", "cancel_reason",
        "task", "_node", "_ttft", "_completion_tokens",
    )  # fmt: skip

    def __init__(
        self, node: ExecutorNode, job_id: str, request: ChatRequest, reply: str, deadline: float, *, liveness: bool
    ) -> None:
        self._node = node
        self.id = job_id
        self.request = request
        self.reply = reply
        self.deadline = deadline
        self.started = asyncio.get_running_loop().time()
        self.liveness = liveness
        self.missed_pings = 0
        self.cancel_reason: LloomError | None = None
        self.task: asyncio.Task[None] | None = None
        self._ttft: float | None = None
        self._completion_tokens = 0

    def cancel(self, reason: LloomError) -> None:
        """Stop the job (and its backend call); the caller is told `reason`."""
        if self.task is not None and not self.task.done() and self.cancel_reason is None:
            self.cancel_reason = reason
            self.task.cancel()

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
        await self._send_error(err)

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

    async def _run_unary(self, backend: Backend, nc: NATS) -> None:
        result = await backend.complete(self.request)
        payload = encoder.encode(
            ChatResponse(
                job_id=self.id,
                executor_id=self._node.id,
                model=result.model,
                content=result.content,
                finish_reason=result.finish_reason,
                usage=result.usage,
            )
        )
        if len(payload) > nc.max_payload:
            raise ResponseTooLarge(
                f"the completion is {len(payload)} bytes, over the NATS max_payload of {nc.max_payload};"
                " ask for it with stream=True"
            )
        await nc.publish(self.reply, payload)
        self._completion_tokens = result.usage.completion_tokens

    async def _run_stream(self, backend: Backend, nc: NATS) -> None:
        seq = 0
        finish: Finish | None = None
        events = backend.stream(self.request)
        try:
            async for event in events:
                if type(event) is Delta:
                    await nc.publish(self.reply, encoder.encode(StreamChunk(seq, event.text)))
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
        end = StreamEnd(
            job_id=self.id,
            executor_id=self._node.id,
            model=finish.model,
            finish_reason=finish.finish_reason,
            usage=finish.usage,
            chunks=seq,
        )
        await nc.publish(self.reply, encoder.encode(end))
        await nc.publish(self.reply, _SENTINEL)
        self._completion_tokens = finish.usage.completion_tokens

    async def _send_error(self, err: LloomError) -> None:
        await send_error(self._node, self.reply, err, job_id=self.id, stream=self.request.stream)


async def send_error(node: ExecutorNode, reply: str, err: LloomError, *, job_id: str | None, stream: bool) -> None:
    """Answer `reply` with `err` (and close the stream); never raises, a failed reply is only logged."""
    payload = encoder.encode(error_to_wire(err, job_id=job_id, executor_id=node.id))
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
