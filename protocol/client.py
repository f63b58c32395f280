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
`hedge_after` asks for a second one when the first is slow. A request that needs a
capability (tools, images, json_schema, reasoning: `protocol.capabilities`) is routed
that way even without a route, among executors announcing it.

All replies arrive on one wildcard inbox subscription (`<inbox>.*`, owned by
protocol/pending.py), routed to the waiting call by the last token, which is the
job id: no subscription per request. The same dispatcher answers executors'
liveness pings, so a job whose caller has gone (cancelled, crashed,
disconnected) is stopped at the executor.

Replies are verified (protocol/verify.py): a result counts only if its receipt is
signed by the key bound to the executor it names, is trusted (`trust=`, a
`protocol.trust.Trust`; by default the keyring named by `LLOOM_TRUSTED_KEYS`, or
the open network with trust on first use), and hashes the exact request sent and
the content received. A reply that fails is ignored and counted in
`reply_forgeries`: the call keeps waiting for the genuine one, so an attacker racing
the executor cannot make it fail early; if none comes by the deadline, it raises
`ReplyForged` (which fails over to the next executor of a route). `Trust(verify=False)`
believes replies as they come, for executors that issue no receipts.

`sealed=True` (protocol/sealing.py) seals a job to the curve key its executor announces
and has every reply sealed back to a key pair made for the job; it routes through the
catalogue to executors that announce one. A reply that does not open counts as forged.

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
import hashlib
import itertools
import logging
from collections.abc import Collection
from types import TracebackType
from typing import Self, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from protocol import subjects as subj
from protocol import tracecontext
from protocol.catalog import Catalog
from protocol.connection import DEFAULT_CONNECT_TIMEOUT_S, NatsConnectOptions, Violations, close_nats, connect_nats
from protocol.durable import ensure_jobs_stream, jobs_subject, result_subject, results_bucket
from protocol.errors import (
    DeadlineExceeded,
    ExecutorLost,
    ForgedResult,
    InternalError,
    InvalidRequest,
    LloomError,
    NoExecutors,
    QueueUnavailable,
    ReplyForged,
    ResultPending,
    UnsupportedFeature,
)
from protocol.capabilities import required_capabilities
from protocol.chat_checks import check_chat_request
from protocol.estimate import estimate_prompt_tokens
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
from protocol.pending import Pending, may_retry_busy, payload_too_large
from protocol.replies import Target, decode_reply, fails_over, no_responders
from protocol.results import open_result
from protocol.resume import DEFAULT_SILENCE_S
from protocol.routing import Candidate, Constraints, LatencyBook, ModelRequest, Specific, rank
from protocol.sealing import ClientSeal, SealError
from protocol.stream import ChatStream
from protocol.trust import Trust
from protocol.verify import ReplyVerifier, sha256_hex, signed_answer

T = TypeVar("T")

