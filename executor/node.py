"""The executor node: NATS subscriptions, the concurrency limit, cancellation and drain.

    node = ExecutorNode(nc, backend, NodeConfig())
    async with node:            # subscribes; leaving drains
        await stop_event.wait()

The node subscribes, in the `lloom-executors` queue group, to the subject of
every model it serves (so N executors share a model's load), plus a direct
subject of its own and the cancel subjects. Each accepted job runs in its own
task (nats.py runs one subscription's callbacks one at a time); past
`max_concurrent_jobs` a job gets an immediate `busy` reply instead of waiting in
an unbounded queue. Long jobs ping their caller; a caller that has gone away
(no responders) or says it no longer waits has its job cancelled, which closes
the backend call. `stop()` drains: it unsubscribes (NATS sends new jobs to other
members of the queue group), lets in-flight jobs finish within
`drain_timeout_secs`, then cancels the rest with a `shutting_down` error.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from executor.backends.base import Backend, ModelInfo
from executor.config import NodeConfig
from executor.batch_job import BatchedJob, EmbedJob, TextJob
from executor.job import Job, send_error
from executor.cache import ResponseCache
from executor.perf import PerfTracker
from executor.receipts import ReceiptIssuer
from protocol import subjects as subj
from protocol.errors import Cancelled, ExecutorBusy, InvalidRequest, LloomError, ShuttingDown
from protocol.messages import ChatRequest, embedding_request_decoder, request_decoder, text_request_decoder

if TYPE_CHECKING:
    from executor.batcher import Batcher
    from executor.job_queue import JobQueue
    from executor.shared_cache import SharedCache

log = structlog.get_logger(logger_name=__name__)

# A caller that misses this many liveness pings in a row (slow, not gone) is given up on.
MAX_MISSED_PINGS = 3


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class NodeStats:
    """Counters a node keeps about itself (exported as metrics by a later layer)."""

    __slots__ = ("received", "completed", "failed", "busy", "cancelled", "bad_requests")

    def __init__(self) -> None:
        self.received = 0
        self.completed = 0
        self.failed = 0
        self.busy = 0
        self.cancelled = 0
        self.bad_requests = 0

    def count_error(self, err: LloomError) -> None:
        if isinstance(err, Cancelled):
            self.cancelled += 1
        else:
            self.failed += 1

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def default_executor_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "executor"
    return f"{host}-{NUID().next().decode()[-8:]}"


class ExecutorNode:
    def __init__(
        self,
        nc: NATS,
        backend: Backend,
        config: NodeConfig | None = None,
        *,
        executor_id: str | None = None,
        models: list[str] | None = None,
    ) -> None:
        self.nc = nc
        self.backend = backend
        self.config = config or NodeConfig()
        self.id = subj.check_id("executor id", executor_id or self.config.id or default_executor_id())
        # Serve exactly these when given; otherwise what the backend lists.
        self._configured_models = list(models) if models else None
        self.models: frozenset[str] = frozenset()
        self.model_info: dict[str, ModelInfo] = {}
        self.perf = PerfTracker()
        # Called (synchronously) whenever `models` changes; the announcer listens here.
        self.on_models_changed: list[Callable[[], None]] = []
        # Set by whoever wires receipts (the daemon); without it jobs carry none.
        self.receipts: ReceiptIssuer | None = None
        self.cache: ResponseCache | None = None  # likewise for the response cache
        self.shared_cache: SharedCache | None = None  # and its level shared in NATS KV (needs `cache`)
        self.job_queue: JobQueue | None = None  # and for the durable queue (`queue` fallbacks)
        self.batcher: Batcher | None = None  # batchable jobs go straight to the backend without one
        self.stats = NodeStats()
        self._refresh_error: str | None = None
        self.state = State.NEW
        self._model_subs: dict[str, Subscription] = {}
        self._batched_subs: dict[str, list[Subscription]] = {}  # embeddings and text completions
        self._direct_sub: Subscription | None = None
        self._cancel_sub: Subscription | None = None
        self._status_subs: list[Subscription] = []
        self._jobs: dict[str, Job] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._nuid = NUID()
        self._log = log.bind(executor_id=self.id)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def backend_healthy(self) -> bool:
        """False while the backend cannot even list its models."""
        return self._refresh_error is None

    def model_available(self, model: str) -> bool:
        """Whether a job for `model` could be served now (a pool knows per model; others only overall)."""
        per_model = getattr(self.backend, "available", None)
        return self.backend_healthy and (per_model(model) if callable(per_model) else True)

    @property
    def backend_kind(self) -> str:
        """What serves the jobs, as receipts and the catalogue name it: `local`, `ollama`, ...

        Backend names read "<kind> at <url>": the kind is the first word. `auto` names the
        backend it chose once it has chosen (until then it says `auto`).
        """
        return self._chosen_backend.name.split(" ", 1)[0]

    @property
    def _chosen_backend(self) -> Backend:
        return getattr(self.backend, "resolved", None) or self.backend

    async def wait_idle(self) -> None:
        """Return once no job is running (at once if none is)."""
        await self._idle.wait()

    async def __aenter__(self) -> ExecutorNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.state is not State.NEW:
            return
        self.state = State.RUNNING
        await self.refresh_models()
        self._direct_sub = await self.nc.subscribe(subj.direct_subject(self.id), cb=self._on_job)
        self._cancel_sub = await self.nc.subscribe(subj.CANCEL_ALL, cb=self._on_cancel)
        self._status_subs = [
            await self.nc.subscribe(subj.STATUS_ALL, cb=self._on_status),
            await self.nc.subscribe(subj.status_subject(self.id), cb=self._on_status),
        ]
        await self.nc.flush()  # subscriptions are live on the server when start() returns
        self._tasks = [
            asyncio.create_task(self._every(self.config.model_refresh_secs, self.refresh_models), name="model-refresh"),
            asyncio.create_task(self._every(self.config.liveness_interval_secs, self._ping_callers), name="liveness"),
        ]
        self._log.info("executor node started", backend=self.backend.name, models=sorted(self.models))

    async def refresh_models(self) -> None:
        """Re-read the served models and (un)subscribe the difference."""
        if self._configured_models is not None:
            wanted = set(self._configured_models)
        else:
            try:
                listed = await self.backend.list_models()
            except LloomError as e:
                if e.message != self._refresh_error:  # once per distinct failure, not every period
                    self._refresh_error = e.message
                    self._log.warning("cannot list the backend's models", backend=self.backend.name, error=e.message)
                return  # keep serving what we had: a blip should not unsubscribe us
            self._refresh_error = None
            self.model_info = {m.id: m for m in listed}
            wanted = set(self.model_info)
        if self.state is not State.RUNNING:
            return
        for model in wanted - self._model_subs.keys():
            try:
                subject = subj.complete_subject(model)
            except subj.SubjectError as e:
                self._log.warning("model name cannot be served", model=model, error=str(e))
                continue
            self._model_subs[model] = await self.nc.subscribe(subject, queue=subj.QUEUE_GROUP, cb=self._on_job)
            self._batched_subs[model] = [
                await self.nc.subscribe(subj.embed_subject(model), queue=subj.QUEUE_GROUP, cb=self._on_embed),
                await self.nc.subscribe(subj.text_subject(model), queue=subj.QUEUE_GROUP, cb=self._on_text),
            ]
        for model in self._model_subs.keys() - wanted:
            await self._model_subs.pop(model).unsubscribe()
            for sub in self._batched_subs.pop(model):
                await sub.unsubscribe()
        if wanted != self.models:
            self.models = frozenset(self._model_subs)
            await self.nc.flush()
            self._log.info("serving models", models=sorted(self.models))
            for listener in self.on_models_changed:
                listener()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Drain and stop; idempotent. Does not close the NATS connection (not ours)."""
        if self.state is State.NEW:
            self.state = State.STOPPED
        if self.state is not State.RUNNING:
            return
        self.state = State.DRAINING
        timeout = self.config.drain_timeout_secs if drain_timeout is None else drain_timeout
        self._log.info("draining", in_flight=len(self._jobs), timeout_s=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        job_subs = [*self._model_subs.values(), *(s for subs in self._batched_subs.values() for s in subs),
                    self._direct_sub]  # fmt: skip
        self._model_subs.clear()
        self._batched_subs.clear()
        if not self.nc.is_closed:
            # drain() unsubscribes and still hands us what was already delivered,
            # so a job in the pipe is accepted (or refused as busy), not dropped.
            await asyncio.gather(*(s.drain() for s in job_subs), return_exceptions=True)
        running = [j.task for j in self._jobs.values() if j.task is not None]
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout)
            for job in list(self._jobs.values()):
                job.cancel(ShuttingDown(f"executor {self.id} shut down before the job finished; retry elsewhere"))
            if pending:
                await asyncio.wait(pending)
        if not self.nc.is_closed and self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()
            for sub in self._status_subs:
                await sub.unsubscribe()
            await self.nc.flush()
        self.state = State.STOPPED
        self._log.info("executor node stopped", **self.stats.as_dict())

    # -- message handlers (called one at a time per subscription: keep them short) --

    async def _on_job(self, msg: Msg) -> None:
        self.stats.received += 1
        reply = msg.reply
        if not reply:
            self.stats.bad_requests += 1
            return  # a job without a reply subject has nobody to answer
        headers = msg.headers or {}
        job_id = headers.get(subj.HDR_JOB_ID) or self._nuid.next().decode()
        try:
            subj.check_id("job id", job_id)
            request: ChatRequest = request_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, subj.SubjectError) as e:
            self.stats.bad_requests += 1
            await send_error(self, reply, InvalidRequest(f"invalid request: {e}"), job_id=None, stream=False)
            return
        if len(self._jobs) >= self.config.max_concurrent_jobs or job_id in self._jobs:
            self.stats.busy += 1
            busy = ExecutorBusy(f"executor {self.id} is running {len(self._jobs)} jobs, its limit")
            await send_error(self, reply, busy, job_id=job_id, stream=request.stream)
            return
        if self.state is not State.RUNNING and self.state is not State.DRAINING:
            await send_error(self, reply, ShuttingDown("executor stopped"), job_id=job_id, stream=request.stream)
            return
        loop = asyncio.get_running_loop()
        job = Job(
            self,
            job_id,
            request,
            reply,
            loop.time() + _timeout_s(headers.get(subj.HDR_TIMEOUT_MS), self.config.default_timeout_secs),
            liveness=subj.HDR_LIVENESS in headers,
            payload=msg.data,
            client=headers.get(subj.HDR_CLIENT),
        )
        self._launch(job)

    async def _on_embed(self, msg: Msg) -> None:
        await self._on_batched(msg, embedding_request_decoder, EmbedJob, "embeddings")

    async def _on_text(self, msg: Msg) -> None:
        await self._on_batched(msg, text_request_decoder, TextJob, "text completion")

    async def _on_batched(self, msg: Msg, decoder: msgspec.json.Decoder, job_type: type[BatchedJob], what: str) -> None:
        """A job for a batchable endpoint: checked like a chat job, then run as `job_type`."""
        self.stats.received += 1
        reply = msg.reply
        if not reply:
            self.stats.bad_requests += 1
            return
        headers = msg.headers or {}
        job_id = headers.get(subj.HDR_JOB_ID) or self._nuid.next().decode()
        try:
            subj.check_id("job id", job_id)
            request = decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, subj.SubjectError) as e:
            self.stats.bad_requests += 1
            await send_error(self, reply, InvalidRequest(f"invalid {what} request: {e}"), job_id=None, stream=False)
            return
        if len(self._jobs) >= self.config.max_concurrent_jobs or job_id in self._jobs:
            self.stats.busy += 1
            busy = ExecutorBusy(f"executor {self.id} is running {len(self._jobs)} jobs, its limit")
            await send_error(self, reply, busy, job_id=job_id, stream=False)
            return
        if self.state is not State.RUNNING and self.state is not State.DRAINING:
            await send_error(self, reply, ShuttingDown("executor stopped"), job_id=job_id, stream=False)
            return
        deadline = asyncio.get_running_loop().time() + _timeout_s(
            headers.get(subj.HDR_TIMEOUT_MS), self.config.default_timeout_secs
        )
        self._launch(job_type(self, job_id, request, reply, deadline, payload=msg.data,  # type: ignore[arg-type]
                              client=headers.get(subj.HDR_CLIENT)))  # fmt: skip

    def _launch(self, job: Job) -> asyncio.Task[None]:
        self._jobs[job.id] = job
        self._idle.clear()
        job.task = asyncio.get_running_loop().create_task(job.run())
        job.task.add_done_callback(lambda _t, jid=job.id: self._job_done(jid))
        return job.task

    def has_room(self) -> bool:
        return self.state is State.RUNNING and len(self._jobs) < self.config.max_concurrent_jobs

    def run_queued(
        self,
        job_id: str,
        request: ChatRequest,
        payload: bytes,
        *,
        client: str | None,
        timeout_s: float,
        sink: Callable[[bytes], Awaitable[None]],
    ) -> asyncio.Task[None] | None:
        """Run a job taken from the durable queue like any other (capacity, cancel, drain,
        receipts), its reply going to `sink`; None if a job with that id already runs here."""
        if job_id in self._jobs:
            return None
        deadline = asyncio.get_running_loop().time() + timeout_s
        return self._launch(Job(self, job_id, request, "", deadline, liveness=False, payload=payload, client=client,
                                sink=sink))  # fmt: skip

    def _job_done(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        if not self._jobs:
            self._idle.set()

    def status(self) -> dict[str, object]:
        """What `lloom-executor status` shows: state, load, counters, backends, cache, receipts."""
        pool_status = getattr(self.backend, "status", None)
        return {
            "executor_id": self.id,
            "state": self.state.value,
            "backend": self.backend.name if self._chosen_backend is self.backend
            else f"{self._chosen_backend.name} (chosen by auto)",
            "backend_kind": self.backend_kind,
            "backend_healthy": self.backend_healthy,
            "models": {m: self.model_available(m) for m in sorted(self.models)},
            "in_flight": self.in_flight,
            "capacity": self.config.max_concurrent_jobs,
            "stats": self.stats.as_dict(),
            "pool": pool_status() if callable(pool_status) else None,
            "queue": None if self.job_queue is None else self.job_queue.status(),
            "batching": None if self.batcher is None else self.batcher.status(),
            "cache": None if self.cache is None else {"entries": len(self.cache), "hits": self.cache.hits,
                                                      "misses": self.cache.misses,
                                                      "shared": None if self.shared_cache is None
                                                      else self.shared_cache.status()},  # fmt: skip
            "receipts": None if self.receipts is None else {
                "issued": self.receipts.outbox.last_seq, "unpublished": len(self.receipts.outbox.pending),
                "mismatches": self.receipts.mismatches},  # fmt: skip
        }

    async def _on_status(self, msg: Msg) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, msgspec.json.encode(self.status()))

    async def _on_cancel(self, msg: Msg) -> None:
        job = self._jobs.get(msg.subject.rpartition(".")[2])
        if job is not None:
            job.cancel(Cancelled("cancelled by the caller"))

    # -- background work --

    async def _ping_callers(self) -> None:
        """Ask the callers of long jobs whether they still wait; cancel the jobs of those gone."""
        now = asyncio.get_running_loop().time()
        interval = self.config.liveness_interval_secs
        stale = [j for j in self._jobs.values() if j.liveness and now - j.started >= interval]
        if stale:
            await asyncio.gather(*(self._ping(j, interval) for j in stale))

    async def _ping(self, job: Job, timeout: float) -> None:
        try:
            answer = await self.nc.request(job.reply, b"", timeout=timeout, headers={subj.HDR_PING: job.id})
        except nats.errors.NoRespondersError:
            job.cancel(Cancelled("the caller went away"))
            return
        except nats.errors.TimeoutError:
            job.missed_pings += 1
            if job.missed_pings >= MAX_MISSED_PINGS:
                job.cancel(Cancelled(f"the caller did not answer {MAX_MISSED_PINGS} liveness pings"))
            return
        except nats.errors.Error as e:
            self._log.debug("liveness ping failed", job_id=job.id, error=str(e))
            return
        job.missed_pings = 0
        if answer.data == subj.PING_GONE:
            job.cancel(Cancelled("the caller no longer waits"))

    async def _every(self, period: float, action: object) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await action()  # type: ignore[operator]
            except Exception:
                self._log.exception("periodic task failed", task=getattr(action, "__name__", str(action)))


def _timeout_s(header: str | None, default: float) -> float:
    if header:
        try:
            ms = int(header)
        except ValueError:
            return default
        if ms > 0:
            return min(ms / 1000.0, default)
    return default
