"""The executor's OpenTelemetry instruments, all read at collection time.

Nothing here runs per job. Counters of finished jobs come from the `JobRecorder`'s
aggregates (executor/telemetry/recorder.py) through observable counters; the figures a
node already keeps for `lloom-executor status` (in-flight jobs, capacity, busy replies,
backend health, breaker states, queue depth, cache, batching, receipts waiting in the
outbox) come from one `ExecutorStatus` snapshot through observable gauges and counters;
the histograms (request duration, time to first token, time per output token, token
usage) are built as OTLP histogram points straight from the recorder's fixed buckets by
`HistogramProducer`, and the readers (prometheus.py, setup.py) add them to each
collection. Names follow the OpenTelemetry GenAI semantic conventions where one exists;
the rest are under `lloom.` (docs/observability.md lists them all).

The snapshot is refreshed on the event loop (`StatusSnapshot.refresh`), never from the
thread an OTLP reader collects in, so a collection never reads the node's state while it
changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from executor.telemetry.recorder import OK, Buckets, JobRecorder, Series
from protocol.status import ExecutorStatus

SCOPE = InstrumentationScope("lloom.executor")
# Semantic-convention attribute names.
MODEL = "gen_ai.request.model"
SYSTEM = "gen_ai.system"
OPERATION = "gen_ai.operation.name"
TOKEN_TYPE = "gen_ai.token.type"
ERROR_TYPE = "error.type"
OUTCOME = "lloom.outcome"
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Shared with the gateway's histograms of the same names (executor/gateway/telemetry.py): a Prometheus
# family is one name, description and unit, so an in-process gateway's series join the executor's.
CLIENT_DURATION = ("GenAI client operation time: an executor's backend call (none for cache hits), or a gateway's"
                   " request (with http.route)")  # fmt: skip
TOKEN_USAGE = "Tokens per job or gateway request, by gen_ai.token.type (input, output)"


class StatusSource(Protocol):
    def status(self) -> ExecutorStatus: ...


class StatusSnapshot:
    """The node's last `ExecutorStatus`, taken on the event loop (`refresh`), read by collections."""

    __slots__ = ("_source", "last")

    def __init__(self, source: StatusSource) -> None:
        self._source = source
        self.last: ExecutorStatus = source.status()

    def refresh(self) -> None:
        self.last = self._source.status()


def _job_attrs(key: tuple[str, str, str], system: str) -> dict[str, str]:
    model, operation, outcome = key
    attrs = {MODEL: model, OPERATION: operation, SYSTEM: system, OUTCOME: outcome}
    if outcome != OK:
        attrs[ERROR_TYPE] = outcome
    return attrs


