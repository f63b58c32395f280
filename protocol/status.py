"""What an executor says about itself on `lloom.v1.status.*`: one typed status, built from parts.

Each component of a node reports its own part (`JobStats` from the node, `PoolMemberStatus`
from a pool's members, `QueueStatus` from the durable queue, and so on); the node puts them
together in `ExecutorStatus`. `lloom-executor status` decodes and renders this type, and
metrics read the same object, so there is one shape and one place that says what it means.
A part is None when that component is not configured on the node.
"""

from __future__ import annotations

import msgspec


class JobStats(msgspec.Struct, kw_only=True):
    """Counters of the jobs a node was sent (kept by the node; mutable, read by status)."""

    received: int = 0
    completed: int = 0
    failed: int = 0
    busy: int = 0
    cancelled: int = 0
    bad_requests: int = 0
    cancels_refused: int = 0  # cancels without the job's token (not from its caller)


class PoolMemberStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    backend: str
    state: str  # the breaker: closed | open | half_open
    failures: int  # in a row
    in_flight: int
    served: int


class QueueStatus(msgspec.Struct, frozen=True, kw_only=True):
    models: list[str]  # the models this node pulls queued jobs for
    queued: int
    ran: int
    skipped: int  # delivered again with a stored result: acknowledged, not run
    handed_back: int
    failed: int


class SharedCacheStatus(msgspec.Struct, frozen=True, kw_only=True):
    hits: int
    misses: int
    errors: int
    rejected: int = 0  # entries not signed by a trusted executor key: a miss, never served


class CacheStatus(msgspec.Struct, frozen=True, kw_only=True):
    entries: int
    hits: int
    misses: int
    shared: SharedCacheStatus | None = None


class BatchingStatus(msgspec.Struct, frozen=True, kw_only=True):
    calls: int
    jobs: int
    jobs_per_call: float | None


class ReceiptsStatus(msgspec.Struct, frozen=True, kw_only=True):
    issued: int  # the last sequence number issued
    unpublished: int  # in the outbox, not yet acknowledged by JetStream (waiting, in memory or on disk)
    mismatches: int  # reported token counts that disagreed with the local count
    # Whether receipts can be written durably now; when not, billable jobs are refused (and why).
    durable: bool = True
    error: str | None = None
    unwritable_for_s: float | None = None
    refused: int = 0  # jobs refused at admission because receipts could not be written
    failed: int = 0  # jobs that ended with `receipts_unavailable` because their receipt could not be written
    in_memory: int = 0  # of the unpublished, those held in memory (the rest are read back from disk)
    memory_window: int = 0  # the most held in memory ([receipts] memory_window)
    oldest_waiting_age_s: float | None = None  # how long the oldest unpublished receipt has waited


class ExecutorStatus(msgspec.Struct, frozen=True, kw_only=True):
    executor_id: str
    state: str  # new | running | draining | stopped
    backend: str  # its name, with what `auto` chose
    backend_kind: str  # what receipts and the catalogue call it: local, ollama, openai, ...
    backend_healthy: bool
    models: dict[str, bool]  # model -> available now
    in_flight: int
    capacity: int
    stats: JobStats
    pool: list[PoolMemberStatus] | None = None
    queue: QueueStatus | None = None
    batching: BatchingStatus | None = None
    cache: CacheStatus | None = None
    receipts: ReceiptsStatus | None = None


status_decoder = msgspec.json.Decoder(ExecutorStatus)
