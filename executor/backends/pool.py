"""Several backends behind one: load balancing, circuit breakers, health checks, retries, fallbacks.

`BackendPool` is itself a `Backend`, so the node does not know it is there. For
each job it takes the members that serve the model and whose breaker lets
requests through, in the order of the configured strategy (round_robin,
least_connections, weighted), and tries them:

- a failure that says something about the backend (unavailable, 5xx, timeout,
  broken body, 429) counts against its breaker, and the job moves at once to
  the next healthy member: no request fails that a healthy backend could serve;
- when every member has been tried, the job waits the design document's
  `RetryConfig` backoff (1 s, doubling, at most 30 s, with jitter, and never
  less than a 429's Retry-After) and goes round again, at most `max_retries`
  times, and never past the caller's deadline (the node's `asyncio.timeout`);
- a caller's mistake (bad request, unknown model) is not retried;
- a stream moves only before its first token: text already sent stays sent.

When nothing can serve, the model's fallback decides: `secondary` (members
kept in reserve for it), `degrade` (another model and/or fewer max_tokens, said
in the result), `queue` (the typed error at once, which the node turns into a
place in the durable job queue: executor/queue/consumer.py), or `reject` (the typed
error at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec
import structlog

from executor.backends.base import (
    Backend,
    Completion,
    EmbeddingBackend,
    Embeddings,
    Finish,
    ModelInfo,
    StreamEvent,
    TextBackend,
    TextCompletions,
    TextParams,
)
from executor.backends.breaker import BreakerState, CircuitBreaker
from executor.config import FallbackConfig, LoadBalancingConfig, RetryConfig
from protocol.errors import BackendError, BackendUnavailable, LloomError, ModelNotFound, RateLimited
from protocol.messages import ChatRequest, EmbeddingRequest
from protocol.status import PoolMemberStatus

log = structlog.get_logger(logger_name=__name__)


class Member:
    __slots__ = ("name", "backend", "models", "weight", "breaker", "in_flight", "served", "_current")

    def __init__(self, name: str, backend: Backend, models: list[str] | None, weight: int, breaker: CircuitBreaker):
        self.name = name
        self.backend = backend
        self.models = set(models) if models else None  # None: whatever it lists
        self.weight = weight
        self.breaker = breaker
        self.in_flight = 0
        self.served = 0
        self._current = 0  # smooth weighted round robin state

    def serves(self, model: str, listed: dict[str, set[str]]) -> bool:
        return model in (self.models if self.models is not None else listed.get(self.name, set()))


class BackendPool:
    def __init__(
        self,
        members: list[Member],
        *,
        balancing: LoadBalancingConfig,
        retry: RetryConfig,
        fallbacks: dict[str, FallbackConfig] | None = None,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.members = members
        self.balancing = balancing
        self.retry = retry
        # Jittered: retries from many jobs after one outage do not arrive together.
        self._retry_backoff = retry.backoff(jitter=0.5)
        self.fallbacks = fallbacks or {}
        self._sleep = sleep
        self._listed: dict[str, set[str]] = {}
        self._rr = 0
        self._health_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return "pool (" + ", ".join(f"{m.name}: {m.backend.name}" for m in self.members) + ")"

    # -- membership and order --

    def _reserve(self, model: str) -> set[str]:
        fb = self.fallbacks.get(model)
        return set(fb.secondary) if fb and fb.strategy == "secondary" else set()

    def candidates(self, model: str, *, reserve: bool = False) -> list[Member]:
        """Members that serve `model` and may take a request now, best first."""
        reserved = self._reserve(model)
        pool = [
            m for m in self.members
            if m.serves(model, self._listed) and (m.name in reserved) == reserve and m.breaker.available()
        ]  # fmt: skip
        if len(pool) < 2:
            return pool
        strategy = self.balancing.strategy
        if strategy == "least_connections":
            start = self._rr = self._rr + 1
            return sorted(pool, key=lambda m: (m.in_flight, (pool.index(m) - start) % len(pool)))
        if strategy == "weighted":
            # Smooth weighted round robin (as nginx): exact proportions, no bursts.
            total = sum(m.weight for m in pool)
            for m in pool:
                m._current += m.weight
            best = max(pool, key=lambda m: m._current)
            best._current -= total
            return [best, *sorted((m for m in pool if m is not best), key=lambda m: -m._current)]
        self._rr += 1
        k = self._rr % len(pool)
        return pool[k:] + pool[:k]

    # -- the Backend interface --

    async def complete(self, request: ChatRequest) -> Completion:
        async def run(member: Member, req: ChatRequest) -> Completion:
            return await member.backend.complete(req)

        result, member, note = await self._serve(request, run)
        self._settle(member, ok=True)
        return msgspec.structs.replace(result, degraded=note) if note else result

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        """Embeddings from the first healthy member that serves `model` and computes them.

        Members fail over as for completions; retries with backoff and fallbacks are for
        completions only (an embedding has nothing to degrade to)."""

        async def run(member: Member, req: EmbeddingRequest) -> Embeddings:
            if not isinstance(member.backend, EmbeddingBackend):
                raise ModelNotFound(f"{member.name} does not compute embeddings")
            return await member.backend.embed(req.model, req.input, req.dimensions)

        request = EmbeddingRequest(model=model, input=inputs, dimensions=dimensions)
        result, member, _ = await self._serve(request, run, fallback=False)  # type: ignore[arg-type]
        self._settle(member, ok=True)
        return result

    async def complete_texts(self, model: str, prompts: list[str], params: TextParams) -> TextCompletions:
        """Legacy text completions from the first healthy member that serves `model` (failover as for embed)."""

        async def run(member: Member, req: EmbeddingRequest) -> TextCompletions:
            if not isinstance(member.backend, TextBackend):
                raise ModelNotFound(f"{member.name} does not serve text completions")
            return await member.backend.complete_texts(model, prompts, params)

        result, member, _ = await self._serve(EmbeddingRequest(model=model, input=prompts), run, fallback=False)  # type: ignore[arg-type]
        self._settle(member, ok=True)
        return result

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # Opened up to its first event inside the retry loop; from then on the stream is final.
        async def run(member: Member, req: ChatRequest) -> tuple[AsyncIterator[StreamEvent], StreamEvent | None]:
            events = member.backend.stream(req)
            try:
                return events, await anext(events)
            except StopAsyncIteration:
                return events, None
            except BaseException:
                await events.aclose()  # type: ignore[attr-defined]
                raise

        (events, first), member, note = await self._serve(request, run)
        ok = True
        try:
            if first is not None:
                yield _noted(first, note)
            async for event in events:
                yield _noted(event, note)
        except BackendError:
            ok = False
            raise
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            self._settle(member, ok=ok)

    async def list_models(self) -> list[ModelInfo]:
        found: dict[str, ModelInfo] = {}
        errors = []
        said: dict[str, list[frozenset[str] | None]] = {}  # model -> each listing member's capabilities
        for m in self.members:
            if m.models is not None:
                for name in m.models:
                    found.setdefault(name, ModelInfo(id=name))
                if m.breaker.state is BreakerState.OPEN:
                    continue
            try:
                listed = await m.backend.list_models()
            except LloomError as e:
                errors.append(f"{m.name}: {e.message}")
                continue
            self._listed[m.name] = {i.id for i in listed}
            for info in listed:
                if m.models is None or info.id in m.models:
                    said.setdefault(info.id, []).append(info.capabilities)
                known = found.get(info.id)
                # The backend's own entry (it may know the context length) unless one already does.
                if (m.models is None or info.id in m.models) and (known is None or known.context_length is None):
                    found[info.id] = info
        if not found and errors:
            raise BackendUnavailable("no backend of the pool lists models: " + "; ".join(errors))
        # A job may go to any member serving its model: the pool can do what all of them can
        # (unknown if any of them did not say).
        for name, caps in said.items():
            known_caps = None if None in caps else frozenset.intersection(*caps)  # type: ignore[arg-type]
            found[name] = msgspec.structs.replace(found[name], capabilities=known_caps)
        return list(found.values())

    def available(self, model: str) -> bool:
        """Whether some member (reserve included) could take a request for `model` now."""
        return bool(self.candidates(model) or self.candidates(model, reserve=True))

    async def health_check(self) -> bool:
        results = await asyncio.gather(*(self._check(m) for m in self.members))
        return any(results)

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for m in self.members:
            await m.backend.aclose()

    def start_health_checks(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name="pool-health")

    def status(self) -> list[PoolMemberStatus]:
        return [
            PoolMemberStatus(name=m.name, backend=m.backend.name, state=m.breaker.state.value,
                             failures=m.breaker.failures, in_flight=m.in_flight, served=m.served)
            for m in self.members
        ]  # fmt: skip

    # -- internals --

    async def _check(self, m: Member) -> bool:
        ok = await m.backend.health_check()
        if ok:
            if m.breaker.state is not BreakerState.CLOSED:
                log.info("backend recovered", backend=m.name)
            m.breaker.success()
        elif m.breaker.state is BreakerState.CLOSED:
            m.breaker.failure()
        return ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.balancing.health_check_interval_secs)
            await self.health_check()

    async def _serve(self, request: ChatRequest, run, *, fallback: bool = True):  # type: ignore[no-untyped-def]
        """(result, member, degradation note) from the first member that succeeds; the caller settles."""
        last: LloomError | None = None
        fb = self.fallbacks.get(request.model) if fallback else None
        retries = self.retry.max_retries if fallback else 0
        for attempt in range(retries + 1):
            for reserve in (False, True):
                for member in self.candidates(request.model, reserve=reserve):
                    if not member.breaker.allow():
                        continue
                    member.in_flight += 1
                    try:
                        result = await run(member, request)
                    except LloomError as e:
                        member.in_flight -= 1
                        if isinstance(e, BackendError):
                            member.breaker.failure()
                        elif not isinstance(e, ModelNotFound):
                            member.breaker.success()  # it answered: the request was at fault
                            raise
                        last = e
                        log.warning("backend failed; trying the next", backend=member.name, error=e.message)
                        continue
                    except BaseException:
                        member.in_flight -= 1
                        raise
                    return result, member, None
            if fb is not None and fb.strategy == "degrade":
                return await self._degrade(request, fb, run)
            if (fb is not None and fb.strategy in ("reject", "queue")) or attempt == retries:
                # queue: the job does not wait here; the node puts it in the durable queue
                break
            await self._sleep(self._backoff(attempt, last))
        if last is None:
            raise BackendUnavailable(f"no healthy backend in the pool serves model {request.model!r} right now")
        raise last

    async def _degrade(self, request: ChatRequest, fb: FallbackConfig, run):  # type: ignore[no-untyped-def]
        changes: dict[str, object] = {}
        if fb.degrade_model:
            changes["model"] = fb.degrade_model
        # The limit keeps the name the request gave it (max_tokens or max_completion_tokens).
        field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        asked = getattr(request, field)
        if fb.degrade_max_tokens and (asked is None or asked > fb.degrade_max_tokens):
            changes[field] = fb.degrade_max_tokens
        note = f"{request.model} had no healthy backend; served with " + ", ".join(f"{k}={v}" for k, v in changes.items())
        result, member, _ = await self._serve(msgspec.structs.replace(request, **changes), run, fallback=False)
        return result, member, note

    def _backoff(self, attempt: int, last: LloomError | None) -> float:
        delay = self._retry_backoff.delay(attempt)
        if isinstance(last, RateLimited) and last.retry_after_s:
            delay = max(delay, last.retry_after_s)
        return delay

    def _settle(self, member: Member, *, ok: bool) -> None:
        member.in_flight -= 1
        if ok:
            member.served += 1
            member.breaker.success()
        else:
            member.breaker.failure()


def _noted(event: StreamEvent, note: str | None) -> StreamEvent:
    if note and isinstance(event, Finish):
        return msgspec.structs.replace(event, degraded=note)
    return event
