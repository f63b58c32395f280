"""The async client: send chat jobs to the network and read results or streams.

    async with await LloomClient.connect("nats://127.0.0.1:4222") as client:
        reply = await client.complete(ChatRequest(model="m", messages=[...]))
        reply = await client.complete(request, route=Cheapest(), constraints=Constraints(min_context=8192))
        async with client.stream(request) as stream:
            async for chunk in stream:
                print(chunk.delta, end="")
        print(stream.end.usage)

Without a route, a job goes to its model's subject and the NATS queue group
picks an executor. With a route (`Specific`, `Category`, `Cheapest`, `Fastest`
from `protocol.routing`) or constraints, the client ranks the executors of its
live `Catalog` and sends the job to the best one's direct subject; on no
responders, busy, a timeout of the attempt or a retryable error it fails over to
the next, within the caller's overall deadline, one executor at a time unless
`hedge_after` asks for a second one when the first is slow.

All replies arrive on one wildcard inbox subscription (`<inbox>.*`, owned by
protocol/pending.py), routed to the waiting call by the last token, which is the
job id: no subscription per request. The same dispatcher answers executors'
liveness pings, so a job whose caller has gone (cancelled, crashed,
disconnected) is stopped at the executor.

Errors are the `protocol.errors` types the executor raised. `NoExecutors` comes
at once from the server's "no responders" status; for a model, after one short
catalogue query (on that error path only), it names the models served and the
one closest to the name asked for. Without a route, only `busy`
is retried (the queue group usually picks another member): a job whose outcome
is unknown may have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from types import TracebackType
from typing import Self, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from protocol import subjects as subj
from protocol.catalog import Catalog
from protocol.connection import close_nats, connect_nats
from protocol.durable import ensure_jobs_stream, jobs_subject, result_subject, results_bucket
from protocol.errors import (
    DeadlineExceeded,
    ExecutorLost,
    LloomError,
    NoExecutors,
    QueueUnavailable,
    ResultPending,
)
from protocol.estimate import estimate_tokens
from protocol.messages import (
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorReply,
    TextRequest,
    TextResponse,
    embedding_reply_decoder,
    encoder,
    error_from_wire,
    text_reply_decoder,
    unary_reply_decoder,
)
from protocol.pending import Pending, may_retry_busy
from protocol.replies import Target, decode_reply, fails_over, no_responders
from protocol.resume import DEFAULT_SILENCE_S
from protocol.routing import Candidate, Constraints, LatencyBook, ModelRequest, Specific, rank
from protocol.stream import ChatStream

T = TypeVar("T")

DEFAULT_URL = "nats://127.0.0.1:4222"
# How often `result()` reads the bucket again while it waits for the announcement.
RESULT_RECHECK_S = 2.0
DEFAULT_TIMEOUT_S = 120.0
# Completion tokens assumed for a job's expected cost when it sets no max_tokens.
DEFAULT_COMPLETION_ESTIMATE = 256
# How long the error for a model nobody serves may wait for the catalogue's model names
# (asked only on that error path; executors answer the query within milliseconds).
SERVED_QUERY_S = 0.5


class LloomClient:
    """Sends jobs over an existing NATS connection (which it does not own unless made by `connect`)."""

    def __init__(
        self,
        nc: NATS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        busy_retries: int = 3,
        client_id: str | None = None,
        executor_silence_s: float = DEFAULT_SILENCE_S,
    ) -> None:
        """`executor_silence_s`: a call whose executor sends nothing (not even a keepalive) for this
        long fails with `ExecutorLost` (and is retried where it may be; see protocol/resume.py)."""
        self._nc = nc
        # Recorded in executors' receipts, so usage can be reported per client.
        self.client_id = client_id
        self.timeout = timeout
        self.busy_retries = busy_retries
        self.latencies = LatencyBook()
        self._owns_nc = False
        self._pending = Pending(nc, client_id=client_id, silence_s=executor_silence_s)
        self._catalog: Catalog | None = None
        self._results: KeyValue | None = None
        self._jobs_stream_ready = False

    @classmethod
    async def connect(
        cls,
        servers: str | list[str] = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        busy_retries: int = 3,
        client_id: str | None = None,
        executor_silence_s: float = DEFAULT_SILENCE_S,
    ) -> LloomClient:
        """Connect to NATS and return a started client that closes the connection with itself.

        Raises `ConnectionError` naming the URL and the cause when no server answers.
        """
        made: list[LloomClient] = []

        async def reconnected() -> None:
            # Replies sent while we were away may be lost: ask executors to send them again.
            if made:
                await made[0]._pending.watch.reconnected()

        nc = await connect_nats(servers, name="lloom-client", on_error=_report_nats_error, on_reconnected=reconnected)
        client = cls(nc, timeout=timeout, busy_retries=busy_retries, client_id=client_id,
                     executor_silence_s=executor_silence_s)  # fmt: skip
        made.append(client)
        client._owns_nc = True
        await client.start()
        return client

    async def start(self) -> None:
        await self._pending.start()

    async def close(self) -> None:
        if self._catalog is not None:
            await self._catalog.stop()
        await self._pending.stop()
        if self._owns_nc:
            await close_nats(self._nc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def nc(self) -> NATS:
        return self._nc

    def new_job_id(self) -> str:
        return self._pending.new_job_id()

    async def catalog(self) -> Catalog:
        """The live network catalogue, started (and filled by a query) on first use."""
        if self._catalog is None:
            self._catalog = Catalog(self._nc)
            await self._catalog.start()
        return self._catalog

    async def served_models(self, *, timeout: float = SERVED_QUERY_S) -> list[str] | None:
        """The names of the models live executors serve now, sorted; None if the catalogue could not be asked.

        The running catalogue's, if routing started one; else one query that waits at most `timeout`."""
        if self._catalog is not None:
            return self._catalog.model_names()
        once = Catalog(self._nc, query_timeout=timeout)
        try:
            await once.refresh()
        except (nats.errors.Error, OSError):
            return None
        return once.model_names()

    async def no_responders_error(self, target: Target) -> NoExecutors:
        """The error for a job nobody took; for a model, it names the models served and the closest one."""
        return no_responders(target, None if target[1] else await self.served_models())

    # -- the durable queue (protocol/durable.py) --

    async def submit(self, request: ChatRequest, *, job_id: str | None = None) -> str:
        """Put a job in the durable queue and return its id once JetStream holds it.

        It runs when an executor serving its model can take it (now, or after every
        backend has come back); `result(job_id)` awaits the answer, `fetch` looks.
        Submitting the same job id again stores nothing new. Queued jobs are unary.
        """
        if request.stream:
            request = msgspec.structs.replace(request, stream=False)
        job_id = subj.check_id("job id", job_id or self.new_job_id())
        js = self._nc.jetstream()
        headers = {subj.HDR_MSG_ID: job_id, subj.HDR_JOB_ID: job_id}
        if self.client_id:
            headers[subj.HDR_CLIENT] = self.client_id
        try:
            if not self._jobs_stream_ready:
                await ensure_jobs_stream(js)
                self._jobs_stream_ready = True
            await js.publish(jobs_subject(request.model), encoder.encode(request), headers=headers, timeout=self.timeout)
        except (nats.errors.Error, TimeoutError) as e:
            raise QueueUnavailable(f"the durable queue did not take job {job_id}: {_why(e)}", job_id=job_id) from e
        return job_id

    async def fetch(self, job_id: str) -> ChatResponse | None:
        """A queued job's result if it is there (None if not yet); its typed error if it failed."""
        kv = await self._results_bucket()
        try:
            entry = await kv.get(subj.check_id("job id", job_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as e:
            raise QueueUnavailable(f"cannot read the result of job {job_id}: {_why(e)}", job_id=job_id) from e
        return _queued_result(entry.value or b"")

    async def result(self, job_id: str, *, timeout: float | None = None) -> ChatResponse:
        """Await a queued job's result; `ResultPending` if it is not there within `timeout`.

        Listens for the executor's announcement of the result and reads the bucket (now,
        and every few seconds in case an announcement was missed, e.g. across a reconnect),
        so a JetStream blip within `timeout` is waited out; `QueueUnavailable` if the
        bucket could not be read at all by then."""
        subj.check_id("job id", job_id)
        loop = asyncio.get_running_loop()
        budget = timeout or self.timeout
        deadline = loop.time() + budget
        sub = await self._nc.subscribe(result_subject(job_id), max_msgs=1)
        unreachable: BaseException | None = None
        try:
            while True:
                try:
                    found = await self.fetch(job_id)
                    unreachable = None
                    if found is not None:
                        return found
                except QueueUnavailable as e:
                    unreachable = e
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=min(remaining, RESULT_RECHECK_S))
                except nats.errors.TimeoutError:
                    continue
                return _queued_result(msg.data)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if unreachable is not None:
            raise QueueUnavailable(f"cannot read the result of job {job_id}: {_why(unreachable)}", job_id=job_id)
        raise ResultPending(f"job {job_id} has no result yet (waited {budget:g}s)", job_id=job_id)

    async def _results_bucket(self) -> KeyValue:
        if self._results is None:
            try:
                self._results = await results_bucket(self._nc.jetstream())
            except (nats.errors.Error, TimeoutError) as e:
                raise QueueUnavailable(f"the results bucket is not reachable: {_why(e)}") from e
        return self._results

    async def candidates(
        self, request: ChatRequest, route: ModelRequest, constraints: Constraints | None = None
    ) -> list[Candidate]:
        """The executors `route` would try for `request`, best first; `NoExecutors` if none."""
        catalog = await self.catalog()
        found = rank(
            catalog.entries(),
            route,
            constraints or Constraints(),
            prompt_tokens=sum(estimate_tokens(m.content) for m in request.messages),
            completion_tokens=request.max_tokens or DEFAULT_COMPLETION_ESTIMATE,
            observed=self.latencies,
        )
        if not found:
            served = catalog.model_names()
            if isinstance(route, Specific) and constraints is None and route.model not in served:
                raise no_responders((route.model, None), served)  # a typo, most likely: name the served ones
            within = " within the constraints" if constraints else ""
            raise NoExecutors(f"no executor on the network offers {_describe(route)}{within}")
        return found

    async def complete(
        self,
        request: ChatRequest,
        *,
        timeout: float | None = None,
        executor: str | None = None,
        route: ModelRequest | None = None,
        constraints: Constraints | None = None,
        attempt_timeout: float | None = None,
        hedge_after: float | None = None,
    ) -> ChatResponse:
        """Run one job and return its normalized response; raises the job's typed error."""
        if request.stream:
            request = msgspec.structs.replace(request, stream=False)
        budget = timeout or self.timeout
        deadline = asyncio.get_running_loop().time() + budget
        if route is None and constraints is None:
            return await self._complete_on((request.model, executor), request, deadline, self.busy_retries)
        found = await self.candidates(request, route or Specific(request.model), constraints)
        return await self._failover(found, request, deadline, attempt_timeout, hedge_after)

    def stream(
        self,
        request: ChatRequest,
        *,
        timeout: float | None = None,
        executor: str | None = None,
        route: ModelRequest | None = None,
        constraints: Constraints | None = None,
    ) -> ChatStream:
        """Start a streamed job; iterate the result for chunks, then read `.end`.

        With a route, the stream fails over to the next executor only before its
        first chunk: text already delivered cannot be taken back.
        """
        if not request.stream:
            request = msgspec.structs.replace(request, stream=True)
        return ChatStream(self._pending, request, timeout or self.timeout, executor, route, constraints,
                          busy_retries=self.busy_retries, candidates=self.candidates,
                          no_responders=self.no_responders_error)  # fmt: skip

    async def embed(
        self, model: str, inputs: list[str], *, dimensions: int | None = None, timeout: float | None = None
    ) -> EmbeddingResponse:
        """Vectors for `inputs` (one per input, in order) from any executor serving `model`.

        Executors batch concurrent requests into shared backend calls, so many small
        calls cost little more than one big one."""
        request = EmbeddingRequest(model=model, input=list(inputs), dimensions=dimensions)
        deadline = asyncio.get_running_loop().time() + (timeout or self.timeout)
        return await self._request((model, None), encoder.encode(request), embedding_reply_decoder, EmbeddingResponse,
                                   deadline, self.busy_retries, subject=subj.embed_subject(model))  # fmt: skip

    async def complete_text(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        timeout: float | None = None,
    ) -> TextResponse:
        """A legacy text completion of `prompt` (no chat template), from any executor serving `model`.

        Concurrent requests with the same model and parameters share backend calls."""
        request = TextRequest(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, stop=stop)  # fmt: skip
        deadline = asyncio.get_running_loop().time() + (timeout or self.timeout)
        return await self._request((model, None), encoder.encode(request), text_reply_decoder, TextResponse,
                                   deadline, self.busy_retries, subject=subj.text_subject(model))  # fmt: skip

    async def cancel(self, job_id: str) -> None:
        """Tell whichever executor runs `job_id` to stop it (best effort, at most once)."""
        await self._pending.cancel(job_id)

    # -- one job on one target, and failover over many --

    async def _complete_on(self, target: Target, request: ChatRequest, deadline: float, retries: int) -> ChatResponse:
        return await self._request(target, encoder.encode(request), unary_reply_decoder, ChatResponse, deadline, retries)

    async def _request(
        self,
        target: Target,
        payload: bytes,
        decoder: msgspec.json.Decoder,
        expected: type[T],
        deadline: float,
        retries: int,
        *,
        subject: str | None = None,
    ) -> T:
        """One request/reply job on `target` (its model's queue group, or one executor), retried when busy."""
        loop = asyncio.get_running_loop()
        for attempt in itertools.count():  # may_retry_busy bounds it
            # A busy executor never ran the job, so a retry is a new job: replies
            # still in flight for the old id can then not be mistaken for its own.
            job_id = self._pending.new_job_id()
            fut: asyncio.Future[bytes] = loop.create_future()
            self._pending.register(job_id, fut)
            try:
                await self._pending.send(target, payload, job_id, deadline, subject=subject)
                data = await self._pending.wait(fut, deadline, job_id, target)
            except NoExecutors:
                raise await self.no_responders_error(target) from None
            except ExecutorLost as lost:
                if await may_retry_busy(lost, attempt, retries, deadline):
                    continue
                raise
            finally:
                self._pending.unregister(job_id)
            reply = decode_reply(decoder, data)
            if type(reply) is expected:
                return reply
            assert isinstance(reply, ErrorReply)
            err = error_from_wire(reply)
            if not await may_retry_busy(err, attempt, retries, deadline):
                raise err
        raise AssertionError("unreachable")  # pragma: no cover

    async def _failover(
        self,
        found: list[Candidate],
        request: ChatRequest,
        deadline: float,
        attempt_timeout: float | None,
        hedge_after: float | None,
    ) -> ChatResponse:
        loop = asyncio.get_running_loop()
        queue = iter(found)
        running: dict[asyncio.Task[ChatResponse], Candidate] = {}
        errors: list[LloomError] = []

        async def attempt(cand: Candidate) -> ChatResponse:
            started = loop.time()
            end = min(deadline, started + attempt_timeout) if attempt_timeout else deadline
            job = msgspec.structs.replace(request, model=cand.model)
            reply = await self._complete_on((cand.model, cand.executor_id), job, end, 0)
            self.latencies.record(cand.key, cand.model, (loop.time() - started) * 1000)
            return reply

        def launch() -> None:
            cand = next(queue, None)
            if cand is not None and loop.time() < deadline:
                running[asyncio.create_task(attempt(cand))] = cand

        launch()
        try:
            while running:
                hedge = hedge_after if hedge_after is not None and len(running) == 1 else None
                done, _ = await asyncio.wait(running, timeout=hedge, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    launch()  # the first is slow: ask a second executor too
                    continue
                for task in done:
                    running.pop(task)
                    err = task.exception()
                    if err is None:
                        return task.result()
                    if not isinstance(err, LloomError) or not fails_over(err):
                        raise err
                    errors.append(err)
                if not running:
                    launch()
        finally:
            for task in running:
                task.cancel()  # the loser of a hedge: its cancel reaches the executor
            await asyncio.gather(*running, return_exceptions=True)
        if errors:
            raise errors[-1]
        raise DeadlineExceeded("the deadline passed before any executor could be tried")


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _queued_result(data: bytes) -> ChatResponse:
    reply = decode_reply(unary_reply_decoder, data)
    if type(reply) is ChatResponse:
        return reply
    raise error_from_wire(reply)


def _describe(route: ModelRequest) -> str:
    if isinstance(route, Specific):
        return f"model {route.model!r}"
    return f"a model for {msgspec.json.encode(route).decode()}"


async def _report_nats_error(e: Exception) -> None:
    # A library must not print; applications see this through stdlib logging.
    logging.getLogger("protocol.client").warning("nats: %s", e or type(e).__name__)
