"""W3C trace context for the jobs a client sends: the caller's span, carried in the job's NATS headers.

Uses the OpenTelemetry API only, never the SDK: an application that traces configures its
own tracer provider, and a client job then gets a client span (`chat <model>`) whose
context travels in `traceparent`/`tracestate` (protocol/subjects.py) to the executor, which
continues the trace (executor/telemetry/tracing.py). Without a provider, nothing is
recorded, a job carries the caller's current span context only if it has a valid one, and
the cost is a check or two per job.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import ProxyTracerProvider, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
# A proxy until the application sets a provider, then that provider's tracer.
_TRACER = trace.get_tracer("lloom.client")
_UNTRACED: AbstractContextManager[Any] = nullcontext()


def inject(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to a job's headers, when there is one."""
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(headers)


def client_span(operation: str, model: str) -> AbstractContextManager[Any]:
    """A client span around one job (its retries included), or nothing when no provider is set."""
    if isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
        return _UNTRACED
    return _TRACER.start_as_current_span(f"{operation} {model}", kind=SpanKind.CLIENT, attributes={
        "gen_ai.operation.name": operation, "gen_ai.request.model": model})  # fmt: skip
