"""Typed errors of the Lloom network and their one mapping to wire error codes.

Every failure a peer can observe is a `LloomError` subclass with a stable `code`.
The executor raises them, `to_wire` turns one into an `ErrorReply`, and the client
turns the reply back into the same exception type with `from_wire`, so callers
catch `ModelNotFound` whether it happened locally or three hops away.

    LloomError
    ├── InvalidRequest          bad_request          the request itself is wrong
    │   ├── PayloadTooLarge     payload_too_large    over the server's max_payload
    │   ├── UnsupportedFeature  unsupported_feature  the model here cannot do what was asked (tools, images, n>1)
    │   └── ModelNotFound       model_not_found      not served here / not on the backend
    ├── NoExecutors             no_executors         nobody listens for that model
    ├── ExecutorBusy            busy                 at max_concurrent_jobs; try another (retry_after_s)
    ├── ExecutorLost            executor_lost        no keepalive from the executor running the job
    ├── ShuttingDown            shutting_down        node is draining
    ├── ReceiptsUnavailable     receipts_unavailable cannot record receipts durably; try another
    ├── DeadlineExceeded        deadline_exceeded    the caller's deadline passed
    ├── Cancelled               cancelled            the caller cancelled the job
    ├── ResponseTooLarge        response_too_large   result over max_payload; stream it
    ├── ForgedResult            forged_result        a stored result that its executor did not sign
    ├── UnverifiedReply         unverified_reply     a reply its receipt does not vouch for
    │   └── ReplyForged         reply_forged         only forged replies came (not from who they name)
    ├── BackendError            backend_error        5xx or other backend failure
    │   ├── BackendUnavailable  backend_unavailable  connection refused / reset
    │   ├── BackendAuthFailed   backend_auth         401/403 from the backend
    │   ├── RateLimited         rate_limited         429; carries retry_after_s
    │   ├── BackendTimeout      backend_timeout      backend exceeded timeout_secs
    │   ├── BackendProtocolError backend_protocol    malformed or truncated body
    │   └── StreamInterrupted   stream_interrupted   stream broke after it began
    └── InternalError           internal             a bug; details stay in the node's log
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MODEL_NOT_FOUND = "model_not_found"
    UNSUPPORTED_FEATURE = "unsupported_feature"
    NO_EXECUTORS = "no_executors"
    BUSY = "busy"
    EXECUTOR_LOST = "executor_lost"
    SHUTTING_DOWN = "shutting_down"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    RESPONSE_TOO_LARGE = "response_too_large"
    BACKEND_ERROR = "backend_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_AUTH = "backend_auth"
    RATE_LIMITED = "rate_limited"
    BACKEND_TIMEOUT = "backend_timeout"
    BACKEND_PROTOCOL = "backend_protocol"
    STREAM_INTERRUPTED = "stream_interrupted"
    QUEUED = "queued"
    RESULT_PENDING = "result_pending"
    QUEUE_UNAVAILABLE = "queue_unavailable"
    FORGED_RESULT = "forged_result"
    UNVERIFIED_REPLY = "unverified_reply"
    REPLY_FORGED = "reply_forged"
    RECEIPTS_UNAVAILABLE = "receipts_unavailable"
    INTERNAL = "internal"


class LloomError(Exception):
    """Base of every error that crosses the wire."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    # An HTTP-like status for the `Nats-Service-Error-Code` header, so generic
    # NATS tooling (`nats req`, micro clients) sees a familiar number.
    status: ClassVar[int] = 500
    # Whether sending the same request again (here or elsewhere) may succeed.
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        available_models: list[str] | None = None,
        suggestion: str | None = None,
        job_id: str | None = None,
        executor_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.available_models = available_models
        # For a model nobody serves: the served name closest to the one asked for.
        self.suggestion = suggestion
        # Where it happened, when it happened on an executor.
        self.job_id = job_id
        self.executor_id = executor_id
        # A stream cut short still has a receipt for what it produced (a SignedReceipt).
        self.receipt: object | None = None


class InvalidRequest(LloomError):
    code = ErrorCode.BAD_REQUEST
    status = 400


class PayloadTooLarge(InvalidRequest):
    code = ErrorCode.PAYLOAD_TOO_LARGE
    status = 413


class UnsupportedFeature(InvalidRequest):
    """The request uses something this executor's model does not support (tools, image
    input, json_schema output, reasoning, n > 1), refused before any backend call. Another
    executor announcing the capability may serve it: clients route by announced capabilities."""

    code = ErrorCode.UNSUPPORTED_FEATURE
    status = 422


