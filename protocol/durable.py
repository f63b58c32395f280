"""The durable job queue every peer shares: where queued jobs wait and where their results land.

Jobs wait in the JetStream stream `LLOOM_JOBS` (work-queue retention, file
storage), one subject per model (`lloom.v1.jobs.<model token>`), de-duplicated
by job id (`Nats-Msg-Id`), so submitting the same job twice stores it once.
Executors take them through one shared durable pull consumer per model
(explicit acks, redelivery after `ack_wait`, at most `max_deliver` times), and
put each result, a `ChatResponse` or an `ErrorReply` exactly as a unary reply
would carry it, in the key-value bucket `LLOOM_RESULTS` under the job id, where
clients fetch or await it, and then also publish it on the core subject
`lloom.v1.results.<job id>`, so a waiting client hears it at once without a
watch (a consumer) per job; the bucket stays the record. A job whose result is
there is never run again.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from protocol import subjects as subj
from protocol.jetstream import ensure_bucket, ensure_stream

JOBS_STREAM = "LLOOM_JOBS"
RESULTS_BUCKET = "LLOOM_RESULTS"
JOBS_ALL = subj.JOBS_ALL
DEFAULT_RESULT_TTL_S = 86400.0
DEFAULT_DUPLICATE_WINDOW_S = 3600.0


jobs_subject = subj.jobs_subject
result_subject = subj.result_subject


def consumer_name(model: str) -> str:
    """The durable consumer every executor serving `model` shares (one per model)."""
    return "jobs-" + subj.model_token(model).replace("~", "_")


async def ensure_jobs_stream(
    js: JetStreamContext, *, duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S, replicas: int = 1
) -> None:
    """Create `LLOOM_JOBS` unless it exists (on a cluster, create it first with `replicas=3`)."""
    config = StreamConfig(
        name=JOBS_STREAM,
        subjects=[JOBS_ALL],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=duplicate_window_s,
        num_replicas=replicas,
    )
    await ensure_stream(js, config)


async def results_bucket(js: JetStreamContext, *, ttl_s: float = DEFAULT_RESULT_TTL_S, replicas: int = 1) -> KeyValue:
    """`LLOOM_RESULTS`, created unless it exists (on a cluster, create it first with `replicas=3`)."""
    return await ensure_bucket(
        js, KeyValueConfig(bucket=RESULTS_BUCKET, ttl=ttl_s, history=1, storage=StorageType.FILE, replicas=replicas,
                           # Reads by key through $JS.API.DIRECT.GET.<stream>.<subject>: the only read
                           # a client is permitted, so none can walk the bucket by sequence number.
                           direct=True)  # fmt: skip
    )
