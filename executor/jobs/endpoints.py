"""What the node counts per job subject, for NATS micro discovery's per-endpoint stats.

The node keeps one `EndpointCounts` per subject it takes jobs on (a model's complete,
embed and text subjects, its direct subject), made the first time a job arrives there.
It counts every message that arrives (`requests`), and every one whose final answer was
an error (`errors`: refused at admission, or a job that ended with a typed error, a
cancellation included: its reply carries `Nats-Service-Error` like any other), with the
last such error. `processing_s` adds up the run time of admitted jobs, from admission
to their final answer; a refusal is answered at admission and adds nothing.

Recording is on the hot path: a dict lookup and an integer increment on arrival, one float
addition when a job ends (the node does both inline); an error object is kept as it is, and
turned into text only when someone asks for stats (executor/catalog/micro.py).
"""

from __future__ import annotations

from protocol.errors import LloomError


class EndpointCounts:
    __slots__ = ("errors", "last_error", "processing_s", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        # Seconds as a float: one addition per job; stats turn it into the spec's nanoseconds.
        self.processing_s = 0.0
        self.last_error: LloomError | None = None

    @property
    def processing_ns(self) -> int:
        return int(self.processing_s * 1e9)

    def failed(self, err: LloomError) -> None:
        """A request whose final answer was `err` (refused at admission, or its job failed)."""
        self.errors += 1
        self.last_error = err
