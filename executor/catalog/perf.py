"""What this executor measures of its own service, per model, for the catalogue.

Exponentially weighted averages (recent jobs count most) of job latency, time
to first token, generation speed and success rate. Recording a job is a few
float operations: it runs on the hot path.
"""

from __future__ import annotations

from protocol.announcements import Performance

ALPHA = 0.2


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


class ModelPerf:
    __slots__ = ("samples", "latency_ms", "ttft_ms", "tokens_per_s", "success_rate")

    def __init__(self) -> None:
        self.samples = 0
        self.latency_ms: float | None = None
        self.ttft_ms: float | None = None
        self.tokens_per_s: float | None = None
        self.success_rate: float | None = None


class PerfTracker:
    def __init__(self) -> None:
        self._models: dict[str, ModelPerf] = {}

    def record(
        self,
        model: str,
        *,
        ok: bool,
        seconds: float,
        completion_tokens: int = 0,
        ttft_s: float | None = None,
    ) -> None:
        perf = self._models.get(model)
        if perf is None:
            perf = self._models[model] = ModelPerf()
        perf.samples += 1
        perf.success_rate = _ewma(perf.success_rate, 1.0 if ok else 0.0)
        if not ok:
            return
        if ttft_s is None:
            perf.latency_ms = _ewma(perf.latency_ms, seconds * 1000)
        else:
            perf.ttft_ms = _ewma(perf.ttft_ms, ttft_s * 1000)
        generating = seconds - (ttft_s or 0.0)
        if completion_tokens > 1 and generating > 0:
            perf.tokens_per_s = _ewma(perf.tokens_per_s, completion_tokens / generating)

    def snapshot(self, model: str) -> Performance:
        perf = self._models.get(model)
        if perf is None:
            return Performance()
        return Performance(
            samples=perf.samples,
            latency_ms=_round(perf.latency_ms),
            ttft_ms=_round(perf.ttft_ms),
            tokens_per_s=_round(perf.tokens_per_s),
            success_rate=_round(perf.success_rate, 3),
        )


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
