"""The process's telemetry as `[telemetry]` configures it: made, started and closed here.

`Telemetry(config, executor_id)` decides what exists: a `JobRecorder` (when any metrics
exporter is configured) and a `JobTracer` (when an OTLP endpoint is configured, or a
test passes its own tracer provider); both go to the node's constructor. `start(node)`
then builds the OpenTelemetry `MeterProvider` whose instruments read the node's status
(executor/telemetry/metrics.py), with a Prometheus reader and its HTTP endpoint, and/or
a periodic OTLP reader. `aclose()` stops the endpoint and shuts the providers down,
flushing what was not exported yet (the daemon's exit stack calls it after the node has
drained). Not configured: nothing is created, no port opens, no span is recorded. An
in-process gateway (executor/gateway/telemetry.py `GatewayTelemetry.beside`) registers its
instruments on `meter_provider`, its histograms through `add_histograms` and its spans on
`tracer_provider`, so it needs no port of its own.

OTLP export needs the `otlp` extra (`pip install 'lloom[otlp]'`); configured without it,
start-up fails with a `ConfigError` that says so.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from executor.config import ConfigError, TelemetryConfig
from executor.telemetry.metrics import ExecutorInstruments, HistogramProducer, StatusSnapshot, StatusSource
from executor.telemetry.prometheus import HistogramReader, MetricsEndpoint
from executor.telemetry.recorder import JobRecorder
from executor.telemetry.tracing import JobTracer

log = structlog.get_logger(logger_name=__name__)
OTLP_MISSING = ("[telemetry] otlp_endpoint is set but the OTLP exporter is not installed:"
                " pip install 'lloom[otlp]' (or clear otlp_endpoint)")  # fmt: skip


def otlp_exporters(endpoint: str) -> tuple[Any, Any]:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(OTLP_MISSING) from None
    base = endpoint.rstrip("/")
    return OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), OTLPSpanExporter(endpoint=f"{base}/v1/traces")


class WithHistograms(MetricExporter):
    """An OTLP metric exporter whose exports carry the recorder's histograms too."""

    def __init__(self, inner: MetricExporter, producer: HistogramSource) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)  # fmt: skip
        self._inner = inner
        self._producer = producer

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
        return self._inner.export(self._producer.add_to(metrics_data), timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class HistogramSource(Protocol):
    """Histogram points made at collection (metrics.HistogramProducer, the gateway's GatewayHistograms)."""

    def add_to(self, data: MetricsData | None) -> MetricsData: ...


class Producers:
    """The histograms added to each collection: the executor's, and an in-process gateway's."""

    def __init__(self) -> None:
        self.producers: list[HistogramSource] = []

    def add_to(self, data: MetricsData | None) -> MetricsData:
        for producer in self.producers:
            data = producer.add_to(data)
        return data if data is not None else MetricsData(resource_metrics=[])


class Telemetry:
    """What `[telemetry]` asks for; `recorder` and `tracer` are None when it asks for nothing."""

    def __init__(self, config: TelemetryConfig, executor_id: str, *,
                 tracer_provider: TracerProvider | None = None) -> None:  # fmt: skip
        self.config = config
        self._resource = Resource.create({"service.name": config.service_name, "service.instance.id": executor_id})
        metric_exporter = span_exporter = None
        if config.otlp_endpoint:
            metric_exporter, span_exporter = otlp_exporters(config.otlp_endpoint)
        self._metric_exporter = metric_exporter
        self._own_tracer_provider = tracer_provider is None and span_exporter is not None
        if self._own_tracer_provider:
            tracer_provider = TracerProvider(resource=self._resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self._tracer_provider = tracer_provider
        self.tracer = None if tracer_provider is None else JobTracer(tracer_provider)
        self.recorder = JobRecorder(max_models=config.max_models) if config.enabled else None
        self.endpoint: MetricsEndpoint | None = None
        self._meter_provider: MeterProvider | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._producers = Producers()

    @property
    def resource(self) -> Resource:
        return self._resource

    @property
    def meter_provider(self) -> MeterProvider | None:
        """The provider of the metrics (after `start`), for an in-process gateway's instruments."""
        return self._meter_provider

    @property
    def tracer_provider(self) -> TracerProvider | None:
        return self._tracer_provider

    def add_histograms(self, producer: HistogramSource) -> None:
        """Add `producer`'s histograms (an `add_to(MetricsData)`) to every collection from now on."""
        self._producers.producers.append(producer)

    async def start(self, node: StatusSource) -> None:
        """Register the instruments on `node`'s status and open the exporters configured."""
        if self.recorder is None or self._meter_provider is not None:
            return
        snapshot = StatusSnapshot(node)
        self._producers.producers.insert(0, HistogramProducer(self.recorder, snapshot, self._resource))
        readers: list[MetricReader] = []
        if self.config.prometheus_listen:
            registry = CollectorRegistry(auto_describe=False)
            reader = HistogramReader(registry)
            reader.producer = self._producers  # type: ignore[assignment]
            readers.append(reader)
            self.endpoint = MetricsEndpoint(self.config.prometheus_listen, registry, snapshot)
        if self._metric_exporter is not None:
            interval_ms = self.config.otlp_interval_secs * 1000
            readers.append(PeriodicExportingMetricReader(WithHistograms(self._metric_exporter, self._producers),
                                                         export_interval_millis=interval_ms))  # fmt: skip
            # The OTLP reader collects in its own thread: it reads a snapshot the loop keeps fresh.
            self._refresh = asyncio.create_task(self._keep_fresh(snapshot, self.config.otlp_interval_secs / 2),
                                                name="telemetry-status")  # fmt: skip
        self._meter_provider = MeterProvider(metric_readers=readers, resource=self._resource)
        ExecutorInstruments(self._meter_provider.get_meter("lloom.executor"), self.recorder, snapshot)
        if self.endpoint is not None:
            try:
                await self.endpoint.start()
            except OSError as e:
                raise ConfigError(f"[telemetry] prometheus_listen = {self.config.prometheus_listen!r}: {e}") from e

    @staticmethod
    async def _keep_fresh(snapshot: StatusSnapshot, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            snapshot.refresh()

    async def aclose(self) -> None:
        """Stop the endpoint and flush and shut down the providers; idempotent."""
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
            self._refresh = None
        if self.endpoint is not None:
            await self.endpoint.stop()
        meters, self._meter_provider = self._meter_provider, None
        if meters is not None:  # the OTLP reader's last export runs in its thread: not on the loop
            await asyncio.to_thread(meters.shutdown)
        if self._own_tracer_provider and self._tracer_provider is not None:
            provider, self._tracer_provider = self._tracer_provider, None
            await asyncio.to_thread(provider.shutdown)