class ModelNotFound(InvalidRequest):
    code = ErrorCode.MODEL_NOT_FOUND
    status = 404


class NoExecutors(LloomError):
    """Nobody listens for the model (or executor). For a model, raised by the client, the error
    names the models served then (`available_models`) and the closest one (`suggestion`)."""

    code = ErrorCode.NO_EXECUTORS
    status = 503


class ExecutorBusy(LloomError):
    code = ErrorCode.BUSY
    status = 503
    retryable = True


class ExecutorLost(LloomError):
    """The executor running the job went silent (no keepalive, no message) for the client's
    `executor_silence_s`: it died or is cut off. Raised by the client, never sent; the job
    may be retried elsewhere when it had not started answering."""

    code = ErrorCode.EXECUTOR_LOST
    status = 503
    retryable = True


class ShuttingDown(LloomError):
    code = ErrorCode.SHUTTING_DOWN
    status = 503
    retryable = True


class ReceiptsUnavailable(LloomError):
    """The executor cannot record usage receipts durably (its outbox disk is full or failing),
    so it takes no billable jobs until it can; the job was not billed: retry elsewhere."""

    code = ErrorCode.RECEIPTS_UNAVAILABLE
    status = 503
    retryable = True


class DeadlineExceeded(LloomError):
    code = ErrorCode.DEADLINE_EXCEEDED
    status = 504


class Cancelled(LloomError):
    code = ErrorCode.CANCELLED
    status = 499


class JobQueued(LloomError):
    """No backend could serve the job now, so it waits in the durable queue (not an error
    of the job: `LloomClient.result(err.job_id)` awaits its result, `fetch` looks)."""

    code = ErrorCode.QUEUED
    status = 202


class ResultPending(LloomError):
    """A queued job's result is not there (yet) within the time given."""

    code = ErrorCode.RESULT_PENDING
    status = 504


class QueueUnavailable(LloomError):
    """The durable queue (JetStream) did not answer: nothing was stored, or nothing could be read."""

    code = ErrorCode.QUEUE_UNAVAILABLE
    status = 503
    retryable = True


class ForgedResult(LloomError):
    """A queued job's stored result fails its check: unsigned, signed by an untrusted key, signed
    for another job, or its receipt does not match the job or the request sent (raised by the client)."""

    code = ErrorCode.FORGED_RESULT
    status = 502


class ResponseTooLarge(LloomError):
    code = ErrorCode.RESPONSE_TOO_LARGE
    status = 507


class UnverifiedReply(LloomError):
    """The client could not verify a reply with its receipt (protocol/verify.py says why).

    Raised by a stream whose end does not vouch for the text already delivered: that
    text must be treated as unverified (it may have been altered or injected on the way)."""

    code = ErrorCode.UNVERIFIED_REPLY
    status = 502


class ReplyForged(UnverifiedReply):
    """Every reply that came for a job failed verification (no receipt, a receipt signed by a
    key that is not the executor's or not trusted, or one for another request), and no genuine
    one came before the deadline. Forged replies are ignored while the call waits, so racing
    the executor with a fake answer cannot make a call fail early."""

    code = ErrorCode.REPLY_FORGED
    status = 502


class BackendError(LloomError):
    code = ErrorCode.BACKEND_ERROR
    status = 502
    retryable = True


class BackendUnavailable(BackendError):
    code = ErrorCode.BACKEND_UNAVAILABLE
    status = 502


class BackendAuthFailed(BackendError):
    code = ErrorCode.BACKEND_AUTH
    status = 502
    retryable = False


class RateLimited(BackendError):
    code = ErrorCode.RATE_LIMITED
    status = 429


class BackendTimeout(BackendError):
    code = ErrorCode.BACKEND_TIMEOUT
    status = 504


class BackendProtocolError(BackendError):
    code = ErrorCode.BACKEND_PROTOCOL
    status = 502


class StreamInterrupted(BackendError):
    code = ErrorCode.STREAM_INTERRUPTED
    status = 502


class InternalError(LloomError):
    code = ErrorCode.INTERNAL
    status = 500


def _all_subclasses(cls: type[LloomError]) -> list[type[LloomError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


# The one table from wire codes to exception types, built from the classes (the
# abstract base excluded) so that a code cannot exist without its exception.
ERROR_TYPES: dict[ErrorCode, type[LloomError]] = {c.code: c for c in _all_subclasses(LloomError)[1:]}
assert set(ERROR_TYPES) == set(ErrorCode), "every ErrorCode needs exactly one exception class"
assert len(_all_subclasses(LloomError)) - 1 == len(ErrorCode), "no two exception classes may share a code"
