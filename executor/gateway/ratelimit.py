"""Requests per minute per API key, as a token bucket in this gateway's memory.

Each key's bucket holds up to `rpm` tokens and refills at `rpm / 60` per second; a request
takes one, and a request that finds none is refused with the seconds until one is back
(the 429's `Retry-After`). So a key may burst its whole minute at once, then goes at its rate.

Per gateway, on purpose: a limit shared by all gateways would need a write to the bus on
every request (the hot path the gateway keeps free of them), and a rate limit is there to
protect capacity, which each gateway has its own share of. With N gateways behind a load
balancer a key gets up to N x rpm in all. Budgets, which are money, are shared (keystore.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    __slots__ = ("_buckets", "_clock")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when counted)

    def take(self, key_id: str, rpm: int | None) -> float | None:
        """Take a token for `key_id`: None if allowed, else the seconds until one is free."""
        if rpm is None:
            return None
        now = self._clock()
        tokens, then = self._buckets.get(key_id, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - then) * rpm / 60.0)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return None
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) * 60.0 / rpm

    def forget(self, key_id: str) -> None:
        self._buckets.pop(key_id, None)
