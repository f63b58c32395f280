"""What a job records when it ends: plain-Python counters and fixed-bucket histograms.

OpenTelemetry's Python instruments cost several microseconds per call, and a job would
make half a dozen of them; the budget for telemetry is 10 µs of executor CPU per request.
So a job makes one call here (`JobRecorder.job_done`): a dict lookup and a few integer
additions into per-(model, outcome) aggregates. The SDK reads these aggregates only when
metrics are collected (executor/telemetry/metrics.py), as observable counters and as
histogram points, so a scrape every 15 s pays for the export and the jobs do not.

Labels stay bounded: the model is one of the executor's own served models (`served`),
never a name a caller typed (a job for an unknown model counts as `other`), at most
`max_models` of them; the outcome is `ok` or a wire error code (a closed set).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Container

OTHER_MODEL = "other"
OK = "ok"

# Upper bounds (inclusive, as in Prometheus `le`) of the histograms' buckets.
DURATION_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BOUNDS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPOT_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
TOKEN_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class Buckets:
    """One histogram series: counts per bucket (the last one is +Inf), their sum, min and max."""

    __slots__ = ("bounds", "counts", "count", "sum", "min", "max")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


class Series:
    """Everything recorded for one (model, outcome): requests, and the histograms' series."""

    __slots__ = ("requests", "duration", "backend", "ttft", "tpot", "input_tokens", "output_tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.duration = Buckets(DURATION_BOUNDS_S)
        self.backend = Buckets(DURATION_BOUNDS_S)
        self.ttft = Buckets(TTFT_BOUNDS_S)
        self.tpot = Buckets(TPOT_BOUNDS_S)
        self.input_tokens = Buckets(TOKEN_BOUNDS)
        self.output_tokens = Buckets(TOKEN_BOUNDS)


class JobRecorder:
    """Per-(model, operation, outcome) aggregates of finished jobs; read at collection time."""

    __slots__ = ("_max_models", "_models", "series")

    def __init__(self, *, max_models: int = 100) -> None:
        self._max_models = max_models
        self._models: set[str] = set()
        self.series: dict[tuple[str, str, str], Series] = {}

    def label(self, model: str, served: Container[str]) -> str:
        """The model label for `model`: itself if `served` by the node (within the cap), else `other`."""
        if model in self._models:
            return model
        if model in served and len(self._models) < self._max_models:
            self._models.add(model)
            return model
        return OTHER_MODEL

    def job_done(
        self,
        model: str,
        operation: str,
        outcome: str,
        seconds: float,
        *,
        served: Container[str],
        backend_s: float | None = None,
        ttft_s: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """One finished job (the one call a job makes; keep it cheap)."""
        key = (model if model in self._models else self.label(model, served), operation, outcome)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series()
        s.requests += 1
        s.duration.add(seconds)
        if backend_s is not None:
            s.backend.add(backend_s)
        if input_tokens is not None:
            s.input_tokens.add(input_tokens)
        if output_tokens is not None:
            s.output_tokens.add(output_tokens)
        if ttft_s is not None:
            s.ttft.add(ttft_s)
            if output_tokens is not None and output_tokens > 1:
                s.tpot.add((seconds - ttft_s) / (output_tokens - 1))