DEFAULT_URL = "nats://127.0.0.1:4222"
# How often `result()` reads the bucket again while it waits for the announcement.
RESULT_RECHECK_S = 2.0
DEFAULT_TIMEOUT_S = 120.0
# Submitted jobs whose request hash (to check their result's receipt) and cancel token are kept
# until their result is read; past this many, the oldest are forgotten.
MAX_REMEMBERED_SUBMISSIONS = 10_000
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
        result_keys: Collection[str] | None = None,
        trust: Trust | None = None,
        executor_silence_s: float = DEFAULT_SILENCE_S,
    ) -> None:
        """`trust`: whose replies to believe; None reads the keyring file named by `LLOOM_TRUSTED_KEYS`
        (the open network when unset). Raises `protocol.trust.TrustError` for a keyring it cannot read.
        `executor_silence_s`: a call whose executor sends nothing (not even a keepalive) for this
        long fails with `ExecutorLost` (and is retried where it may be; see protocol/resume.py)."""
        self._nc = nc
        self.trust = trust if trust is not None else Trust.from_env()
        self._verifier = ReplyVerifier(self.trust, bound_key=self._bound_key)
        # Recorded in executors' receipts, so usage can be reported per client; short and printable.
        if client_id is not None:
            try:
                subj.check_client_id(client_id)
            except subj.SubjectError as e:
                raise InvalidRequest(str(e)) from None
        self.client_id = client_id
        # Executor keys whose signed queued results are accepted; None: any key whose signature holds.
        self.result_keys = None if result_keys is None else frozenset(result_keys)
        # What each job this client submitted hashed to, so its result's receipt can be checked against it.
        self._submitted: dict[str, str] = {}
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
        trust: Trust | None = None,
        options: NatsConnectOptions | None = None,
        executor_silence_s: float = DEFAULT_SILENCE_S,
    ) -> LloomClient:
        """Connect to NATS and return a started client that closes the connection with itself.

        `options` says how to authenticate and use TLS (and the inbox prefix a secured
        server's permissions expect, docs/security.md). Raises `ConnectionError` naming
        the URL (password masked) and the cause when no server answers, the server's
        certificate is not trusted or the credentials are refused.
        """
        trust = trust if trust is not None else Trust.from_env()  # a bad keyring fails before connecting
        made: list[LloomClient] = []

        async def reconnected() -> None:
            # Replies sent while we were away may be lost: ask executors to send them again.
            if made:
                await made[0]._pending.watch.reconnected()

        violations = Violations(then=_report_nats_error)
        nc = await connect_nats(servers, name="lloom-client", options=options, on_error=violations,
                                on_reconnected=reconnected)  # fmt: skip
        client = cls(nc, timeout=timeout, busy_retries=busy_retries, client_id=client_id, trust=trust,
                     executor_silence_s=executor_silence_s)  # fmt: skip
        made.append(client)
        client._owns_nc = True
        await client.start()
        # A client whose replies the server will not deliver would otherwise wait out every job's timeout.
        try:
            wait = options.connect_timeout_secs if options else DEFAULT_CONNECT_TIMEOUT_S
            await violations.check_inbox(nc, f"{client._pending.inbox}.*", timeout=wait)
        except ConnectionError:
            await client.close()
            raise
        return client

    async def start(self) -> None:
        if self.trust.verify and not self.trust.closed:
            _log.info("no trusted executor keys configured: replies are checked against the key that first"
                      " announced (or answered for) each executor id; set a keyring with trust=, --trust or"
                      " LLOOM_TRUSTED_KEYS to refuse unknown executors")  # fmt: skip
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

    @property
    def reply_forgeries(self) -> dict[str, int]:
        """Replies refused by verification so far, by reason (no_receipt, impostor, wrong_request, ...)."""
        return dict(self._verifier.forgeries)

    async def catalog(self) -> Catalog:
        """The live network catalogue, started (and filled by a query) on first use.

        It keeps only executors this client trusts, and its id-to-key bindings are the ones
        replies are checked against from then on."""
        if self._catalog is None:
            catalog = Catalog(self._nc, trust=self.trust)
            await catalog.start()
            self._catalog = catalog
        return self._catalog

    def _bound_key(self, executor_id: str) -> str | None:
        """The key the catalogue binds `executor_id` to, once this client runs a catalogue."""
        return self._catalog.bound_key(executor_id) if self._catalog is not None else None

    async def served_models(self, *, timeout: float = SERVED_QUERY_S) -> list[str] | None:
        """The names of the models live executors serve now, sorted; None if the catalogue could not be asked.

        The running catalogue's, if routing started one; else one query that waits at most `timeout`."""
        if self._catalog is not None:
            return self._catalog.model_names()
        once = Catalog(self._nc, query_timeout=timeout, trust=self.trust)
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
        check_chat_request(request)
        if request.stream:
            request = msgspec.structs.replace(request, stream=False)
        if required_capabilities(request):
            # Any executor serving the model may take a queued job: refuse now what none of those
            # up can do (nobody up: it waits, as any job). See docs/protocol.md, Capabilities.
            with contextlib.suppress(NoExecutors):
                await self.candidates(request, Specific(request.model))
        job_id = subj.check_id("job id", job_id or self.new_job_id())
        js = self._nc.jetstream()
        headers = {subj.HDR_MSG_ID: job_id, subj.HDR_JOB_ID: job_id,
                   subj.HDR_CANCEL_TOKEN: self._pending.cancel_token(job_id)}  # fmt: skip
        if self.client_id:
            headers[subj.HDR_CLIENT] = self.client_id
        payload = encoder.encode(request)
        if len(payload) + subj.headers_size(headers) > self._nc.max_payload:  # the server would drop the connection
            self._pending.forget(job_id)
            raise payload_too_large(len(payload) + subj.headers_size(headers), self._nc.max_payload)
        try:
            if not self._jobs_stream_ready:
                await ensure_jobs_stream(js)
                self._jobs_stream_ready = True
            await js.publish(jobs_subject(request.model), payload, headers=headers, timeout=self.timeout)
        except (nats.errors.Error, TimeoutError) as e:
            self._pending.forget(job_id)
            raise QueueUnavailable(f"the durable queue did not take job {job_id}: {_why(e)}", job_id=job_id) from e
        self._submitted[job_id] = hashlib.sha256(payload).hexdigest()
        while len(self._submitted) > MAX_REMEMBERED_SUBMISSIONS:  # bounded: the oldest are forgotten first
            oldest = next(iter(self._submitted))
            del self._submitted[oldest]
            self._pending.forget(oldest)
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
        return self._queued_result(job_id, entry.value or b"")

    async def result(self, job_id: str, *, timeout: float | None = None) -> ChatResponse:
        """Await a queued job's result; `ResultPending` if it is not there within `timeout`.

        Listens for the executor's announcement of the result and reads the bucket (now,
        and every few seconds in case an announcement was missed, e.g. across a reconnect),
        so a JetStream blip within `timeout` is waited out; `QueueUnavailable` if the
        bucket could not be read at all by then. A value that fails its check (protocol/results.py)
        counts as not there yet, since the executor may still file the real one over it;
        `ForgedResult` if that is still all there is at the end of `timeout`."""
        subj.check_id("job id", job_id)
        loop = asyncio.get_running_loop()
        budget = timeout or self.timeout
        deadline = loop.time() + budget
        sub = await self._nc.subscribe(result_subject(job_id))
        unreachable: BaseException | None = None
        forged: ForgedResult | None = None
        try:
            while True:
                try:
                    found = await self.fetch(job_id)
                    unreachable = forged = None
                    if found is not None:
                        return found
                except QueueUnavailable as e:
                    unreachable = e
                except ForgedResult as e:
                    forged = e
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=min(remaining, RESULT_RECHECK_S))
                except nats.errors.TimeoutError:
                    continue
                try:
                    return self._queued_result(job_id, msg.data)
                except ForgedResult:
                    continue  # the announcement is a hint anyone could fake: the bucket decides
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if forged is not None:
            raise forged
        if unreachable is not None:
            raise QueueUnavailable(f"cannot read the result of job {job_id}: {_why(unreachable)}", job_id=job_id)
        raise ResultPending(f"job {job_id} has no result yet (waited {budget:g}s)", job_id=job_id)

    def _queued_result(self, job_id: str, data: bytes) -> ChatResponse:
        """The answer in a stored result (protocol/results.py checks who signed it); its typed error if it failed.

        `ForgedResult` if the value was not filed for this job by an executor (key) this client trusts."""
        reply = open_result(data, job_id, request_sha256=self._submitted.get(job_id), trusted_keys=self.result_keys,
                            trust=self.trust)  # fmt: skip
        self._submitted.pop(job_id, None)  # a job's result is final: its bookkeeping can go
        self._pending.forget(job_id)
        if type(reply) is ChatResponse:
            return reply
        raise error_from_wire(reply)

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
        """The executors `route` would try for `request`, best first; `NoExecutors` if none.

        Only executors announcing every capability the request needs (tools, vision,
        json_schema, reasoning: `protocol.capabilities`) are candidates; when executors
        offer the model but none with them, `UnsupportedFeature` names what is missing
        and who serves the model without it."""
        catalog = await self.catalog()
        needs = frozenset(str(c) for c in required_capabilities(request))
        base = constraints or Constraints()

        def ranked(cons: Constraints) -> list[Candidate]:
            return rank(
                catalog.entries(),
                route,
                cons,
                prompt_tokens=estimate_prompt_tokens(request),
                completion_tokens=request.max_tokens or request.max_completion_tokens or DEFAULT_COMPLETION_ESTIMATE,
                observed=self.latencies,
                trust=self.trust,
            )

        found = ranked(msgspec.structs.replace(base, features=base.features | needs) if needs else base)
        if not found:
            served = catalog.model_names()
            if isinstance(route, Specific) and constraints is None and route.model not in served:
                raise no_responders((route.model, None), served)  # a typo, most likely: name the served ones
            without = ranked(base) if needs else []
            if without:
                raise UnsupportedFeature(_missing_capability(needs, route, without))
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
        sealed: bool = False,
    ) -> ChatResponse:
        """Run one job and return its normalized response; raises the job's typed error.

        `sealed`: seal the request to the chosen executor's curve key and have the reply sealed
        back (protocol/sealing.py); routed through the catalogue to executors that announce one
        (`executor` narrows it to one), `NoExecutors` if none does."""
        check_chat_request(request)  # a bad request fails here, before anything is sent
        if request.stream:
            request = msgspec.structs.replace(request, stream=False)
        budget = timeout or self.timeout
        deadline = asyncio.get_running_loop().time() + budget
        if sealed:
            found = await self.sealed_candidates(request, route, constraints, executor)
            return await self._failover(found, request, deadline, attempt_timeout, hedge_after)
        if route is None and constraints is None and (executor is not None or not required_capabilities(request)):
            # The model's queue group (or the named executor, which refuses what its model cannot do).
            return await self._complete_on((request.model, executor), request, deadline, self.busy_retries)
        found = await self.candidates(request, route or Specific(request.model), constraints)
        return await self._failover(found, request, deadline, attempt_timeout, hedge_after)

    async def sealed_candidates(
        self, request: ChatRequest, route: ModelRequest | None, constraints: Constraints | None,
        executor: str | None = None,
    ) -> list[Candidate]:
        """The executors a sealed job may go to, best first: those `route` admits that announce a curve key."""
        want = route or Specific(request.model)
        found = [c for c in await self.candidates(request, want, constraints)
                 if c.curve_key is not None and (executor is None or c.executor_id == executor)]  # fmt: skip
        if not found:
            who = f"executor {executor!r} does not offer" if executor else "no executor offers"
            raise NoExecutors(f"{who} {_describe(want)} with a curve key: sealed jobs cannot be sent"
                              " (docs/security.md, Sealed jobs)")  # fmt: skip
        return found

    def stream(
        self,
        request: ChatRequest,
        *,
        timeout: float | None = None,
        executor: str | None = None,
        route: ModelRequest | None = None,
        constraints: Constraints | None = None,
        sealed: bool = False,
    ) -> ChatStream:
        """Start a streamed job; iterate the result for chunks, then read `.end`.

        With a route, the stream fails over to the next executor only before its
        first chunk: text already delivered cannot be taken back. `sealed`: as for `complete`.
        """
        check_chat_request(request)
        if not request.stream:
            request = msgspec.structs.replace(request, stream=True)
        if route is None and executor is None and required_capabilities(request):
            route = Specific(request.model)  # through the catalogue: only executors announcing what it needs
        candidates = self.candidates
        if sealed:

            async def candidates(req: ChatRequest, rt: ModelRequest, cons: Constraints | None) -> list[Candidate]:
                return await self.sealed_candidates(req, rt, cons, executor)

        return ChatStream(self._pending, request, timeout or self.timeout, executor, route, constraints,
                          busy_retries=self.busy_retries, candidates=candidates, sealed=sealed,
                          no_responders=self.no_responders_error,
                          verifier=self._verifier if self.trust.verify else None,
                          bind=self._bind_for)  # fmt: skip

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

    async def _complete_on(self, target: Target, request: ChatRequest, deadline: float, retries: int,
                           sealed_to: str | None = None) -> ChatResponse:  # fmt: skip
        return await self._request(target, encoder.encode(request), unary_reply_decoder, ChatResponse, deadline, retries,
                                   sealed_to=sealed_to)  # fmt: skip

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
        sealed_to: str | None = None,
    ) -> T:
        """`_attempts` inside a client span when the application traces (protocol/tracecontext.py)."""
        with tracecontext.client_span(_OPERATIONS.get(expected, "chat"), target[0]):
            return await self._attempts(target, payload, decoder, expected, deadline, retries, subject=subject,
                                        sealed_to=sealed_to)  # fmt: skip

    async def _attempts(
        self,
        target: Target,
        payload: bytes,
        decoder: msgspec.json.Decoder,
        expected: type[T],
        deadline: float,
        retries: int,
        *,
        subject: str | None = None,
        sealed_to: str | None = None,
    ) -> T:
        """One request/reply job on `target` (its model's queue group, or one executor), retried when busy.

        `sealed_to`: the executor's public curve key; the job is sealed to it with a fresh key pair per
        attempt, and each reply opened before it is read (one that does not open counts as forged)."""
        verifying = self.trust.verify
        request_sha = sha256_hex(payload) if verifying else ""  # of the plaintext: what the receipt hashes
        if verifying:
            await self._bind_for(target)
        for attempt in itertools.count():  # may_retry_busy bounds it
            # A busy executor never ran the job, so a retry is a new job: replies
            # still in flight for the old id can then not be mistaken for its own.
            job_id = self._pending.new_job_id()
            inbox: asyncio.Queue[bytes | LloomError] = asyncio.Queue()
            self._pending.register(job_id, inbox)
            forged: ReplyForged | None = None
            seal = ClientSeal(sealed_to) if sealed_to is not None else None
            try:
                if seal is None:
                    await self._pending.send(target, payload, job_id, deadline, subject=subject)
                else:
                    await self._pending.send(target, seal.box.seal(payload), job_id, deadline, subject=subject,
                                             sealed_by=seal.header)  # fmt: skip
                while True:
                    try:
                        data = await self._pending.wait(inbox, deadline, job_id, target)
                    except DeadlineExceeded:
                        if forged is not None:  # what there was instead of an answer says more than a timeout
                            raise ReplyForged(f"{forged.message}; no genuine reply came in time",
                                              job_id=job_id) from None  # fmt: skip
                        raise
                    try:
                        if seal is not None:
                            data = self._open(seal, data)
                        reply = decode_reply(decoder, data)
                        if type(reply) is expected:
                            if verifying:
                                self._verify(reply, job_id, request_sha, target[1])
                            return reply
                    except (ReplyForged, InternalError) as e:
                        if not verifying:
                            raise
                        # Ignored: the genuine reply may still come (see the module docstring).
                        forged = e if isinstance(e, ReplyForged) else ReplyForged(f"malformed reply: {e.message}")
                        if isinstance(e, InternalError):
                            self._verifier.forgeries["malformed"] += 1
                        _log.warning("refused a reply: %s", forged.message)
                        continue
                    break  # an error reply
            except NoExecutors:
                raise await self.no_responders_error(target) from None
            except ExecutorLost as lost:
                if await may_retry_busy(lost, attempt, retries, deadline):
                    continue
                raise
            finally:
                self._pending.unregister(job_id)
            assert isinstance(reply, ErrorReply)
            err = error_from_wire(reply)
            if not await may_retry_busy(err, attempt, retries, deadline):
                raise err
        raise AssertionError("unreachable")  # pragma: no cover

    def _open(self, seal: ClientSeal, data: bytes) -> bytes:
        """A sealed job's reply, opened; `ReplyForged` if it was not sealed by the executor for this job."""
        try:
            return seal.box.open(data)
        except SealError as e:
            self._verifier.forgeries["unsealed"] += 1
            raise ReplyForged(f"sealed job's reply cannot be opened: {e}") from None

    def _verify(self, reply: object, job_id: str, request_sha: str, executor: str | None) -> None:
        """Raise `ReplyForged` unless `reply`'s receipt vouches for it (protocol/verify.py)."""
        if isinstance(reply, ChatResponse):
            calls = encoder.encode(reply.tool_calls) if reply.tool_calls else None
            content = signed_answer(reply.content, reply.reasoning_content, calls)
        elif isinstance(reply, TextResponse):
            content = reply.text.encode()
        else:
            assert isinstance(reply, EmbeddingResponse)
            content = encoder.encode(reply.embeddings)  # what the executor hashed: the vectors' JSON
        receipt = self._verifier.check_identity(
            reply.receipt, executor_id=reply.executor_id, job_id=job_id, client=self.client_id,
            request_sha256=request_sha, target=executor,
        )  # fmt: skip
        self._verifier.check_response(receipt, content)

    async def _bind_for(self, target: Target) -> None:
        """For a job to one named executor on an open network, learn its id's key from the catalogue first."""
        if target[1] is not None and not self.trust.closed and self._catalog is None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self.catalog()

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
            reply = await self._complete_on((cand.model, cand.executor_id), job, end, 0, sealed_to=cand.curve_key)
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


# gen_ai.operation.name of each kind of reply a client waits for.
_OPERATIONS: dict[type, str] = {ChatResponse: "chat", EmbeddingResponse: "embeddings", TextResponse: "text_completion"}


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__




def _missing_capability(needs: frozenset[str], route: ModelRequest, without: list[Candidate]) -> str:
    serving = sorted({f"{c.executor_id} ({', '.join(c.offer.features) or 'no features'})" for c in without})
    return (f"no executor on the network announces {', '.join(sorted(needs))} for {_describe(route)}; it is"
            f" served without it by: {', '.join(serving)}. Send the request without"
            f" {', '.join(sorted(needs))}, or serve the model where its backend supports it"
            " ([[models]] features, docs/protocol.md)")


def _describe(route: ModelRequest) -> str:
    if isinstance(route, Specific):
        return f"model {route.model!r}"
    return f"a model for {msgspec.json.encode(route).decode()}"


async def _report_nats_error(e: Exception) -> None:
    # A library must not print; applications see this through stdlib logging.
    _log.warning("nats: %s", e or type(e).__name__)


_log = logging.getLogger("protocol.client")
