"""The executor's side of the durable job queue (protocol/durable.py).

- A unary job no backend could serve, for a model whose fallback is `queue`, goes
  into `LLOOM_JOBS` through `JobEnqueuer` (executor/queue/producer.py; the caller is
  told `queued` with its job id).
- Workers, one per model this queue serves here, pull from that model's shared
  durable consumer only while the node has room and a backend for the model is
  available, so jobs wait in JetStream, not in a process that cannot run them.
- Each delivered job is skipped (and acknowledged) when its result is already in
  `LLOOM_RESULTS`: a redelivery never runs or bills a job twice. Otherwise it
  runs through the node like any other job (capacity, cancel, drain, receipts,
  cache), tells JetStream it is still at work every third of `ack_wait` while
  it runs, and its result goes into the bucket before the message is
  acknowledged (signed by this executor's key: protocol/results.py, so a
  result planted in the bucket by anyone else is refused by the client). A run that fails because no backend could serve it (or the node
  shut down under it) is handed back with a backoff delay, up to `max_deliver`
  deliveries; any other outcome, an answer or a typed error, is its result.

A job whose last allowed delivery ends without an answer (its executor died)
is not redelivered by JetStream; the server's max-deliveries advisory reaches
one executor (queue group), which files a typed error as its result and removes
it from the queue, so a caller awaiting it is told rather than left waiting.

The one window left: a process killed after a job's receipt is written and
before its result is stored runs the job again on redelivery (two receipts for
one job id, which `lloom receipts verify` names).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.kv import KeyValue

from executor.config import QueueConfig, RetryConfig
from executor.jobs.node import ExecutorNode
from executor.queue.producer import JobEnqueuer
from protocol import subjects as subj
from protocol.backoff import Backoff, Retry
from protocol.durable import (
    JOBS_STREAM,
    RESULTS_BUCKET,
    consumer_name,
    ensure_jobs_stream,
    jobs_subject,
    result_subject,
    results_bucket,
)
from protocol.errors import BackendUnavailable, ErrorCode, ForgedResult, InternalError, InvalidRequest
from protocol.identity import Identity
from protocol.messages import ErrorReply, encoder, error_to_wire, request_decoder, unary_reply_decoder
from protocol.results import open_result, seal_result

log = structlog.get_logger(logger_name=__name__)

# Waiting for JetStream to accept the queue's stream and bucket, and for a pull to work again.
PREPARE_BACKOFF = Backoff(initial_s=0.1, max_s=10.0)
PULL_BACKOFF = Backoff(initial_s=0.1, max_s=5.0)

class _MaxDeliveries(msgspec.Struct):
    stream_seq: int
    deliveries: int = 0


_decode_advisory = msgspec.json.Decoder(_MaxDeliveries).decode

# Outcomes that say nothing about the job, only that it could not run here now.
_HAND_BACK = frozenset({
    ErrorCode.BACKEND_ERROR, ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.BACKEND_TIMEOUT,
    ErrorCode.BACKEND_PROTOCOL, ErrorCode.SHUTTING_DOWN, ErrorCode.BUSY, ErrorCode.QUEUED,
})  # fmt: skip


class JobQueue:
    def __init__(
        self,
        nc: NATS,
        node: ExecutorNode,
        enqueuer: JobEnqueuer,
        config: QueueConfig | None = None,
        *,
        retry: RetryConfig | None = None,
        identity: Identity | None = None,
        idle_poll_s: float = 0.2,
        fetch_wait_s: float = 1.0,
        max_fetch: int = 32,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.node = node
        self.config = config or QueueConfig()
        self.enqueuer = enqueuer
        self.stats = enqueuer.counters  # one set of counters for both sides of the queue
        self.retry = retry or RetryConfig()
        # Signs every stored result; the node's identity (a key of its own when none is given).
        self.identity = identity or Identity.generate()
        self.idle_poll_s = idle_poll_s
        self.fetch_wait_s = fetch_wait_s
        self.max_fetch = max_fetch
        self._kv: KeyValue | None = None
        self._advisories: Subscription | None = None
        self._ready = asyncio.Event()  # the stream and the bucket exist
        self._preparing: asyncio.Task[None] | None = None
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        # Jobs that ran here and whose result is still being stored (through a NATS outage, say):
        # a redelivery meanwhile finds no result in the bucket, and must not run the job again.
        self._storing: set[str] = set()

    async def start(self) -> None:
        """Start pulling; the stream and bucket are made ready in the background (JetStream may be
        away, or a cluster still electing): a node does not fail to start for its queue."""
        self._advisories = await self._nc.subscribe(
            subj.max_deliveries_advisory(JOBS_STREAM), queue="lloom-queue-advisories",
            cb=self._on_max_deliveries,
        )  # fmt: skip
        try:  # usually JetStream answers at once, and jobs can be queued as soon as we return
            await self._prepare_once()
        except (nats.errors.Error, OSError):
            self._preparing = asyncio.create_task(self._prepare(), name="queue-prepare")
        self.node.on_models_changed.append(self.sync_models)
        self.sync_models()

    async def _prepare_once(self) -> None:
        await ensure_jobs_stream(self._js)
        self._kv = await results_bucket(self._js, ttl_s=self.config.result_ttl_secs)
        self._ready.set()

    async def _prepare(self) -> None:
        retry = Retry(PREPARE_BACKOFF)
        while True:
            try:
                await self._prepare_once()
                return
            except (nats.errors.Error, OSError) as e:
                delay = retry.next_delay()
                log.warning("durable queue not ready (is JetStream enabled?); retrying",
                            error=str(e) or type(e).__name__, retry_in_s=round(delay, 2))  # fmt: skip
                await asyncio.sleep(delay)

    def sync_models(self) -> None:
        """Pull for exactly the models this queue serves here (they change with the backend's list)."""
        served = self.enqueuer.pulls_for(self.node.models)
        for model in served - self._workers.keys():
            self._workers[model] = asyncio.create_task(self._worker(model), name=f"queue-{model}")
        for model in self._workers.keys() - served:
            self._workers.pop(model).cancel()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop pulling; wait (bounded) for runs in progress to store their results and ack."""
        if self._advisories is not None and not self._nc.is_closed:
            await self._advisories.unsubscribe()
            self._advisories = None
        workers = list(self._workers.values())
        self._workers.clear()
        if self._preparing is not None:
            workers.append(self._preparing)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout)

    # -- pulling --

    async def _worker(self, model: str) -> None:
        await self._ready.wait()
        retry = Retry(PULL_BACKOFF)
        psub = None
        while True:
            try:
                if psub is None:
                    psub = await self._js.pull_subscribe(
                        jobs_subject(model),
                        durable=consumer_name(model),
                        stream=JOBS_STREAM,
                        config=ConsumerConfig(
                            ack_policy=AckPolicy.EXPLICIT,
                            ack_wait=self.config.ack_wait_secs,
                            max_deliver=self.config.max_deliver,
                        ),
                    )
                if not (self.node.has_room() and self.node.model_available(model)):
                    await asyncio.sleep(self.idle_poll_s)
                    continue
                room = self.node.config.max_concurrent_jobs - self.node.in_flight
                try:
                    # As many as the node has room for, in one request: one at a time, the
                    # round trip per fetch would bound the queue's throughput.
                    msgs = await psub.fetch(max(1, min(room, self.max_fetch)), timeout=self.fetch_wait_s)
                except nats.errors.TimeoutError:
                    continue
                retry.reset()
                for msg in msgs:
                    task = asyncio.create_task(self._handle(msg))
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)
            except asyncio.CancelledError:
                # A pull subscription left behind holds the connection's drain at shutdown until
                # its timeout (30 s: `docker compose stop` SIGKILLed the executor after 10 s).
                if psub is not None and not self._nc.is_closed:
                    with contextlib.suppress(nats.errors.Error, ValueError):
                        await psub.unsubscribe()
                raise
            except (nats.errors.Error, OSError) as e:  # NATS or JetStream away: try again, slower each time
                delay = retry.next_delay()
                log.warning("job queue unreachable; retrying", model=model, error=str(e) or type(e).__name__,
                            retry_in_s=round(delay, 2))  # fmt: skip
                await asyncio.sleep(delay)

    # -- one delivered job --

    async def _handle(self, msg: Msg) -> None:
        headers = msg.headers or {}
        job_id = headers.get(subj.HDR_JOB_ID, "")
        try:
            subj.check_id("job id", job_id)
            request = request_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, subj.SubjectError) as e:
            # Bad input never comes back: its result says why (when it has an id to file it under).
            self.stats.failed += 1
            log.warning("unreadable queued job dropped", job_id=job_id or None, error=str(e))
            if job_id and not isinstance(e, subj.SubjectError):
                await self._store(job_id, encoder.encode(error_to_wire(InvalidRequest(f"invalid request: {e}"),
                                                                       job_id=job_id, executor_id=self.node.id)))  # fmt: skip
            await _quietly(msg.term())
            return
        if job_id in self._storing:
            return  # ran here; the run storing its result acks it (a 3-node cluster test ran it twice)
        if not self.node.has_room():  # filled (or draining) since the fetch: give it straight back
            await _quietly(msg.nak())
            return
        if await self._has_result(job_id):
            self.stats.skipped += 1  # ran before; its ack was lost: acknowledge, do not run again
            await _quietly(msg.ack_sync())
            return
        running = self.node.run_queued(job_id, request, msg.data, client=_client_id(headers),
                                       timeout_s=self.config.job_timeout_secs,
                                       cancel_token=_cancel_token(headers))  # fmt: skip
        if running is None:
            return  # this very job runs here already (redelivered while running): that run acks it
        task, collected = running
        alive = asyncio.create_task(self._keep_alive(msg))
        try:
            await asyncio.shield(task)
        finally:
            alive.cancel()
        result = collected.last
        outcome = unary_reply_decoder.decode(result) if result is not None else None
        deliveries = msg.metadata.num_delivered or 1
        if (outcome is None or (isinstance(outcome, ErrorReply) and outcome.code in _HAND_BACK)) and (
            deliveries < self.config.max_deliver
        ):
            self.stats.handed_back += 1
            delay = self._delay(deliveries)
            log.info("queued job handed back", job_id=job_id, delivery=deliveries, retry_in_s=round(delay, 2),
                     reason=getattr(outcome, "message", None))  # fmt: skip
            await _quietly(msg.nak(delay=delay))
            return
        if result is None:  # nothing to file: its last delivery ended without an answer
            result = encoder.encode(error_to_wire(InternalError("the job ended without a result"), job_id=job_id))
        if type(outcome) is ErrorReply:
            self.stats.failed += 1
        else:
            self.stats.ran += 1
        self._storing.add(job_id)
        try:
            await self._store(job_id, result, keep_alive=msg)
            await _quietly(msg.ack_sync())
        finally:
            self._storing.discard(job_id)

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """A job JetStream gave up on: file why as its result (unless it has one) and drop it."""
        if not self._ready.is_set():
            return  # another executor's queue files it
        try:
            advisory = _decode_advisory(msg.data)
            stored = await self._js.get_msg(JOBS_STREAM, advisory.stream_seq)
            job_id = (stored.headers or {}).get(subj.HDR_JOB_ID, "")
            subj.check_id("job id", job_id)
            if not await self._has_result(job_id):
                err = BackendUnavailable(
                    f"job {job_id} was given up after {advisory.deliveries} deliveries: the executors running it"
                    " stopped answering (raise [executors.queue] max_deliver or ack_wait_secs if jobs run long)"
                )
                await self._store(job_id, encoder.encode(error_to_wire(err, job_id=job_id)))
                self.stats.failed += 1
                log.warning("queued job given up", job_id=job_id, deliveries=advisory.deliveries)
            await self._js.delete_msg(JOBS_STREAM, advisory.stream_seq)
        except (msgspec.DecodeError, msgspec.ValidationError, subj.SubjectError, nats.errors.Error, OSError) as e:
            log.warning("max-deliveries advisory not handled", error=str(e) or type(e).__name__)

    async def _has_result(self, job_id: str) -> bool:
        # Asked of the stream's leader, not with a direct get: any replica answers a direct get,
        # and one still catching up (after a node's loss) said "no result" for a stored one, so
        # another executor ran the job again (tests/test_compose.py counted it).
        try:
            entry = await self._js.get_msg(f"KV_{RESULTS_BUCKET}", subject=f"$KV.{RESULTS_BUCKET}.{job_id}")
        except nats.js.errors.NotFoundError:
            return False
        if (entry.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return False
        try:
            open_result(entry.data or b"", job_id)
        except ForgedResult:
            log.warning("unsigned or forged result in the results bucket; the job runs", job_id=job_id)
            return False  # planted by someone else: run the job and file a real result over it
        return True

    async def _store(self, job_id: str, data: bytes, keep_alive: Msg | None = None) -> None:
        """Put the result; through a NATS outage too (keeping the job ours), since the job has run."""
        assert self._kv is not None
        retry = Retry(Backoff(initial_s=0.1, max_s=self.config.ack_wait_secs / 3))
        data = seal_result(self.identity, job_id, data)
        while True:
            try:
                await self._kv.put(job_id, data)
                await self._nc.publish(result_subject(job_id), data)  # wakes a waiting client at once
                return
            except (nats.errors.Error, OSError) as e:
                log.warning("cannot store a queued job's result yet", job_id=job_id, error=str(e) or type(e).__name__)
                if keep_alive is not None:
                    await _quietly(keep_alive.in_progress())
                await asyncio.sleep(retry.next_delay())

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.config.ack_wait_secs / 3)
            await _quietly(msg.in_progress())

    def _delay(self, deliveries: int) -> float:
        return self.retry.backoff().delay(deliveries - 1)


def _client_id(headers: dict[str, str]) -> str | None:
    client = headers.get(subj.HDR_CLIENT)
    try:
        return None if client is None else subj.check_client_id(client)
    except subj.SubjectError:
        return None  # never copy an oversized or odd id into a receipt; the job itself is fine


def _cancel_token(headers: dict[str, str]) -> str | None:
    token = headers.get(subj.HDR_CANCEL_TOKEN)
    try:
        return None if token is None else subj.check_cancel_token(token)
    except subj.SubjectError:
        return None


async def _quietly(aw: object) -> None:
    """Acks are best effort: one lost to an outage means a redelivery, which the results bucket absorbs."""
    try:
        await aw  # type: ignore[misc]
    except (nats.errors.Error, OSError) as e:
        log.warning("queue ack not delivered", error=str(e) or type(e).__name__)
