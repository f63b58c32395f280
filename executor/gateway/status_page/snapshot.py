"""`StatusSnapshot`: what the status page shows, built from the live catalogue in one pass.

Prices are Decimal strings (USD per 1M tokens), as on the wire; performance figures are the
executors' own recent measurements (exponentially weighted, from their announcements).
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from protocol.catalog import Catalog


class OfferStatus(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    backend: str
    input_price: Decimal
    output_price: Decimal
    context_length: int | None
    available: bool
    samples: int
    latency_ms: float | None
    ttft_ms: float | None
    tokens_per_s: float | None
    success_rate: float | None


class ExecutorStatus(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    key: str
    state: str  # up | down
    in_flight: int
    capacity: int
    offers: list[OfferStatus]


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    executors: int
    available: int
    cheapest_input: Decimal
    cheapest_output: Decimal
    best_tokens_per_s: float | None
    best_latency_ms: float | None


class StatusSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    executors: list[ExecutorStatus]
    models: list[ModelStatus]


def build(catalog: Catalog) -> StatusSnapshot:
    executors = []
    by_model: dict[str, list[OfferStatus]] = {}
    for entry in sorted(catalog.entries(), key=lambda e: e.executor_id):
        offers = [
            OfferStatus(model=o.name, backend=o.backend, input_price=o.pricing.input, output_price=o.pricing.output,
                        context_length=o.context_length, available=o.available, samples=o.perf.samples,
                        latency_ms=o.perf.latency_ms, ttft_ms=o.perf.ttft_ms, tokens_per_s=o.perf.tokens_per_s,
                        success_rate=o.perf.success_rate)  # fmt: skip
            for o in entry.models
        ]
        for o in offers:
            by_model.setdefault(o.model, []).append(o)
        executors.append(ExecutorStatus(id=entry.executor_id, key=entry.key, state=entry.announcement.state,
                                        in_flight=entry.load.in_flight, capacity=entry.load.capacity,
                                        offers=offers))  # fmt: skip
    models = [
        ModelStatus(
            name=name,
            executors=len(offers),
            available=sum(o.available for o in offers),
            cheapest_input=min(o.input_price for o in offers),
            cheapest_output=min(o.output_price for o in offers),
            best_tokens_per_s=max((o.tokens_per_s for o in offers if o.tokens_per_s is not None), default=None),
            best_latency_ms=min((o.latency_ms for o in offers if o.latency_ms is not None), default=None),
        )
        for name, offers in sorted(by_model.items())
    ]
    return StatusSnapshot(executors=executors, models=models)
