"""A clock tests move by hand, for code that takes its time source as a collaborator."""

from __future__ import annotations


class FakeClock:
    """Callable like `time.monotonic`; returns `now`, which only the test changes."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
