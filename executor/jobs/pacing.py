"""How long a caller refused as `busy` should wait: the estimate busy replies carry.

A node at `max_concurrent_jobs` refuses a job at once rather than queueing it
(executor/jobs/node.py). Without a hint, every refused caller retries on its own
short schedule, and a burst turns into several times its size in refusals. With
one, the refused callers are spread over the time the running jobs need to make
room: each is given the next free moment of a virtual queue that advances by
`mean duration / capacity` per caller, starting when the oldest running job is
expected to end. The mean is a moving average of finished jobs' durations; before
any job has finished, the oldest running job is guessed to end at twice its age (within
`MIN_GUESS_S`..`MAX_GUESS_S`) and callers are spaced by `MIN_GUESS_S`, so a wrong guess
corrects itself the next time round and a stuck job does not push callers far out.
"""

from __future__ import annotations

# Weight of the newest duration in the moving average.
ALPHA = 0.2
# The duration assumed when no job has finished yet lies between these.
MIN_GUESS_S = 0.25
MAX_GUESS_S = 2.0
# Callers are paced to this share of the capacity, so small errors in the estimate
# make a caller wait a little longer rather than be refused again.
PACE = 0.9


class BusyPacer:
    """Estimates, per refused caller, how long until this node can take its job."""

    __slots__ = ("_next_free", "capacity", "mean_s")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.mean_s: float | None = None
        self._next_free = 0.0

    def record(self, seconds: float) -> None:
        """A job ended after `seconds`."""
        mean = self.mean_s
        self.mean_s = seconds if mean is None else mean + ALPHA * (seconds - mean)

    def retry_after(self, now: float, oldest_started: float) -> float:
        """Seconds the next refused caller should wait (`oldest_started`: the oldest running job's start)."""
        mean = self.mean_s
        if mean is None:
            # Unknown yet: guess when the oldest ends, but space callers by the smallest guess, so
            # a wrong guess (a job that never ends) does not push every later caller far out.
            ends = oldest_started + min(MAX_GUESS_S, max(MIN_GUESS_S, 2 * (now - oldest_started)))
            step = MIN_GUESS_S
        else:
            ends, step = oldest_started + mean, mean
        free = max(self._next_free, ends, now)
        self._next_free = free + step / (self.capacity * PACE)
        return round(free - now, 3)
