"""The gateway's metrics and spans as `[telemetry]` configures them (imported only when it does).

`GatewayTelemetry.standalone(config, id)` is `lloom-gateway`'s: its own `MeterProvider` with a
Prometheus endpoint on `[telemetry] prometheus_listen` and/or a periodic OTLP reader, and a
tracer provider exporting to `[telemetry] otlp_endpoint`. `GatewayTelemetry.beside(telemetry)`
is the in-process gateway's (`lloom-executor` runs one with the single-machine start): it
registers on the executor's own providers, so its series come out of the executor's metrics
port and OTLP export (one port per process, one `service.name`), told apart by their
`http.route` label and their `lloom.gateway` scope.

Nothing runs per request here: `GatewayInstruments` (observable counters and gauges) and
`GatewayHistograms` (histogram points straight from the fixed buckets) read the
`GatewayRecorder` (executor/gateway/observe.py) when a reader collects. `GatewayTracer`
makes one SERVER span per HTTP request, a child of the caller's `traceparent` header when it
carries a valid one, and makes it current while the handler runs: `LloomClient` puts its
context into the job's NATS headers (protocol/tracecontext.py), so the executor's job span
is its child and one trace runs caller -> gateway -> executor -> backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from executor.config import ConfigError, TelemetryConfig
from executor.gateway.observe import CANCELLED, OPERATIONS, Exchange, GatewayRecorder, RequestSeries, observed
from executor.telemetry.metrics import CLIENT_DURATION, ERROR_TYPE, MODEL, OPERATION, TOKEN_TYPE, TOKEN_USAGE, add_scope
from executor.telemetry.prometheus import HistogramReader, MetricsEndpoint
from executor.telemetry.recorder import Buckets
from executor.telemetry.setup import Telemetry, WithHistograms, otlp_exporters

NAME = "lloom.gateway"
SCOPE = InstrumentationScope(NAME)
ROUTE = "http.route"
STATUS = "http.response.status_code"
_PROPAGATOR = TraceContextTextMapPropagator()
Key = tuple[str, str, str, int, str]


def _attrs(key: Key) -> dict[str, Any]:
    route, operation, model, status, code = key
    attrs: dict[str, Any] = {ROUTE: route, MODEL: model, STATUS: status}
    if operation:
        attrs[OPERATION] = operation
    if code:
        attrs[ERROR_TYPE] = code
    return attrs


class GatewayInstruments:
    """Registers the gateway's observable instruments on `meter`; they read `recorder`."""

    def __init__(self, meter: Meter, recorder: GatewayRecorder) -> None:
        self._recorder = recorder
        counter, gauge = meter.create_observable_counter, meter.create_observable_gauge
        counter("lloom.gateway.requests", [self._requests], unit="{request}",
                description="HTTP requests answered, by http.route, model, HTTP status and error.type")
        counter("lloom.gateway.errors", [self._sum(lambda code: bool(code), ERROR_TYPE)], unit="{request}",
                description="Requests answered with an error (or a stream that ended in one), by error.type")
        counter("lloom.gateway.cancels", [self._sum(lambda code: code == CANCELLED)], unit="{request}",
                description="Requests whose caller disconnected before the answer ended (the job was cancelled)")
        counter("lloom.gateway.body_too_large", [self._sum(lambda code: code == "request_too_large")],
                unit="{request}", description="Requests refused because the body is over [gateway] max_body_mb")
        gauge("lloom.gateway.requests.in_flight", [self._now(lambda r: r.in_flight)], unit="{request}",
              description="HTTP requests being answered now")
        gauge("lloom.gateway.streams.open", [self._now(lambda r: r.open_streams)], unit="{stream}",
              description="Streamed answers open now (first chunk sent, not finished)")

    def _requests(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.requests, _attrs(k)) for k, s in list(self._recorder.series.items())]

    def _sum(self, counts: Callable[[str], bool], by: str | None = None) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(_: CallbackOptions) -> list[Observation]:
            totals: dict[tuple[str, str], int] = {}
            for (route, _op, model, _status, code), s in list(self._recorder.series.items()):
                if counts(code):
                    group = (route, code if by else "")
                    totals[group] = totals.get(group, 0) + s.requests
            return [Observation(n, {ROUTE: route, **({by: code} if by else {})}) for (route, code), n in totals.items()]

        return observe

    def _now(self, read: Callable[[GatewayRecorder], int]) -> Callable[[CallbackOptions], list[Observation]]:
        return lambda _: [Observation(read(self._recorder))]


