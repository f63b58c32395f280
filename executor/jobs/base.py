"""What every job shares, whatever its kind: identity, deadline, cancellation, and one guarded run.

`JobBase.run()` is the one place that turns whatever happened into exactly one final
answer for the caller: the kind's `_work()` result, or a typed error for a deadline, a
cancellation (also one that arrived before the job's task first ran), a `LloomError`
from the backend or the checks, or a bug (a code and the job id, never a repr). It binds
the job's log context (job id, model, backend, executor, and the trace id when the job
is traced) once, so every line logged while the job runs carries it. When it ends, it makes
the job's one telemetry record (executor/telemetry/recorder.py) and ends its span, if
telemetry is on. Kinds override `_work()` and, where they need to, `_on_error()`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec
import structlog

from executor.jobs.context import JobContext, ReplyChannel, error_headers
from executor.telemetry.recorder import OK
from executor.telemetry.context import passthrough, trace_id_of
from protocol.errors import Cancelled, DeadlineExceeded, InternalError, LloomError
from protocol.messages import ErrorReply, encoder, error_to_wire
from protocol.receipts import SignedReceipt
from protocol.status import JobStats

if TYPE_CHECKING:  # the SDK is imported only when a tracer is configured
    from executor.telemetry.tracing import JobTrace

log = structlog.get_logger(logger_name=__name__)


class JobBase:
    """A job the node tracks: who asked, until when, and how to stop it."""

    __slots__ = ("_carrier", "_client", "_payload", "_running", "_started_ms", "backend_s", "cancel_reason", "channel",
                 "ctx", "deadline", "error", "id", "liveness", "loop", "missed_pings", "request", "started", "task",
                 "tokens", "trace")  # fmt: skip
    operation = "chat"  # gen_ai.operation.name


    def __init__(self, ctx: JobContext, job_id: str, request: msgspec.Struct, channel: ReplyChannel, deadline: float,
                 *, liveness: bool = False, payload: bytes = b"", client: str | None = None,
                 trace: dict[str, str] | None = None) -> None:  # fmt: skip
        self.ctx = ctx
        self.id = job_id
        self.request = request
        self.channel = channel
        self.deadline = deadline
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self._started_ms = time.time_ns() // 1_000_000
        self._payload = payload  # exactly as received: the receipt hashes it
        self._client = client
        self.liveness = liveness  # the caller answers pings (long jobs are given up when it is gone)
        self.missed_pings = 0
        self.cancel_reason: LloomError | None = None
        self.error: LloomError | None = None  # how the job ended, once it has (None: it succeeded)
        self.task: asyncio.Task[None] | None = None
        self._running = False
        self._carrier = trace  # the caller's W3C trace context (telemetry/tracing.trace_headers)
        self.trace: JobTrace | None = None  # the job's spans, when a tracer is configured
        self.tokens: tuple[int, int] | None = None  # (input, output) of a finished job, for metrics
        self.backend_s: float | None = None  # how long its backend call took

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
        if self._carrier is None and ctx.tracer is None:
            structlog.contextvars.bind_contextvars(
                job_id=self.id, model=self.model, backend=ctx.backend_kind, executor_id=ctx.executor_id
            )
        else:
            self._start_trace()
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
        elapsed = self.loop.time() - self.started
        if err is None:
            ctx.stats.completed += 1
            self._on_success(elapsed)
        else:
            self.error = err
            count_error(ctx.stats, err)
            if not isinstance(err, Cancelled):
                log.info("job error", code=err.code.value, error=err.message)
            await self._on_error(err, elapsed)
        if ctx.recorder is not None or self.trace is not None:
            self._record(None if err is None else err.code.value, elapsed)

    def _start_trace(self) -> None:
        """Continue the caller's trace: a span when a tracer is configured, else the context passed on."""
        ctx, carrier = self.ctx, self._carrier
        trace_id = None
        if ctx.tracer is not None:
            self.trace = ctx.tracer.start(
                f"{self.operation} {self.model}", carrier,
                {"gen_ai.operation.name": self.operation, "gen_ai.request.model": self.model,
                 "gen_ai.system": ctx.backend_kind, "lloom.job.id": self.id, "lloom.executor.id": ctx.executor_id},
                self._started_ms * 1_000_000,
            )  # fmt: skip
            self.trace.waited(self._started_ms * 1_000_000)
            trace_id = self.trace.trace_id
        elif carrier is not None:
            passthrough(carrier)
            trace_id = trace_id_of(carrier)
        structlog.contextvars.bind_contextvars(
            job_id=self.id, model=self.model, backend=ctx.backend_kind, executor_id=ctx.executor_id, trace_id=trace_id
        )

    def _record(self, error_type: str | None, elapsed: float) -> None:
        """The job's one metrics record, and the end of its span."""
        tokens = self.tokens
        recorder = self.ctx.recorder
        if recorder is not None:
            recorder.job_done(self.model, self.operation, error_type or OK, elapsed, served=self.ctx.served,
                              backend_s=self.backend_s,
                              ttft_s=self._first_token_s(), input_tokens=tokens and tokens[0],
                              output_tokens=tokens and tokens[1])  # fmt: skip
        if self.trace is not None:
            usage = {} if tokens is None else {"gen_ai.usage.input_tokens": tokens[0],
                                               "gen_ai.usage.output_tokens": tokens[1]}  # fmt: skip
            self.trace.end(error_type, usage)

    def _first_token_s(self) -> float | None:
        return None

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
