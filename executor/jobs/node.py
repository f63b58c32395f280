"""The executor node: NATS subscriptions, the concurrency limit, cancellation and drain.

    node = ExecutorNode(nc, backend, NodeConfig())
    async with node:            # subscribes; leaving drains
        await stop_event.wait()

The node subscribes, in the `lloom-executors` queue group, to the subject of
every model it serves (so N executors share a model's load), plus a direct
subject of its own and the cancel subjects. Each accepted job runs in its own
task (nats.py runs one subscription's callbacks one at a time); past
`max_concurrent_jobs` a job gets an immediate `busy` reply, with an estimate of
when to come back (jobs/pacing.py), instead of waiting in an unbounded queue.
Replies go through `RetainedReplies` (jobs/retained.py), which keeps them briefly
for callers that lost them in a NATS outage and sends keepalives for running
jobs. Long jobs ping their caller; a caller that has gone away
(no responders) or says it no longer waits has its job cancelled, which closes
the backend call. `stop()` drains: it unsubscribes (NATS sends new jobs to other
members of the queue group), lets in-flight jobs finish within
`drain_timeout_secs`, then cancels the rest with a `shutting_down` error.

A job is admitted only with headers within bounds (the whole block at most
`MAX_HEADER_BYTES`, a `Lloom-Client` id of at most `MAX_CLIENT_ID` safe
characters); anything else is a `bad_request`, so a caller cannot stuff megabytes
into receipts and replies. A cancel is accepted only when its payload equals the
job's `Lloom-Cancel-Token` (constant-time compare); a job sent without a token
cannot be cancelled by anyone: its deadline and the liveness pings still end it.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from executor.backends.base import Backend, ModelInfo
from executor.catalog.features import model_features
from executor.catalog.perf import PerfTracker
from executor.config import ImageUrlPolicy, NodeConfig
from executor.jobs.base import JobBase, send_error
from executor.jobs.batched import EmbedJob, TextJob
from executor.jobs.chat import Job
from executor.jobs.context import (
    Collected,
    Enqueuer,
    JobContext,
    Limits,
    NatsReply,
    ReplyChannel,
    SealedReply,
    ServedModels,
    backend_kind,
    chosen_backend,
)
from executor.jobs.endpoints import EndpointCounts
from executor.jobs.pacing import BusyPacer
from executor.jobs.retained import RetainedReplies
from executor.telemetry.context import trace_headers
from protocol import subjects as subj
from protocol.connection import subscriptions_live
from protocol.errors import Cancelled, ExecutorBusy, InvalidRequest, LloomError, ShuttingDown
from protocol.messages import ChatRequest, embedding_request_decoder, request_decoder, text_request_decoder
from protocol.sealing import CurveKeyPair, SealedBox, SealError
from protocol.status import (
    CacheStatus,
    ExecutorStatus,
    JobStats,
)

if TYPE_CHECKING:
    from executor.batching.coalescer import Batcher
    from executor.cache.memory import ResponseCache
    from executor.cache.shared import SharedCache
    from executor.receipts.issuer import ReceiptIssuer
    from executor.secrets import SecretMasker
    from executor.telemetry.recorder import JobRecorder
    from executor.telemetry.tracing import JobTracer

log = structlog.get_logger(logger_name=__name__)

# A caller that misses this many liveness pings in a row (slow, not gone) is given up on.
MAX_MISSED_PINGS = 3
# After our connection comes back from an outage, callers get this long to come back too
# (they reconnect on their own schedule) before an unanswered ping counts against them.
RECONNECT_GRACE_S = 5.0


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one kind of job is admitted: its decoder, its job type, its name in errors."""

    decoder: msgspec.json.Decoder
    job: type[JobBase]
    what: str
    liveness: bool  # long jobs (chat) answer liveness pings; batched ones are short


