"""What every job shares, whatever its kind: identity, deadline, cancellation, and one guarded run.

`JobBase.run()` is the one place that turns whatever happened into exactly one final
answer for the caller: the kind's `_work()` result, or a typed error for a deadline, a
cancellation (also one that arrived before the job's task first ran), a `LloomError`
from the backend or the checks, or a bug (a code and the job id, never a repr). It binds
the job's log context (job id, model, backend, executor) once, so every line logged while
the job runs carries it. Kinds override `_work()` and, where they need to, `_on_error()`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog

from executor.jobs.context import JobContext, ReplyChannel, error_headers
from protocol.errors import Cancelled, DeadlineExceeded, InternalError, LloomError
from protocol.messages import ErrorReply, encoder, error_to_wire
from protocol.receipts import SignedReceipt
from protocol.status import JobStats

log = structlog.get_logger(logger_name=__name__)


class JobBase:
    """A job the node tracks: who asked, until when, and how to stop it."""

    __slots__ = ("_client", "_payload", "_running", "_started_ms", "cancel_reason", "channel", "ctx", "deadline",
                 "error", "id", "liveness", "missed_pings", "request", "started", "task")  # fmt: skip

    def __init__(self, ctx: JobContext, job_id: str, request: msgspec.Struct, channel: ReplyChannel, deadline: float,
                 *, liveness: bool = False, payload: bytes = b"", client: str | None = None) -> None:  # fmt: skip
        self.ctx = ctx
        self.id = job_id
        self.request = request
        self.channel = channel
        self.deadline = deadline
        self.started = asyncio.get_running_loop().time()
        self._started_ms = time.time_ns() // 1_000_000
        self._payload = payload  # exactly as received: the receipt hashes it
        self._client = client
        self.liveness = liveness  # the caller answers pings (long jobs are given up when it is gone)
        self.missed_pings = 0
        self.cancel_reason: LloomError | None = None
        self.error: LloomError | None = None  # how the job ended, once it has (None: it succeeded)
        self.task: asyncio.Task[None] | None = None
        self._running = False

    @property
    def model(self) -> str:
        return self.request.model  # type: ignore[attr-defined, no-any-return]

    def cancel(self, reason: LloomError) -> None:
        """Stop the job (and its backend call); the caller is told `reason`."""
        if self.cancel_reason is not None or self.task is None or self.task.done():
            return
        self.cancel_reason = reason
        if self._running:
            self.task.cancel()
        # Not yet started: cancelling the task now would drop it before it could answer;
        # run() sees the reason first thing instead.

    async def run(self) -> None:
        self._running = True
        ctx = self.ctx
        structlog.contextvars.bind_contextvars(
            job_id=self.id, model=self.model, backend=ctx.backend_kind, executor_id=ctx.executor_id
        )
        err: LloomError | None = self.cancel_reason
        if err is None:
            try:
                async with asyncio.timeout_at(self.deadline):
                    await self._work()
            except TimeoutError:
                err = DeadlineExceeded(
                    f"the job did not finish within the caller's deadline ({self.deadline - self.started:.3g}s)"
                    f" on {ctx.backend.name}"
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
                log.exception("job failed")
                err = InternalError(f"internal error in executor {ctx.executor_id}; job {self.id} is in its log")
        elapsed = asyncio.get_running_loop().time() - self.started
        if err is None:
            ctx.stats.completed += 1
            self._on_success(elapsed)
            return
        self.error = err
        count_error(ctx.stats, err)
        if not isinstance(err, Cancelled):
            log.info("job error", code=err.code.value, error=err.message)
        await self._on_error(err, elapsed)

    async def _work(self) -> None:
        raise NotImplementedError

    def _on_success(self, elapsed: float) -> None:
        return None

    async def _on_error(self, err: LloomError, elapsed: float) -> None:
        await send_error(self.ctx, self.channel, err, job_id=self.id, stream=False)


def count_error(stats: JobStats, err: LloomError) -> None:
    if isinstance(err, Cancelled):
        stats.cancelled += 1
    else:
        stats.failed += 1


async def send_error(
    ctx: JobContext,
    channel: ReplyChannel,
    err: LloomError,
    *,
    job_id: str | None,
    stream: bool,
    receipt: SignedReceipt | None = None,
) -> None:
    """Answer with `err` (and close the stream); never raises, a failed reply is only logged."""
    try:
        wire = error_wire(ctx, err, job_id, receipt)
        await channel.send(encoder.encode(wire), error_headers(wire.message, err.status))
        if stream:
            await channel.end()
    except Exception as e:  # the connection may be gone; the job is over either way
        log.warning("could not send error reply", code=err.code.value, error=str(e))


def error_wire(ctx: JobContext, err: LloomError, job_id: str | None, receipt: SignedReceipt | None) -> ErrorReply:
    wire = error_to_wire(err, job_id=job_id, executor_id=ctx.executor_id)
    if ctx.masker is not None:  # a message may quote a backend that quoted our key: never send a secret
        masked = ctx.masker.mask(wire.message)
        if masked != wire.message:
            wire = msgspec.structs.replace(wire, message=masked)
    return wire if receipt is None else msgspec.structs.replace(wire, receipt=receipt)
