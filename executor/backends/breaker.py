"""A consecutive-failure circuit breaker for one backend.

closed --(failure_threshold failures in a row)--> open --(cooldown)--> half-open
half-open lets one request (or health check) through as a probe: success closes
the breaker, failure opens it again for another cooldown. Only failures that say
something about the backend count (unavailable, 5xx, timeouts, broken bodies);
a caller's bad request does not.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self.failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probing = False
        return self._state

    def allow(self) -> bool:
        """Whether a request may go to this backend now (claims the probe when half-open)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def available(self) -> bool:
        """Whether requests could go here (without claiming a probe)."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing)

    def success(self) -> None:
        self._state = BreakerState.CLOSED
        self.failures = 0
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self._state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
