"""The Prometheus scrape endpoint: `GET /metrics` on `[telemetry] prometheus_listen`.

The OpenTelemetry Prometheus reader translates what the SDK collects into Prometheus's
text format (names with `.` become `_`, counters get `_total`, units a suffix); this
module adds the recorder's histograms to each collection (`HistogramReader`) and serves
the result from the executor's own event loop through aiohttp, so a scrape reads the
node's state on the loop that changes it, and no thread of ours runs between scrapes.
Its registry is the endpoint's own (never prometheus_client's global one), so two
executors in one process, or a test, never share series.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricsData
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from executor.telemetry.metrics import HistogramProducer, StatusSnapshot

log = structlog.get_logger(logger_name=__name__)


class HistogramReader(PrometheusMetricReader):
    """A Prometheus reader whose collections carry the recorder's histograms too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(disable_target_info=False, registry=registry)
        self.producer: HistogramProducer | None = None  # set by setup once the resource is known

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if self.producer is not None:
            metrics_data = self.producer.add_to(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsEndpoint:
    """An HTTP server answering `GET /metrics` with the registry's exposition; `start`/`stop`."""

    def __init__(self, listen: str, registry: CollectorRegistry, snapshot: StatusSnapshot) -> None:
        self.host, self.port = split_listen(listen)
        self._registry = registry
        self._snapshot = snapshot
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _: web.Request) -> web.Response:
        self._snapshot.refresh()  # the gauges read the node as it is now
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # the real port when 0 was asked for
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("prometheus metrics endpoint", url=f"http://{self.host}:{self.port}/metrics")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
