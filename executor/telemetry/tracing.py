"""Spans of a job, and the W3C trace context it carries in and out.

A caller's `traceparent`/`tracestate` arrive in the job's NATS headers
(protocol/subjects.py `HDR_TRACEPARENT`, `HDR_TRACESTATE`). With a tracer provider
(`[telemetry] otlp_endpoint`, or one a test passes in) the job gets a `JobTrace`: a
server span `chat <model>` that continues the caller's trace, with children for the
wait before it ran, the cache lookup, the backend call (whose HTTP request carries the
backend span's `traceparent`; its first token is an event on it) and the receipt, and
the GenAI attributes on them. Without a provider nothing is recorded: the job only
passes the caller's context on to the backend unchanged (telemetry/context.py), which costs
a dict and a context variable, so a backend that traces still joins the caller's trace.
This module imports the OpenTelemetry SDK: only telemetry setup imports it, when a tracer
is configured.

The backend's HTTP request takes its extra headers from `transport.base.TRACE_HEADERS`,
a context variable set in the job's own task: a batched call made by the coalescer's
task carries none.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from executor.backends.transport.base import TRACE_HEADERS

_PROPAGATOR = TraceContextTextMapPropagator()


class JobTracer:
    """Makes the spans of jobs from one tracer provider (the process's, owned by telemetry setup)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("lloom.executor")

    def start(self, name: str, carrier: Mapping[str, str] | None, attributes: dict[str, Any],
              start_ns: int) -> JobTrace:  # fmt: skip
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                                       start_time=start_ns)  # fmt: skip
        return JobTrace(self._tracer, span)


class JobTrace:
    """One job's server span and its children."""

    __slots__ = ("_tracer", "span", "_context", "trace_id")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context: Context = trace.set_span_in_context(span)
        self.trace_id = format(span.get_span_context().trace_id, "032x")

    def waited(self, since_ns: int) -> None:
        """The time between the job's arrival and its run, as a finished child span."""
        self._tracer.start_span("queue wait", context=self._context, start_time=since_ns).end()

    @contextmanager
    def child(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Iterator[Span]:
        span = self._tracer.start_span(name, context=self._context, kind=kind, attributes=attributes)
        try:
            yield span
        except BaseException as e:
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            span.end()

    @contextmanager
    def backend_call(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A client span around the backend call; the HTTP request made inside carries its context."""
        with self.child(name, kind=SpanKind.CLIENT, **attributes) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
            token = TRACE_HEADERS.set(carrier)
            try:
                yield span
            finally:
                TRACE_HEADERS.reset(token)

    def end(self, error_type: str | None, attributes: dict[str, Any]) -> None:
        span = self.span
        if attributes:
            span.set_attributes(attributes)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()
