"""Every failure the gateway answers, as an HTTP status and OpenAI's error body, in one table.

The SDKs decide what to retry from the status alone (openai-python and LiteLLM retry
408, 409, 429 and 5xx, and honour `Retry-After`), so each `LloomError` maps to the
status that makes them do the right thing:

| error | status | OpenAI `type` |
|---|---|---|
| bad request body, `InvalidRequest` | 400 | invalid_request_error |
| `Unauthorized` (admission: bad key; `MissingKey`, `RevokedKey`) | 401 | authentication_error |
| `PaymentRequired` (admission: budget spent) | 402 | insufficient_quota |
| `ForbiddenHost`, `ForbiddenOrigin` (guard.py: DNS rebinding, a web page's request) | 403 | invalid_request_error |
| `RequestTimeout` (guard.py: the body did not arrive in time) | 408 | invalid_request_error |
| `ModelNotFound`; `NoExecutors` for a model nobody serves | 404 | invalid_request_error (message lists the served models) |
| `BodyTooLarge` (the body limit), `PayloadTooLarge` (over NATS max_payload) | 413 | invalid_request_error |
| `UnsupportedFeature` | 422 | invalid_request_error |
| `TooManyRequests` (admission), `RateLimited` (a backend's 429) | 429 + Retry-After | rate_limit_error |
| `KeysUnavailable` (admission: the keys bucket unreachable) | 503 + Retry-After | service_unavailable |
| `NoExecutors` (none within the constraints), busy, shutting down, lost, receipts or queue unavailable | 503 + Retry-After | service_unavailable |
| `RequestTimeout`: the client's body not received within `body_timeout_secs` | 408 | invalid_request_error |
| `DeadlineExceeded`, `BackendTimeout`: no answer from upstream within the request's deadline | 504 | timeout |
| backend and verification failures | 502 | upstream_error |
| anything else | 500 | server_error (no details: they stay in the log) |

The gateway's own refusals (`GatewayError` subclasses) are raised by the admission seam
and the request edge; they never cross the bus.
"""

from __future__ import annotations

import logging
import math

from aiohttp import web

from executor.gateway.openai_types import ErrorBody, ErrorDetail, encoder
from protocol import errors as e

# Said in Retry-After when the error names no time: long enough for an executor to free a slot.
DEFAULT_RETRY_AFTER_S = 1


class GatewayError(Exception):
    """A refusal made by the gateway itself (not an executor)."""

    status = 400
    type = "invalid_request_error"
    code = "bad_request"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class BadRequestBody(GatewayError):
    pass


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class PaymentRequired(GatewayError):
    status, type, code = 402, "insufficient_quota", "budget_exhausted"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


# The request edge's refusals (executor/gateway/guard.py): a web page's request.
class ForbiddenHost(GatewayError):
    status, type, code = 403, "invalid_request_error", "forbidden_host"


class ForbiddenOrigin(GatewayError):
    status, type, code = 403, "invalid_request_error", "forbidden_origin"


class BodyTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RequestTimeout(GatewayError):
    """The client did not finish sending its request in time (`[gateway] body_timeout_secs`)."""

    status, type, code = 408, "invalid_request_error", "request_timeout"


class TooManyRequests(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


# The API keys' refusals (executor/gateway/keys.py): 401 for each way a key is wrong, 503 when
# the keys bucket cannot be read (nothing is admitted blind).
class MissingKey(Unauthorized):
    code = "missing_api_key"


class RevokedKey(Unauthorized):
    code = "revoked_api_key"


class KeysUnavailable(GatewayError):
    status, type, code = 503, "service_unavailable", "keys_unavailable"


# LloomError subclasses -> (status, type). Looked up along the MRO, so a new subclass lands on its parent's row.
_TABLE: dict[type[e.LloomError], tuple[int, str]] = {
    e.InvalidRequest: (400, "invalid_request_error"),
    e.PayloadTooLarge: (413, "invalid_request_error"),
    e.UnsupportedFeature: (422, "invalid_request_error"),
    e.ModelNotFound: (404, "invalid_request_error"),
    e.NoExecutors: (503, "service_unavailable"),
    e.ExecutorBusy: (503, "service_unavailable"),
    e.ExecutorLost: (503, "service_unavailable"),
    e.ShuttingDown: (503, "service_unavailable"),
    e.ReceiptsUnavailable: (503, "service_unavailable"),
    e.QueueUnavailable: (503, "service_unavailable"),
    e.JobQueued: (503, "service_unavailable"),
    e.DeadlineExceeded: (504, "timeout"),
    e.ResultPending: (504, "timeout"),
    e.Cancelled: (499, "cancelled"),
    e.ResponseTooLarge: (502, "upstream_error"),
    e.ForgedResult: (502, "upstream_error"),
    e.UnverifiedReply: (502, "upstream_error"),
    e.BackendError: (502, "upstream_error"),
    e.RateLimited: (429, "rate_limit_error"),
    e.BackendTimeout: (504, "timeout"),
    e.InternalError: (500, "server_error"),
    e.LloomError: (500, "server_error"),
}
# Statuses whose answer says when to come back.
_RETRY_AFTER = frozenset({429, 503})


def model_not_served(err: e.LloomError, model: str | None) -> bool:
    """A `NoExecutors` for a model no live executor serves at all (a 404, not a 503)."""
    return (isinstance(err, e.NoExecutors) and err.available_models is not None and model is not None
            and model not in err.available_models)  # fmt: skip


def status_of(err: e.LloomError, model: str | None = None) -> tuple[int, str]:
    if model_not_served(err, model):
        return 404, "invalid_request_error"
    for cls in type(err).__mro__:
        row = _TABLE.get(cls)  # type: ignore[arg-type]
        if row is not None:
            return row
    return 500, "server_error"


def error_body(err: BaseException, model: str | None = None) -> tuple[int, ErrorBody, float | None]:
    """The status, OpenAI error body and Retry-After (s) for `err`."""
    if isinstance(err, GatewayError):
        return err.status, ErrorBody(ErrorDetail(err.message, err.type, err.code, err.param)), err.retry_after_s
    if isinstance(err, e.LloomError):
        status, kind = status_of(err, model)
        code = "model_not_found" if status == 404 else err.code.value
        message = err.message
        if status == 404 and err.available_models is not None and "served:" not in message:
            message = f"{message} (served: {', '.join(err.available_models) or 'none'})"
        if status == 500:
            message = "internal error in the gateway or an executor (details are in their logs)"
        retry = err.retry_after_s if err.retry_after_s is not None else (
            DEFAULT_RETRY_AFTER_S if status in _RETRY_AFTER else None)  # fmt: skip
        return status, ErrorBody(ErrorDetail(message, kind, code)), retry
    _log.error("unexpected error answering a request", exc_info=err)
    return 500, ErrorBody(ErrorDetail("internal error in the gateway (details are in its log)", "server_error",
                                      "internal")), None  # fmt: skip


def error_response(err: BaseException, model: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    status, body, retry = error_body(err, model)
    out = dict(headers) if headers else {}
    if retry is not None:
        out["Retry-After"] = str(max(1, math.ceil(retry)))
    return web.Response(status=status, body=encoder.encode(body), content_type="application/json", headers=out)


_log = logging.getLogger("executor.gateway")
