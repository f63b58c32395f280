"""An OTLP/HTTP receiver for telemetry tests (what an OpenTelemetry collector answers on :4318)."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class Collector:
    """An OTLP/HTTP receiver (what an OpenTelemetry collector answers on :4318): it decodes what it gets."""

    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.spans: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _metrics(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        body = ExportMetricsServiceRequest()
        body.ParseFromString(await request.read())
        self.metrics += [m for rm in body.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        return web.Response(content_type="application/x-protobuf")

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = ExportTraceServiceRequest()
        body.ParseFromString(await request.read())
        self.spans += [s for rs in body.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return web.Response(content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def last_sum(self, name: str) -> float:
        """The latest cumulative value of counter `name`, all series added up."""
        points = [m.sum.data_points for m in self.metrics if m.name == name]
        return sum(p.as_int or p.as_double for p in points[-1]) if points else 0.0
