"""What the gateway records per HTTP request: one plain-Python record, read at collection time.

An aiohttp middleware (`observed`, added by `make_app` only when telemetry is on) times each
request, counts it in flight, and when it ends adds it to the `GatewayRecorder`'s aggregates
under bounded labels: the route template (`/v1/chat/completions`, never the raw path), the
model, the HTTP status and the error code of the answer. Handlers tell it what only they know
through one-line hooks (`asked`, `first_chunk`, `answered`, plus `stream_failed` for an error
after a stream's first chunk), which find the request's record in a context variable; with
telemetry off they find none and return at once. OpenTelemetry reads the aggregates when a scrape or an OTLP export
collects (executor/gateway/telemetry.py): nothing here imports it.

Labels stay bounded: a model becomes a label once an executor has answered a request for it
(so it is a name the network serves), at most `max_models` of them; every other name a caller
typed counts as `other`. The error code is one of the closed set the gateway answers with
(wire codes and the gateway's own refusals) or `other`. A client that disconnects is status
499, code `cancelled`; a body over `[gateway] max_body_mb` is code `request_too_large`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from time import perf_counter
from typing import Any, Protocol

import msgspec
from aiohttp import web

from executor.gateway import errors
from executor.telemetry.recorder import DURATION_BOUNDS_S, OTHER_MODEL, TOKEN_BOUNDS, TTFT_BOUNDS_S, Buckets
from protocol.errors import ErrorCode
from protocol.messages import Usage

CANCELLED_STATUS = 499  # nginx's "client closed request": the caller went away before the answer
CANCELLED = "cancelled"
OTHER = "other"
# Route templates that are GenAI operations (gen_ai.operation.name); the others have none.
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/embeddings": "embeddings"}


def _gateway_codes(cls: type[errors.GatewayError]) -> set[str]:
    return {cls.code}.union(*(_gateway_codes(sub) for sub in cls.__subclasses__()))


# Every code an error body of the gateway can carry (errors.error_body); anything else is `other`.
KNOWN_CODES = frozenset({c.value for c in ErrorCode} | _gateway_codes(errors.GatewayError)
                        | {"model_not_found", "internal", "not_found", CANCELLED})  # fmt: skip


class _Detail(msgspec.Struct):
    code: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _Detail


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


def error_code(body: Any) -> str:
    """The `error.code` of an error response's body (one of `KNOWN_CODES`, else `other`)."""
    try:
        code = _decode_error(body).error.code if isinstance(body, bytes) else None
    except msgspec.DecodeError:
        return OTHER
    return code if code in KNOWN_CODES else OTHER


class Exchange:
    """What one request's handler told the record: its model, when its first chunk left, its usage."""

    __slots__ = ("recorder", "model", "first", "usage", "code", "served")

    def __init__(self, recorder: GatewayRecorder) -> None:
        self.recorder = recorder
        self.model: str | None = None
        self.first: float | None = None
        self.usage: Usage | None = None
        self.code: str | None = None
        self.served = False


# The record of the request the current task answers (the middleware sets and resets it around the
# handler, which runs in the same task): a context variable costs the hooks ~50 ns when telemetry is
# off, where a lookup in the aiohttp request's storage costs ~500 (its miss raises KeyError inside).
CURRENT: ContextVar[Exchange | None] = ContextVar("lloom_gateway_exchange", default=None)


# -- the handlers' hooks (each a dict lookup when telemetry is off) --


def asked(model: str | None) -> None:
    """The model a request asks for (raw: the record labels it)."""
    ex = CURRENT.get()
    if ex is not None:
        ex.model = model


def first_chunk() -> None:
    """A stream's first chunk has been written: time to first chunk, and the stream is open."""
    ex = CURRENT.get()
    if ex is not None:
        ex.first = perf_counter()
        ex.recorder.open_streams += 1


