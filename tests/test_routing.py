"""Ranking offers by policy and constraints, on a hand-made catalogue."""

from __future__ import annotations

import random
from decimal import Decimal

from protocol.announcements import Announcement, Load, ModelCategory, ModelOffer, Performance, Pricing
from protocol.catalog import ExecutorEntry
from protocol.routing import (
    Category,
    Cheapest,
    Constraints,
    Fastest,
    LatencyBook,
    Specific,
    category_of,
    rank,
)


def entry(executor_id: str, *offers: ModelOffer, in_flight: int = 0, capacity: int = 8) -> ExecutorEntry:
    ann = Announcement(
        executor_id=executor_id, key=f"K{executor_id}", epoch=1, seq=1, sent_at_ms=0, heartbeat_ms=500,
        revision=1, load=Load(in_flight, capacity), models=list(offers),
    )  # fmt: skip
    return ExecutorEntry(ann, expires_at=float("inf"))


def offer(name: str, inp: str = "0", out: str = "0", **kw: object) -> ModelOffer:
    return ModelOffer(name=name, backend="test", pricing=Pricing(input=Decimal(inp), output=Decimal(out)), **kw)  # type: ignore[arg-type]


def order(*args: object, **kw: object) -> list[tuple[str, str]]:
    return [(c.executor_id, c.model) for c in rank(*args, rng=random.Random(1), **kw)]  # type: ignore[arg-type]


def test_cheapest_uses_the_jobs_estimated_tokens_on_both_prices() -> None:
    # a: cheap prompts, dear completions; b: the opposite.
    entries = [entry("a", offer("m1", "0.1", "10")), entry("b", offer("m2", "5", "0.1"))]
    assert order(entries, Cheapest(), prompt_tokens=10, completion_tokens=1000)[0] == ("b", "m2")
    assert order(entries, Cheapest(), prompt_tokens=10_000, completion_tokens=10)[0] == ("a", "m1")


def test_cost_arithmetic_is_exact() -> None:
    p = Pricing(input=Decimal("0.15"), output=Decimal("0.60"))
    assert p.cost(1_000_000, 1_000_000) == Decimal("0.75")
    assert p.cost(1, 1) == Decimal("0.00000075")


def test_specific_prefers_the_least_loaded_executor() -> None:
    entries = [entry("busy", offer("m"), in_flight=6), entry("idle", offer("m"), in_flight=1), entry("x", offer("n"))]
    assert order(entries, Specific("m")) == [("idle", "m"), ("busy", "m")]


def test_executors_at_capacity_go_last_whatever_the_policy() -> None:
    entries = [entry("full", offer("m", "0", "0"), in_flight=8), entry("open", offer("m", "9", "9"))]
    assert order(entries, Cheapest(), prompt_tokens=100, completion_tokens=100)[0] == ("open", "m")


def test_fastest_uses_observed_latency_before_advertised_and_tries_the_unmeasured_first() -> None:
    entries = [
        entry("a", offer("m", perf=Performance(latency_ms=50))),
        entry("b", offer("m", perf=Performance(latency_ms=500))),
        entry("c", offer("m")),
    ]
    assert order(entries, Fastest()) == [("c", "m"), ("a", "m"), ("b", "m")]
    book = LatencyBook()
    book.record("Ka", "m", 900.0)  # what this client saw beats what a was advertising
    book.record("Kc", "m", 100.0)
    assert order(entries, Fastest(), observed=book) == [("c", "m"), ("b", "m"), ("a", "m")]


def test_category_is_configured_or_derived_from_speed() -> None:
    fast_measured = offer("f", perf=Performance(tokens_per_s=120))
    slow_measured = offer("s", perf=Performance(tokens_per_s=12))
    configured = offer("q", category=ModelCategory.QUALITY, perf=Performance(tokens_per_s=500))
    assert [category_of(o) for o in (fast_measured, slow_measured, configured)] == [
        ModelCategory.FAST, ModelCategory.BALANCED, ModelCategory.QUALITY,
    ]  # fmt: skip
    entries = [entry("a", fast_measured, slow_measured), entry("b", configured)]
    assert order(entries, Category(ModelCategory.FAST)) == [("a", "f")]
    assert order(entries, Category(ModelCategory.QUALITY)) == [("b", "q")]


def test_constraints_filter_prices_cost_context_features_and_availability() -> None:
    entries = [
        entry("a", offer("small", "0.1", "0.1", context_length=4096, features=["chat"])),
        entry("b", offer("big", "3", "15", context_length=200_000, features=["chat", "tools"])),
        entry("c", offer("down", "0", "0", context_length=200_000, available=False)),
    ]
    def names(c: Constraints) -> set[str]:
        return {m for _, m in order(entries, Cheapest(), c, prompt_tokens=1000, completion_tokens=1000)}

    assert names(Constraints()) == {"small", "big"}
    assert names(Constraints(min_context=8192)) == {"big"}
    assert names(Constraints(features=frozenset({"tools"}))) == {"big"}
    assert names(Constraints(max_input_price=Decimal("1"))) == {"small"}
    assert names(Constraints(max_output_price=Decimal("15"))) == {"small", "big"}
    # big costs (1000*3 + 1000*15) / 1e6 = 0.018 USD for this job.
    assert names(Constraints(max_cost=Decimal("0.018"))) == {"small", "big"}
    assert names(Constraints(max_cost=Decimal("0.0179"))) == {"small"}


def test_equal_candidates_share_the_work() -> None:
    entries = [entry(str(i), offer("m")) for i in range(4)]
    firsts = {rank(entries, Specific("m"), rng=random.Random(seed))[0].executor_id for seed in range(40)}
    assert firsts == {"0", "1", "2", "3"}