_CHAT = _Kind(request_decoder, Job, "request", liveness=True)
_EMBED = _Kind(embedding_request_decoder, EmbedJob, "embeddings request", liveness=False)
_TEXT = _Kind(text_request_decoder, TextJob, "text completion request", liveness=False)


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
        receipts: ReceiptIssuer | None = None,
        cache: ResponseCache | None = None,
        shared_cache: SharedCache | None = None,
        batcher: Batcher | None = None,
        queue: Enqueuer | None = None,
        masker: SecretMasker | None = None,
        curve: CurveKeyPair | None = None,
        model_features: dict[str, list[str]] | None = None,
        recorder: JobRecorder | None = None,
        tracer: JobTracer | None = None,
        image_urls: ImageUrlPolicy = "data_only",
    ) -> None:
        self.nc = nc
        # `[[models]] features` set in the config, by model: they override what the backend says.
        self._explicit_features = dict(model_features or {})
        # Opens sealed jobs (protocol/sealing.py); announced by the catalogue announcer. None: sealed jobs refused.
        self.curve = curve
        self.backend = backend
        self.config = config or NodeConfig()
        self.id = subj.check_id("executor id", executor_id or self.config.id or default_executor_id())
        # Serve exactly these when given; otherwise what the backend lists.
        self._configured_models = list(models) if models else None
        self._served = ServedModels()
        self.model_info: dict[str, ModelInfo] = {}
        self.perf = PerfTracker()
        # Called (synchronously) whenever `models` changes; the announcer and the queue listen here.
        self.on_models_changed: list[Callable[[], None]] = []
        self.receipts = receipts
        self.cache = cache
        self.shared_cache = shared_cache
        self.batcher = batcher
        self.queue = queue
        self.stats = JobStats()
        # Per job subject, for NATS micro discovery's endpoint stats (executor/catalog/micro.py).
        self.endpoints: dict[str, EndpointCounts] = {}
        # Everything a job may use, fixed for the node's life (the served set changes inside).
        self.context = JobContext(
            executor_id=self.id, backend=backend, served=self._served,
            limits=Limits(max_tokens_cap=self.config.max_tokens_cap, max_payload=nc.max_payload or 1 << 20),
            stats=self.stats, perf=self.perf, receipts=receipts, cache=cache, shared_cache=shared_cache,
            batcher=batcher, queue=queue, masker=masker, recorder=recorder, tracer=tracer,
            image_urls=image_urls, in_flight=lambda: len(self._jobs),
        )  # fmt: skip
        self.masker = masker
        self._refresh_error: str | None = None
        self.state = State.NEW
        self._model_subs: dict[str, Subscription] = {}
        self._batched_subs: dict[str, list[Subscription]] = {}  # embeddings and text completions
        self._direct_sub: Subscription | None = None
        self._cancel_sub: Subscription | None = None
        self._status_subs: list[Subscription] = []
        self._jobs: dict[str, JobBase] = {}
        self._cancel_tokens: dict[str, bytes] = {}  # job id -> the secret a cancel must carry
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._nuid = NUID()
        self._log = log.bind(executor_id=self.id)
        cfg = self.config
        self.retained = RetainedReplies(nc, self.id, retain_secs=cfg.result_retention_secs,
                                        max_bytes=cfg.result_retention_bytes, per_job_bytes=cfg.stream_retention_bytes,
                                        keepalive_secs=cfg.keepalive_secs)  # fmt: skip
        self._pacer = BusyPacer(cfg.max_concurrent_jobs)
        self._reconnects = 0
        self._reconnected_at = float("-inf")

    @property
    def models(self) -> frozenset[str]:
        return self._served.names

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
        return backend_kind(self.backend)

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
        await self.retained.start()
        self._status_subs = [
            await self.nc.subscribe(subj.STATUS_ALL, cb=self._on_status),
            await self.nc.subscribe(subj.status_subject(self.id), cb=self._on_status),
        ]
        await subscriptions_live(self.nc)  # when start() returns, jobs reach this node
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
        features: dict[str, frozenset[str]] = {}
        for model in self._model_subs:
            info = self.model_info.get(model)
            features[model] = frozenset(model_features(self._explicit_features.get(model),
                                                       info.capabilities if info else None))  # fmt: skip
        features_changed = features != self._served.features
        self._served.features = features
        if features_changed and wanted == self.models:
            for listener in self.on_models_changed:  # announced at once: routing depends on it
                listener()
        if wanted != self.models:
            self._served.names = frozenset(self._model_subs)
            await subscriptions_live(self.nc)
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
        await self.retained.stop()
        self.state = State.STOPPED
        self._log.info("executor node stopped", **msgspec.structs.asdict(self.stats))

    # -- message handlers (called one at a time per subscription: keep them short) --

    async def _on_job(self, msg: Msg) -> None:
        await self._admit(msg, _CHAT)

    async def _on_embed(self, msg: Msg) -> None:
        await self._admit(msg, _EMBED)

    async def _on_text(self, msg: Msg) -> None:
        await self._admit(msg, _TEXT)

    async def _admit(self, msg: Msg, kind: _Kind) -> None:
        """Decode, validate, check capacity and the job id, then start the job in its own task."""
        self.stats.received += 1
        ep = self.endpoints.get(msg.subject) or self._new_endpoint(msg.subject)
        ep.requests += 1
        if not msg.reply or not subj.is_reply_inbox(msg.reply):
            # Nobody to answer, or a reply-to aimed elsewhere (a JetStream API or another peer's
            # subject: see subjects.is_reply_inbox). Answering it could be the attack.
            self.stats.bad_requests += 1
            ep.failed(InvalidRequest("a job without an inbox to answer was dropped"))
            return
        channel = NatsReply(self.nc, msg.reply)
        headers = msg.headers or {}
        job_id = headers.get(subj.HDR_JOB_ID) or self._nuid.next().decode()
        client = headers.get(subj.HDR_CLIENT)
        token = headers.get(subj.HDR_CANCEL_TOKEN)
        box: SealedBox | None = None
        data = msg.data
        try:
            _check_headers(headers)
            subj.check_id("job id", job_id)
            if client is not None:
                subj.check_client_id(client)
            if token is not None:
                subj.check_cancel_token(token)
            sealed_by = headers.get(subj.HDR_SEALED)
            if sealed_by is not None:
                box = self._sealed_box(sealed_by, kind)
                channel = SealedReply(channel, box)  # from here on, even the refusals are sealed
                data = box.open(data)
            request = kind.decoder.decode(data)
        except SealError as e:
            self.stats.bad_requests += 1
            await self._refuse(ep, channel, InvalidRequest(f"sealed {kind.what} refused: {e}"), job_id=None,
                               stream=False)  # fmt: skip
            return
        except (msgspec.DecodeError, msgspec.ValidationError, subj.SubjectError) as e:
            self.stats.bad_requests += 1
            await self._refuse(ep, channel, InvalidRequest(f"invalid {kind.what}: {e}"), job_id=None, stream=False)
            return
        except RecursionError:  # JSON nested deeper than msgspec recurses (a tool's `parameters` is free-form)
            self.stats.bad_requests += 1
            await self._refuse(ep, channel, InvalidRequest(f"invalid {kind.what}: nested too deeply"), job_id=None,
                               stream=False)  # fmt: skip
            return
        stream = getattr(request, "stream", False)
        if len(self._jobs) >= self.config.max_concurrent_jobs or job_id in self._jobs:
            self.stats.busy += 1
            now = asyncio.get_running_loop().time()
            oldest = next(iter(self._jobs.values())).started if self._jobs else now
            wait = self._pacer.retry_after(now, oldest)
            busy = ExecutorBusy(f"executor {self.id} is running {len(self._jobs)} jobs, its limit; retry in {wait:g}s",
                                retry_after_s=wait)  # fmt: skip
            await self._refuse(ep, channel, busy, job_id=job_id, stream=stream)
            return
        if self.state is not State.RUNNING and self.state is not State.DRAINING:
            await self._refuse(ep, channel, ShuttingDown("executor stopped"), job_id=job_id, stream=stream)
            return
        if self.receipts is not None and not self.receipts.durable:  # fail closed: no job it could not bill
            self.receipts.refused += 1
            await self._refuse(ep, channel, self.receipts.unavailable(self.id), job_id=job_id, stream=stream)
            return
        deadline = asyncio.get_running_loop().time() + _timeout_s(
            headers.get(subj.HDR_TIMEOUT_MS), self.config.default_timeout_secs
        )
        channel = self.retained.channel(msg.reply, job_id, keepalive=subj.HDR_KEEPALIVE in headers)
        if box is not None:
            channel = SealedReply(channel, box)  # what is kept for re-sending is sealed too
        # The receipt hashes the request as the caller wrote it (the plaintext of a sealed one).
        self._launch(kind.job(self.context, job_id, request, channel, deadline,
                              liveness=kind.liveness and subj.HDR_LIVENESS in headers, payload=data,
                              client=client, trace=trace_headers(headers)), cancel_token=token, endpoint=ep)  # fmt: skip

    def _new_endpoint(self, subject: str) -> EndpointCounts:
        # Only subjects of our own subscriptions arrive here, so the map stays as small as they are.
        ep = self.endpoints[subject] = EndpointCounts()
        return ep

    async def _refuse(self, ep: EndpointCounts, channel: ReplyChannel, err: LloomError, *, job_id: str | None,
                      stream: bool) -> None:  # fmt: skip
        """Answer a job refused at admission with `err`, counted against the subject it came on."""
        ep.failed(err)
        await send_error(self.context, channel, err, job_id=job_id, stream=stream)

    def _sealed_box(self, client_key: str, kind: _Kind) -> SealedBox:
        """The box a sealed job's request opens with and its replies are sealed with; `SealError` if none."""
        if self.curve is None:
            raise SealError(f"executor {self.id} takes no sealed jobs (it announces no curve key)")
        if kind is not _CHAT:
            raise SealError("only chat completions may be sealed")
        return self.curve.box_for(client_key)

    def _launch(self, job: JobBase, *, cancel_token: str | None,
                endpoint: EndpointCounts | None = None) -> asyncio.Task[None]:
        self._jobs[job.id] = job
        if cancel_token is not None:
            self._cancel_tokens[job.id] = cancel_token.encode()
        self._idle.clear()
        job.task = job.loop.create_task(job.run())
        job.task.add_done_callback(lambda _t, jid=job.id, ep=endpoint: self._job_done(jid, ep))
        return job.task

    def has_room(self) -> bool:
        return (self.state is State.RUNNING and len(self._jobs) < self.config.max_concurrent_jobs
                and (self.receipts is None or self.receipts.durable))  # fmt: skip

    def run_queued(
        self, job_id: str, request: ChatRequest, payload: bytes, *, client: str | None, timeout_s: float,
        cancel_token: str | None = None,
    ) -> tuple[asyncio.Task[None], Collected] | None:
        """Run a job taken from the durable queue like any other (capacity, cancel, drain,
        receipts); its messages are collected for the results bucket. None if a job with that id
        already runs here."""
        if job_id in self._jobs:
            return None
        deadline = asyncio.get_running_loop().time() + timeout_s
        collected = Collected()
        task = self._launch(Job(self.context, job_id, request, collected, deadline, payload=payload, client=client),
                            cancel_token=cancel_token)
        return task, collected

    def _job_done(self, job_id: str, endpoint: EndpointCounts | None = None) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            elapsed = job.loop.time() - job.started
            self._pacer.record(elapsed)
            if endpoint is not None:  # micro discovery's endpoint stats, inline: this runs per job
                endpoint.processing_s += elapsed
                if job.error is not None:
                    endpoint.failed(job.error)
        self.retained.finished(job_id)
        self._cancel_tokens.pop(job_id, None)
        if not self._jobs:
            self._idle.set()

    def status(self) -> ExecutorStatus:
        """What `lloom-executor status` shows, from each part's own report."""
        pool_status = getattr(self.backend, "status", None)
        chosen = chosen_backend(self.backend)
        cache = self.cache
        receipts = self.receipts
        return ExecutorStatus(
            executor_id=self.id,
            state=self.state.value,
            backend=self.backend.name if chosen is self.backend else f"{chosen.name} (chosen by auto)",
            backend_kind=self.backend_kind,
            backend_healthy=self.backend_healthy,
            models={m: self.model_available(m) for m in sorted(self.models)},
            in_flight=self.in_flight,
            capacity=self.config.max_concurrent_jobs,
            stats=self.stats,
            pool=pool_status() if callable(pool_status) else None,
            queue=None if self.queue is None else self.queue.status(self.models),
            batching=None if self.batcher is None else self.batcher.status(),
            cache=None if cache is None else CacheStatus(
                entries=len(cache), hits=cache.hits, misses=cache.misses,
                shared=None if self.shared_cache is None else self.shared_cache.status()),
            receipts=None if receipts is None else receipts.status(),
        )  # fmt: skip

    async def _on_status(self, msg: Msg) -> None:
        if msg.reply and subj.is_reply_inbox(msg.reply):
            data = _encode_status(self.status())
            # Anyone may ask: a backend name or URL must not carry a secret out.
            await self.nc.publish(msg.reply, data if self.masker is None else self.masker.mask_bytes(data))

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.rpartition(".")[2]
        job = self._jobs.get(job_id)
        expected = self._cancel_tokens.get(job_id)
        if job is None:
            return
        if expected is None or not hmac.compare_digest(expected, msg.data):
            self.stats.cancels_refused += 1
            self._log.debug("cancel without the job's token ignored", job_id=job_id)
            return
        job.cancel(Cancelled("cancelled by the caller"))

    # -- background work --

    async def _ping_callers(self) -> None:
        """Ask the callers of long jobs whether they still wait; cancel the jobs of those gone."""
        now = asyncio.get_running_loop().time()
        if not self.nc.is_connected:
            return  # no caller could answer: an outage is nobody's absence
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            self._reconnects, self._reconnected_at = reconnects, now
        interval = self.config.liveness_interval_secs
        stale = [j for j in self._jobs.values() if j.liveness and now - j.started >= interval]
        if stale:
            await asyncio.gather(*(self._ping(j, interval) for j in stale))

    async def _ping(self, job: JobBase, timeout: float) -> None:
        subject = job.channel.subject
        if subject is None:
            return
        try:
            answer = await self.nc.request(subject, b"", timeout=timeout, headers={subj.HDR_PING: job.id})
        except nats.errors.NoRespondersError:
            if self._in_reconnect_grace():
                return  # the caller may not have resubscribed after the outage yet
            job.cancel(Cancelled("the caller went away"))
            return
        except nats.errors.TimeoutError:
            if self._in_reconnect_grace() or not self.nc.is_connected:
                return  # lost in an outage, not ignored by the caller
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

    def _in_reconnect_grace(self) -> bool:
        return asyncio.get_running_loop().time() - self._reconnected_at < RECONNECT_GRACE_S

    async def _every(self, period: float, action: object) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await action()  # type: ignore[operator]
            except Exception:
                self._log.exception("periodic task failed", task=getattr(action, "__name__", str(action)))


_encode_status = msgspec.json.Encoder().encode


def _check_headers(headers: dict[str, str]) -> None:
    size = subj.headers_size(headers)
    if size > subj.MAX_HEADER_BYTES:
        raise subj.SubjectError(f"headers are {size} bytes; at most {subj.MAX_HEADER_BYTES} are accepted")


def _timeout_s(header: str | None, default: float) -> float:
    if header:
        try:
            ms = int(header)
        except ValueError:
            return default
        if ms > 0:
            return min(ms / 1000.0, default)
    return default
