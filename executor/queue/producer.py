"""The durable queue's producer side on an executor: put a job no backend could serve into `LLOOM_JOBS`.

Jobs hold this (as `Enqueuer`, executor/jobs/context.py) to fall back to the queue; the
consumer (executor/queue/consumer.py) shares its counters, so the queue's status is one
object whichever side counted.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from protocol import subjects as subj
from protocol.durable import jobs_subject
from protocol.status import QueueStatus

ENQUEUE_TIMEOUT_S = 5.0


class QueueCounters(msgspec.Struct, kw_only=True):
    queued: int = 0
    ran: int = 0
    skipped: int = 0  # delivered again with a stored result: acknowledged, not run
    handed_back: int = 0
    failed: int = 0


class JobEnqueuer:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        fallback_models: set[str] | frozenset[str] = frozenset(),
        consume_all: bool = False,
        counters: QueueCounters | None = None,
    ) -> None:
        self._js = js
        self.fallback_models = frozenset(fallback_models)
        self.consume_all = consume_all
        self.counters = counters or QueueCounters()

    def is_fallback_for(self, model: str) -> bool:
        return model in self.fallback_models

    def pulls_for(self, served: frozenset[str]) -> frozenset[str]:
        """The served models whose queued jobs this executor takes."""
        return served if self.consume_all else served & self.fallback_models

    async def enqueue(self, job_id: str, model: str, payload: bytes, client: str | None) -> None:
        """Store a job in LLOOM_JOBS (once per job id); raises if JetStream does not take it."""
        headers = {subj.HDR_MSG_ID: job_id, subj.HDR_JOB_ID: job_id}
        if client:
            headers[subj.HDR_CLIENT] = client
        await self._js.publish(jobs_subject(model), payload, headers=headers, timeout=ENQUEUE_TIMEOUT_S)
        self.counters.queued += 1

    def status(self, served: frozenset[str]) -> QueueStatus:
        c = self.counters
        return QueueStatus(models=sorted(self.pulls_for(served)), queued=c.queued, ran=c.ran, skipped=c.skipped,
                           handed_back=c.handed_back, failed=c.failed)  # fmt: skip
