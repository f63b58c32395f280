"""What the node counts per job subject, for NATS micro discovery's per-endpoint stats.

The node keeps one `EndpointCounts` per subject it takes jobs on (a model's complete,
embed and text subjects, its direct subject), made the first time a job arrives there.
It counts every message that arrives (`requests`), and every one whose final answer was
an error (`errors`: refused at admission, or a job that ended with a typed error, a
cancellation included: its reply carries `Nats-Service-Error` like any other), with the
last such error. `processing_ns` adds up the run time of admitted jobs, from admission
to their final answer; a refusal is answered at admission and adds nothing.

Recording is on the hot path: an integer increment on arrival, and on a job's end one
float-to-int addition; the error object is kept as it is, and turned into text only when
someone asks for stats (executor/catalog/micro.py).
"""

from __future__ import annotations

from protocol.errors import LloomError


class EndpointCounts:
    __slots__ = ("errors", "last_error", "processing_ns", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.processing_ns = 0
        self.last_error: LloomError | None = None

    def refused(self, err: LloomError) -> None:
        """A request answered with `err` at admission, before any job ran."""
        self.errors += 1
        self.last_error = err

    def finished(self, seconds: float, err: LloomError | None) -> None:
        """A job admitted here ended after `seconds`, with `err` or successfully (None)."""
        self.processing_ns += int(seconds * 1e9)
        if err is not None:
            self.errors += 1
            self.last_error = err
