"""Exponential backoff as a value: every retry loop in the project takes its delays from one `Backoff`.

A policy is data (first delay, cap, factor, jitter), so a component states its
policy where it is configured and a test can read it; `Retry` counts attempts
for a loop that resets after a success. Delays are

    delay(n) = min(max_s, initial_s * factor**n) * uniform(1 - jitter, 1)

so with jitter, many clients retrying after one outage spread out instead of
arriving together.
"""

from __future__ import annotations

import random

import msgspec


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.0  # 0: exact delays; 0.5: each delay drawn from [half, whole]

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (0 for the first retry)."""
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return base * random.uniform(1.0 - self.jitter, 1.0) if self.jitter else base


class Retry:
    """Attempts of one retry loop: `next_delay()` after a failure, `reset()` after a success."""

    __slots__ = ("attempt", "policy")

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.attempt = 0

    def next_delay(self) -> float:
        delay = self.policy.delay(self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