def answered(usage: Usage | None) -> None:
    """An executor answered the request (so its model is served), with this final usage."""
    ex = CURRENT.get()
    if ex is not None:
        ex.served = True
        ex.usage = usage


def stream_failed(code: str) -> None:
    """A stream ended in an error event after its first chunk (the HTTP status was already 200)."""
    ex = CURRENT.get()
    if ex is not None:
        ex.code = code if code in KNOWN_CODES else OTHER


# -- the aggregates --


class RequestSeries:
    """Everything recorded for one (route, operation, model, status, code)."""

    __slots__ = ("requests", "duration", "ttft", "input_tokens", "output_tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.duration = Buckets(DURATION_BOUNDS_S)
        self.ttft = Buckets(TTFT_BOUNDS_S)
        self.input_tokens = Buckets(TOKEN_BOUNDS)
        self.output_tokens = Buckets(TOKEN_BOUNDS)


class GatewayRecorder:
    """Per-(route, operation, model, status, code) aggregates of finished requests; requests and
    streams open now. Read by the OpenTelemetry instruments when they collect."""

    __slots__ = ("_max_models", "models", "series", "in_flight", "open_streams")

    def __init__(self, *, max_models: int = 100) -> None:
        self._max_models = max_models
        self.models: set[str] = set()
        self.series: dict[tuple[str, str, str, int, str], RequestSeries] = {}
        self.in_flight = 0
        self.open_streams = 0

    def label(self, model: str | None, served: bool) -> str:
        if model is None:
            return OTHER_MODEL
        if model in self.models:
            return model
        if served and len(self.models) < self._max_models:
            self.models.add(model)
            return model
        return OTHER_MODEL

    def done(self, route: str, status: int, code: str, seconds: float, ex: Exchange, started: float) -> None:
        """One finished request (the one record a request makes; keep it cheap)."""
        model = ex.model
        key = (route, OPERATIONS.get(route, ""), model if model in self.models else self.label(model, ex.served),
               status, ex.code or code)  # fmt: skip
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = RequestSeries()
        s.requests += 1
        s.duration.add(seconds)
        if ex.first is not None:
            s.ttft.add(ex.first - started)
        usage = ex.usage
        if usage is not None:
            s.input_tokens.add(usage.prompt_tokens)
            s.output_tokens.add(usage.completion_tokens)


# -- the middleware --


class RequestTracer(Protocol):
    """The spans of requests (executor/gateway/telemetry.py); absent when no tracer is configured."""

    def start(self, request: web.Request, route: str) -> Any: ...

    def end(self, handle: Any, status: int, code: str, model: str, ex: Exchange) -> None: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_of(request: web.Request) -> str:
    """The route template that matched (`/v1/models/{id}`), never the raw path; `other` when none did."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else OTHER


def observed(recorder: GatewayRecorder, tracer: RequestTracer | None = None) -> Any:
    """The middleware that records every request into `recorder` (and traces it with `tracer`)."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        ex = Exchange(recorder)
        token = CURRENT.set(ex)
        route = route_of(request)
        handle = tracer.start(request, route) if tracer is not None else None
        recorder.in_flight += 1
        started = perf_counter()
        status, body = 500, None
        try:
            resp = await handler(request)
            status = resp.status
            if status >= 400 and isinstance(resp, web.Response):
                body = resp.body
            return resp
        except web.HTTPException as e:
            status, body = e.status, e.body
            raise
        except asyncio.CancelledError:  # the caller disconnected (handler cancellation is on)
            status, ex.code = CANCELLED_STATUS, CANCELLED
            raise
        finally:
            now = perf_counter()
            CURRENT.reset(token)
            recorder.in_flight -= 1
            if ex.first is not None:
                recorder.open_streams -= 1
            code = "" if status < 400 else error_code(body)
            recorder.done(route, status, code, now - started, ex, started)
            if handle is not None:
                tracer.end(handle, status, ex.code or code, recorder.label(ex.model, False), ex)  # type: ignore[union-attr]

    return observe
