"""One backoff policy shape for every retry loop."""

from __future__ import annotations

from executor.config import RetryConfig
from protocol.backoff import Backoff, Retry


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    policy = Backoff(initial_s=0.1, max_s=1.0)
    assert [policy.delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.delay(10_000) == 1.0  # no overflow on a loop that retried all night


def test_jitter_draws_each_delay_between_its_lower_fraction_and_itself() -> None:
    policy = Backoff(initial_s=1.0, max_s=8.0, jitter=0.5)
    draws = [policy.delay(2) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in draws) and len(set(draws)) > 100


def test_a_retry_loop_counts_attempts_and_starts_over_after_a_success() -> None:
    retry = Retry(Backoff(initial_s=1.0, max_s=100.0, factor=3.0))
    assert [retry.next_delay() for _ in range(3)] == [1.0, 3.0, 9.0]
    retry.reset()
    assert retry.next_delay() == 1.0


def test_the_design_documents_retry_config_is_a_backoff_policy() -> None:
    # RetryConfig's defaults: 1 s first, doubling, at most 30 s.
    assert [RetryConfig().backoff().delay(n) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