class ExecutorInstruments:
    """Registers the observable instruments on `meter`; they read `recorder` and `snapshot`."""

    def __init__(self, meter: Meter, recorder: JobRecorder, snapshot: StatusSnapshot) -> None:
        self._recorder = recorder
        self._snapshot = snapshot
        counter, gauge = meter.create_observable_counter, meter.create_observable_gauge
        counter("lloom.requests", [self._requests], unit="{request}",
                description="Jobs finished, by model, operation, backend (gen_ai.system) and outcome")
        counter("lloom.errors", [self._errors], unit="{request}",
                description="Jobs that ended with an error, by error.type (the wire error code)")
        gauge("lloom.jobs.in_flight", [self._status(lambda s: s.in_flight)], unit="{job}",
              description="Jobs running now")
        gauge("lloom.jobs.capacity", [self._status(lambda s: s.capacity)], unit="{job}",
              description="Jobs that may run at once (node.max_concurrent_jobs)")
        counter("lloom.jobs.busy", [self._status(lambda s: s.stats.busy)], unit="{reply}",
                description="Jobs refused with `busy` because the node was at capacity")
        counter("lloom.jobs.bad_requests", [self._status(lambda s: s.stats.bad_requests)], unit="{request}",
                description="Requests refused before they became jobs (undecodable, bad headers)")
        gauge("lloom.backend.healthy", [self._healthy], unit="1",
              description="1 while the backend answers its model list, else 0")
        gauge("lloom.model.available", [self._models], unit="1",
              description="1 while a served model can be served now, else 0")
        gauge("lloom.backend.breaker.state", [self._breakers], unit="1",
              description="A pool member's circuit breaker: 0 closed, 1 half open, 2 open")
        gauge("lloom.queue.depth", [self._queue], unit="{job}",
              description="Jobs waiting in the durable queue for this node's models")
        counter("lloom.cache.hits", [self._cache(hits=True)], unit="{request}",
                description="Response cache hits, by lloom.cache.level (memory, shared)")
        counter("lloom.cache.misses", [self._cache(hits=False)], unit="{request}",
                description="Response cache misses, by lloom.cache.level (memory, shared)")
        counter("lloom.batching.calls", [self._status(lambda s: s.batching and s.batching.calls)], unit="{call}",
                description="Backend calls made for batched jobs (mean batch size: jobs / calls)")
        counter("lloom.batching.jobs", [self._status(lambda s: s.batching and s.batching.jobs)], unit="{job}",
                description="Batched jobs (embeddings, text completions) served by those calls")
        gauge("lloom.receipts.unpublished", [self._status(lambda s: s.receipts and s.receipts.unpublished)],
              unit="{receipt}", description="Receipts in the outbox not yet acknowledged by JetStream")
        gauge("lloom.receipts.publish_lag", [self._lag], unit="s",
              description="How long the oldest unpublished receipt has waited (0 when none waits)")
        counter("lloom.receipts.issued", [self._status(lambda s: s.receipts and s.receipts.issued)],
                unit="{receipt}", description="Receipts signed (the outbox's last sequence number)")
        counter("lloom.tokens.mismatches", [self._status(lambda s: s.receipts and s.receipts.mismatches)],
                unit="{request}", description="Jobs whose backend-reported token counts disagreed with the local count")

    def _system(self) -> str:
        return self._snapshot.last.backend_kind

    def _requests(self, _: CallbackOptions) -> Iterable[Observation]:
        system = self._system()
        return [Observation(s.requests, _job_attrs(k, system)) for k, s in list(self._recorder.series.items())]

    def _errors(self, _: CallbackOptions) -> Iterable[Observation]:
        errors: dict[tuple[str, str, str], int] = {}
        for (model, operation, outcome), s in list(self._recorder.series.items()):
            if outcome != OK:
                errors[(model, operation, outcome)] = errors.get((model, operation, outcome), 0) + s.requests
        return [Observation(n, {ERROR_TYPE: outcome, MODEL: model, OPERATION: operation})
                for (model, operation, outcome), n in errors.items()]  # fmt: skip

    def _status(self, read: Callable[[ExecutorStatus], int | float | None]) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(_: CallbackOptions) -> list[Observation]:
            value = read(self._snapshot.last)
            return [] if value is None else [Observation(value)]

        return observe

    def _healthy(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(int(self._snapshot.last.backend_healthy), {SYSTEM: self._system()})]

    def _models(self, _: CallbackOptions) -> list[Observation]:
        s = self._snapshot.last
        return [Observation(int(ok), {MODEL: self._recorder.label(m, s.models)}) for m, ok in s.models.items()]

    def _breakers(self, _: CallbackOptions) -> list[Observation]:
        pool = self._snapshot.last.pool or []
        return [Observation(BREAKER_STATES.get(m.state, 2), {"lloom.backend.name": m.name, SYSTEM: m.backend})
                for m in pool]  # fmt: skip

    def _queue(self, _: CallbackOptions) -> list[Observation]:
        queue = self._snapshot.last.queue
        return [] if queue is None else [Observation(queue.queued)]

    def _cache(self, *, hits: bool) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(_: CallbackOptions) -> list[Observation]:
            cache = self._snapshot.last.cache
            if cache is None:
                return []
            out = [Observation(cache.hits if hits else cache.misses, {"lloom.cache.level": "memory"})]
            if cache.shared is not None:
                shared = cache.shared
                out.append(Observation(shared.hits if hits else shared.misses, {"lloom.cache.level": "shared"}))
            return out

        return observe

    def _lag(self, _: CallbackOptions) -> list[Observation]:
        receipts = self._snapshot.last.receipts
        if receipts is None:
            return []
        return [Observation(receipts.oldest_waiting_age_s or 0.0)]