# (metric name, unit, description, how to read a series' buckets, extra attributes)
_HISTOGRAMS: tuple[tuple[str, str, str, Callable[[RequestSeries], Buckets], dict[str, str]], ...] = (
    ("gen_ai.client.operation.duration", "s", CLIENT_DURATION, lambda s: s.duration, {}),
    ("lloom.gateway.time_to_first_chunk", "s", "Time from a streamed request's arrival to its first chunk sent",
     lambda s: s.ttft, {}),
    ("gen_ai.client.token.usage", "{token}", TOKEN_USAGE, lambda s: s.input_tokens, {TOKEN_TYPE: "input"}),
    ("gen_ai.client.token.usage", "{token}", TOKEN_USAGE, lambda s: s.output_tokens, {TOKEN_TYPE: "output"}),
)  # fmt: skip


class GatewayHistograms:
    """The recorder's histograms as OTLP metric points of the `lloom.gateway` scope, made at collection."""

    def __init__(self, recorder: GatewayRecorder, resource: Resource) -> None:
        self._recorder = recorder
        self._resource = resource
        self._start_ns = time.time_ns()

    def produce(self) -> ScopeMetrics:
        now = time.time_ns()
        series = list(self._recorder.series.items())
        points: dict[str, tuple[str, str, list[HistogramDataPoint]]] = {}
        for name, unit, description, read, extra in _HISTOGRAMS:
            entry = points.setdefault(name, (unit, description, []))
            for key, s in series:
                b = read(s)
                if b.count:
                    entry[2].append(HistogramDataPoint(
                        attributes={**_attrs(key), **extra}, start_time_unix_nano=self._start_ns,
                        time_unix_nano=now, count=b.count, sum=b.sum, bucket_counts=list(b.counts),
                        explicit_bounds=b.bounds, min=b.min, max=b.max,
                    ))  # fmt: skip
        metrics = [
            Metric(name=name, description=description, unit=unit,
                   data=Histogram(data_points=dps, aggregation_temporality=AggregationTemporality.CUMULATIVE))
            for name, (unit, description, dps) in points.items() if dps
        ]  # fmt: skip
        return ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url="")

    def add_to(self, data: MetricsData | None) -> MetricsData:
        return add_scope(data, self.produce(), self._resource)


class GatewayTracer:
    """One SERVER span per HTTP request, current while its handler runs (observe.RequestTracer)."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer(NAME)

    def start(self, request: web.Request, route: str) -> tuple[trace.Span, object]:
        # A malformed or absent traceparent extracts to nothing: the span starts a new trace.
        parent = _PROPAGATOR.extract(request.headers) if "traceparent" in request.headers else None
        operation = OPERATIONS.get(route)
        attrs: dict[str, Any] = {"http.request.method": request.method, ROUTE: route}
        if operation:
            attrs[OPERATION] = operation
        span = self._tracer.start_span(f"{request.method} {route}", context=parent, kind=SpanKind.SERVER,
                                       attributes=attrs)  # fmt: skip
        return span, otel_context.attach(trace.set_span_in_context(span))

    def end(self, handle: tuple[trace.Span, object], status: int, code: str, model: str, ex: Exchange) -> None:
        span, token = handle
        otel_context.detach(token)  # type: ignore[arg-type]
        span.set_attribute(STATUS, status)
        span.set_attribute(MODEL, model)
        if ex.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ex.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", ex.usage.completion_tokens)
        if code:
            span.set_attribute(ERROR_TYPE, code)
            if status >= 500 or status < 400:  # a 4xx is the caller's error, not the gateway's (HTTP semconv)
                span.set_status(Status(StatusCode.ERROR, code))
        span.end()


class _Nothing:
    """The endpoint refreshes a status snapshot before a scrape; the gateway's figures need none."""

    def refresh(self) -> None:
        pass


