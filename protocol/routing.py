"""Choosing executors for a job: the four ways to ask for a model, constraints, and the order to try.

The design document's `ModelRequest`: `Specific("llama-2-13b")`,
`Category(ModelCategory.FAST)`, `Cheapest()`, `Fastest()`. `rank` filters every
offer in the catalogue by the request and the `Constraints` (price ceilings,
maximum expected cost, minimum context length, required features), then orders
what is left:

| policy | first | then |
|---|---|---|
| Specific, Category | least loaded | cheapest, fastest |
| Cheapest | lowest expected cost (estimated prompt + completion tokens at the offer's prices) | least loaded |
| Fastest | lowest latency this client observed, else the executor's advertised latency; unmeasured first, once | least loaded |

Executors at capacity go last whatever the policy: they would answer `busy`.
With a keyring (`trust`), executors it does not trust are never candidates, however
cheap or fast they claim to be.
Ties are broken at random so equal executors share the work.

A model without a configured category gets one from its measurements:
`fast` from `FAST_TOKENS_PER_S` tokens/s up, `balanced` below.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from decimal import Decimal

import msgspec

from protocol.announcements import ModelCategory, ModelOffer
from protocol.catalog import ExecutorEntry
from protocol.trust import OPEN, Trust

FAST_TOKENS_PER_S = 50.0


class Specific(msgspec.Struct, frozen=True, tag="specific"):
    model: str


class Category(msgspec.Struct, frozen=True, tag="category"):
    category: ModelCategory


class Cheapest(msgspec.Struct, frozen=True, tag="cheapest"):
    pass


class Fastest(msgspec.Struct, frozen=True, tag="fastest"):
    pass


ModelRequest = Specific | Category | Cheapest | Fastest


class Constraints(msgspec.Struct, frozen=True, kw_only=True):
    max_input_price: Decimal | None = None  # USD per 1M tokens
    max_output_price: Decimal | None = None
    max_cost: Decimal | None = None  # USD, for this job's estimated tokens
    min_context: int | None = None
    features: frozenset[str] = frozenset()

    def admits(self, offer: ModelOffer, expected_cost: Decimal) -> bool:
        p = offer.pricing
        if self.max_input_price is not None and p.input > self.max_input_price:
            return False
        if self.max_output_price is not None and p.output > self.max_output_price:
            return False
        if self.max_cost is not None and expected_cost > self.max_cost:
            return False
        if self.min_context is not None and (offer.context_length or 0) < self.min_context:
            return False
        return self.features <= set(offer.features)


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    executor_id: str
    key: str
    model: str
    offer: ModelOffer
    expected_cost: Decimal
    latency_ms: float | None
    load: float  # in flight / capacity
    curve_key: str | None = None  # set when the executor takes sealed jobs (protocol/sealing.py)


class LatencyBook:
    """Latencies this client observed per (executor key, model), exponentially weighted."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._ms: dict[tuple[str, str], float] = {}

    def record(self, key: str, model: str, ms: float) -> None:
        old = self._ms.get((key, model))
        self._ms[(key, model)] = ms if old is None else old + self.alpha * (ms - old)

    def get(self, key: str, model: str) -> float | None:
        return self._ms.get((key, model))


def category_of(offer: ModelOffer) -> ModelCategory:
    if offer.category is not None:
        return offer.category
    tps = offer.perf.tokens_per_s
    return ModelCategory.FAST if tps is not None and tps >= FAST_TOKENS_PER_S else ModelCategory.BALANCED


def _wanted(want: ModelRequest, offer: ModelOffer) -> bool:
    if isinstance(want, Specific):
        return offer.name == want.model
    if isinstance(want, Category):
        return category_of(offer) == want.category
    return True


NO_CONSTRAINTS = Constraints()


def rank(
    entries: Iterable[ExecutorEntry],
    want: ModelRequest,
    constraints: Constraints = NO_CONSTRAINTS,
    *,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    observed: LatencyBook | None = None,
    rng: random.Random | None = None,
    trust: Trust = OPEN,
) -> list[Candidate]:
    """Every admissible (executor, model), best first."""
    found: list[Candidate] = []
    for entry in entries:
        if trust.closed and not trust.trusts(entry.key, entry.announcement.endorsement):
            continue
        load = entry.load.in_flight / entry.load.capacity if entry.load.capacity else 1.0
        for offer in entry.models:
            if not offer.available or not _wanted(want, offer):
                continue
            cost = offer.pricing.cost(prompt_tokens, completion_tokens)
            if not constraints.admits(offer, cost):
                continue
            seen = observed.get(entry.key, offer.name) if observed is not None else None
            found.append(
                Candidate(
                    executor_id=entry.executor_id,
                    key=entry.key,
                    model=offer.name,
                    offer=offer,
                    expected_cost=cost,
                    latency_ms=seen if seen is not None else offer.perf.latency_ms,
                    load=load,
                    curve_key=entry.announcement.curve_key,
                )
            )
    (rng or random).shuffle(found)  # equal candidates share the work

    def latency(c: Candidate) -> float:
        # Optimistic about the unmeasured: each gets tried once, then its measurement decides.
        return c.latency_ms if c.latency_ms is not None else 0.0

    def full(c: Candidate) -> bool:
        return c.load >= 1.0

    if isinstance(want, Cheapest):
        found.sort(key=lambda c: (full(c), c.expected_cost, c.load))
    elif isinstance(want, Fastest):
        found.sort(key=lambda c: (full(c), latency(c), c.load))
    else:
        found.sort(key=lambda c: (full(c), c.load, c.expected_cost, latency(c)))
    return found