# (metric name, unit, description, how to read a series' buckets, extra attributes)
_HISTOGRAMS: tuple[tuple[str, str, str, Callable[[Series], Buckets], dict[str, str]], ...] = (
    ("gen_ai.server.request.duration", "s", "Time a job took on this executor, received to answered",
     lambda s: s.duration, {}),
    ("gen_ai.client.operation.duration", "s", CLIENT_DURATION, lambda s: s.backend, {}),
    ("gen_ai.server.time_to_first_token", "s", "Time from receiving a streamed job to its first chunk",
     lambda s: s.ttft, {}),
    ("gen_ai.server.time_per_output_token", "s", "Time per output token after the first, of streamed jobs",
     lambda s: s.tpot, {}),
    ("gen_ai.client.token.usage", "{token}", TOKEN_USAGE, lambda s: s.input_tokens, {TOKEN_TYPE: "input"}),
    ("gen_ai.client.token.usage", "{token}", TOKEN_USAGE, lambda s: s.output_tokens, {TOKEN_TYPE: "output"}),
)  # fmt: skip


class HistogramProducer:
    """The recorder's histograms as OTLP metric points, made when a reader collects."""

    def __init__(self, recorder: JobRecorder, snapshot: StatusSnapshot, resource: Resource) -> None:
        self._recorder = recorder
        self._snapshot = snapshot
        self._resource = resource
        self._start_ns = time.time_ns()

    def produce(self) -> ScopeMetrics:
        now = time.time_ns()
        system = self._snapshot.last.backend_kind
        series = list(self._recorder.series.items())
        points: dict[str, tuple[str, str, list[HistogramDataPoint]]] = {}
        for name, unit, description, read, extra in _HISTOGRAMS:
            entry = points.setdefault(name, (unit, description, []))
            for key, s in series:
                b = read(s)
                if b.count == 0:
                    continue
                attrs = {**_job_attrs(key, system), **extra}
                del attrs[OUTCOME]  # the semantic conventions' histograms carry error.type only
                entry[2].append(HistogramDataPoint(
                    attributes=attrs, start_time_unix_nano=self._start_ns, time_unix_nano=now, count=b.count,
                    sum=b.sum, bucket_counts=list(b.counts), explicit_bounds=b.bounds, min=b.min, max=b.max,
                ))  # fmt: skip
        metrics = [
            Metric(name=name, description=description, unit=unit,
                   data=Histogram(data_points=dps, aggregation_temporality=AggregationTemporality.CUMULATIVE))
            for name, (unit, description, dps) in points.items() if dps
        ]  # fmt: skip
        return ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url="")

    def add_to(self, data: MetricsData | None) -> MetricsData:
        """`data` (what the SDK collected) with the histograms added."""
        return add_scope(data, self.produce(), self._resource)


def add_scope(data: MetricsData | None, ours: ScopeMetrics, resource: Resource) -> MetricsData:
    """`data` (what the SDK collected) with the metrics of `ours` added to their scope."""
    if data is None or not data.resource_metrics:
        return MetricsData(resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[ours],
                                                             schema_url="")])  # fmt: skip
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    # A histogram of a name already collected (an in-process gateway's gen_ai.client.*, beside the
    # executor's) joins that metric's points: the Prometheus reader makes one family per metric and
    # labels a second family of the same name with the first one's label keys.
    by_name = {m.name: (i, j) for i, sm in enumerate(scopes) for j, m in enumerate(sm.metrics)
               if isinstance(m.data, Histogram)}  # fmt: skip
    joined = set()
    for m in ours.metrics:
        if m.name in by_name and isinstance(m.data, Histogram):
            i, j = by_name[m.name]
            sm = scopes[i]
            old = sm.metrics[j]
            merged = Metric(name=old.name, description=old.description, unit=old.unit, data=Histogram(
                data_points=[*old.data.data_points, *m.data.data_points],  # type: ignore[union-attr]
                aggregation_temporality=AggregationTemporality.CUMULATIVE))  # fmt: skip
            scopes[i] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics[:j], merged, *sm.metrics[j + 1:]],
                                     schema_url=sm.schema_url)  # fmt: skip
            joined.add(m.name)
    if joined:
        ours = ScopeMetrics(scope=ours.scope, metrics=[m for m in ours.metrics if m.name not in joined],
                            schema_url=ours.schema_url)  # fmt: skip
    # Into the instruments' own scope (same name): the OTLP encoder keys scopes by name, so a
    # second ScopeMetrics of that scope would replace the first instead of joining it.
    same = next((i for i, sm in enumerate(scopes) if sm.scope.name == ours.scope.name), None)
    if same is None:
        scopes.append(ours)
    else:
        sm = scopes[same]
        scopes[same] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, *ours.metrics], schema_url=sm.schema_url)
    first = ResourceMetrics(resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url)
    return MetricsData(resource_metrics=[first, *rest])