class GatewayTelemetry:
    """The gateway's recorder, tracer and middleware (`observer`), on its own or the executor's providers."""

    def __init__(self, recorder: GatewayRecorder | None, tracer: GatewayTracer | None) -> None:
        self.recorder = recorder
        self.tracer = tracer
        # The middleware; None when neither metrics nor traces are wanted (then make_app adds none).
        self.observer = observed(recorder or GatewayRecorder(), tracer) if recorder or tracer else None
        self.endpoint: MetricsEndpoint | None = None
        self._meter_provider: MeterProvider | None = None
        self._tracer_provider: TracerProvider | None = None
        self._listen = ""

    @classmethod
    def beside(cls, telemetry: Telemetry) -> GatewayTelemetry:
        """The in-process gateway's: on the executor's providers (its metrics port, its OTLP export)."""
        config = telemetry.config
        recorder = GatewayRecorder(max_models=config.max_models) if telemetry.meter_provider is not None else None
        provider = telemetry.tracer_provider
        gt = cls(recorder, GatewayTracer(provider) if provider is not None else None)
        if recorder is not None and telemetry.meter_provider is not None:
            GatewayInstruments(telemetry.meter_provider.get_meter(NAME), recorder)
            telemetry.add_histograms(GatewayHistograms(recorder, telemetry.resource))
        return gt

    @classmethod
    def standalone(cls, config: TelemetryConfig, instance_id: str, *,
                   tracer_provider: TracerProvider | None = None) -> GatewayTelemetry:  # fmt: skip
        """`lloom-gateway`'s: its own providers and exporters as `config` asks (`start` opens them)."""
        name = "lloom-gateway" if config.service_name == "lloom-executor" else config.service_name
        resource = Resource.create({"service.name": name, "service.instance.id": instance_id})
        metric_exporter = span_exporter = None
        if config.otlp_endpoint:
            metric_exporter, span_exporter = otlp_exporters(config.otlp_endpoint)
        own_tracing = tracer_provider is None and span_exporter is not None
        if own_tracing:
            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        recorder = GatewayRecorder(max_models=config.max_models) if config.enabled else None
        gt = cls(recorder, GatewayTracer(tracer_provider) if tracer_provider is not None else None)
        gt._tracer_provider = tracer_provider if own_tracing else None
        if recorder is None:
            return gt
        producer = GatewayHistograms(recorder, resource)
        readers: list[MetricReader] = []
        if config.prometheus_listen:
            registry = CollectorRegistry(auto_describe=False)
            reader = HistogramReader(registry)
            reader.producer = producer  # type: ignore[assignment]
            readers.append(reader)
            gt.endpoint = MetricsEndpoint(config.prometheus_listen, registry, _Nothing())  # type: ignore[arg-type]
        if metric_exporter is not None:
            readers.append(PeriodicExportingMetricReader(WithHistograms(metric_exporter, producer),
                                                         export_interval_millis=config.otlp_interval_secs * 1000))  # fmt: skip
        gt._meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        GatewayInstruments(gt._meter_provider.get_meter(NAME), recorder)
        gt._listen = config.prometheus_listen
        return gt

    async def start(self) -> None:
        """Open the metrics endpoint, if there is one of the gateway's own."""
        if self.endpoint is not None:
            try:
                await self.endpoint.start()
            except OSError as e:
                raise ConfigError(f"[telemetry] prometheus_listen = {self._listen!r}: {e}") from e

    async def aclose(self) -> None:
        """Close the endpoint, flush and shut down the providers this object made; idempotent."""
        if self.endpoint is not None:
            await self.endpoint.stop()
        meters, self._meter_provider = self._meter_provider, None
        if meters is not None:
            await asyncio.to_thread(meters.shutdown)
        tracing, self._tracer_provider = self._tracer_provider, None
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)
