"""What a job may use, and where its answer goes: the frozen `JobContext` and the reply channels.

A job never sees the node. The node builds one `JobContext` (its id, backend, limits,
counters and the optional collaborators: receipts, caches, batcher, queue) and hands it
to every job it starts; the durable queue runs jobs through the same node, so the same
context. Where a job's answer goes is a `ReplyChannel`: the caller's NATS reply subject,
or, for a job taken from the durable queue, a collector whose last message becomes the
stored result. The checks every kind of job makes (model served, max_tokens cap) are here
once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from nats.aio.client import Client as NATS

from executor.backends.base import Backend
from executor.catalog.features import model_features
from executor.catalog.perf import PerfTracker
from executor.config import ImageUrlPolicy
from protocol import subjects as subj
from protocol.capabilities import required_capabilities
from protocol.errors import InvalidRequest, ModelNotFound, UnsupportedFeature
from protocol.messages import ChatRequest
from protocol.sealing import SealedBox
from protocol.status import JobStats, QueueStatus

if TYPE_CHECKING:  # types only: none of these import the jobs package
    from executor.batching.coalescer import Batcher
    from executor.cache.memory import ResponseCache
    from executor.cache.shared import SharedCache
    from executor.receipts.issuer import ReceiptIssuer
    from executor.secrets import SecretMasker
    from executor.telemetry.recorder import JobRecorder
    from executor.telemetry.tracing import JobTracer

_SENTINEL = b""  # ADR-47: an empty message ends a multi-message reply


def _in_flight_unknown() -> int:  # a context built without a node (tests): never alone, receipts batched per turn
    return 2


class Enqueuer(Protocol):
    """The durable queue's producer side, as a job sees it (executor/queue/producer.py)."""

    def is_fallback_for(self, model: str) -> bool: ...

    async def enqueue(self, job_id: str, model: str, payload: bytes, client: str | None) -> None: ...

    def status(self, served: frozenset[str]) -> QueueStatus: ...


class ServedModels:
    """The models the node serves now, and what each can do (executor/catalog/features.py);
    the node replaces `names` and `features` when the backend's list changes."""

    __slots__ = ("features", "names")

    def __init__(self) -> None:
        self.names: frozenset[str] = frozenset()
        self.features: dict[str, frozenset[str]] = {}

    def features_of(self, model: str) -> frozenset[str]:
        found = self.features.get(model)
        return found if found is not None else frozenset(model_features(None, None))

    def __contains__(self, model: object) -> bool:
        return model in self.names


@dataclass(frozen=True, slots=True)
class Limits:
    max_tokens_cap: int
    max_payload: int  # the NATS server's, headers included


@dataclass(frozen=True, slots=True)
class JobContext:
    executor_id: str
    backend: Backend
    served: ServedModels
    limits: Limits
    stats: JobStats
    perf: PerfTracker
    receipts: ReceiptIssuer | None = None
    cache: ResponseCache | None = None
    shared_cache: SharedCache | None = None
    batcher: Batcher | None = None
    queue: Enqueuer | None = None
    # Blanks the process's secrets out of every error message before it goes on the wire.
    masker: SecretMasker | None = None
    # Telemetry (executor/telemetry/): finished jobs' figures, and spans; None when off.
    recorder: JobRecorder | None = None
    tracer: JobTracer | None = None
    # `[llm_client] image_urls`: which image URLs the backend may be asked to fetch (jobs/image_urls.py).
    image_urls: ImageUrlPolicy = "data_only"
    # How many jobs the node runs now: a job alone has its receipt written without waiting for others'.
    in_flight: Callable[[], int] = _in_flight_unknown

    @property
    def backend_kind(self) -> str:
        return backend_kind(self.backend)

    def check(self, model: str, max_tokens: int | None = None) -> None:
        """Refuse, typed, what no backend call should be made for."""
        if model not in self.served:
            raise ModelNotFound(
                f"executor {self.executor_id} does not serve model {model!r}", available_models=sorted(self.served.names)
            )
        if max_tokens is not None and max_tokens > self.limits.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is over this executor's limit of {self.limits.max_tokens_cap}"
            )

    def check_features(self, request: ChatRequest) -> None:
        """Refuse, typed, a request needing what this executor's model cannot do (before any backend call)."""
        has = self.served.features_of(request.model)
        missing = sorted(str(c) for c in required_capabilities(request) if c not in has)
        if missing:
            raise UnsupportedFeature(
                f"model {request.model!r} on executor {self.executor_id} does not support {', '.join(missing)}"
                f" (it announces: {', '.join(sorted(has))}); other executors may announce it:"
                " send the request without naming an executor and the client routes it to one that does"
            )


def chosen_backend(backend: Backend) -> Backend:
    """The backend actually serving: what `auto` chose once it has chosen, else the backend itself."""
    return getattr(backend, "resolved", None) or backend


def backend_kind(backend: Backend) -> str:
    """What receipts and the catalogue call the backend: `local`, `ollama`, ... (never `auto` once chosen)."""
    # Backend names read "<kind> at <url>": the kind is the first word.
    return chosen_backend(backend).name.split(" ", 1)[0]


class ReplyChannel(Protocol):
    """Where a job's messages go: `send` each, then `end` once for a stream.

    `sealed`: the job is a sealed one (protocol/sealing.py), whose content must not leave the
    executor in clear: no shared cache, no durable queue."""

    sealed: bool

    @property
    def subject(self) -> str | None: ...  # a NATS reply subject the caller listens on, if any

    async def send(self, payload: bytes, headers: dict[str, str] | None = None) -> None: ...

    async def end(self) -> None: ...


class NatsReply:
    """The caller's reply subject (an inbox)."""

    __slots__ = ("_nc", "subject")
    sealed = False

    def __init__(self, nc: NATS, subject: str) -> None:
        self._nc = nc
        self.subject = subject

    async def send(self, payload: bytes, headers: dict[str, str] | None = None) -> None:
        await self._nc.publish(self.subject, payload, headers=headers)

    async def end(self) -> None:
        await self._nc.publish(self.subject, _SENTINEL)


class Collected:
    """Keeps what a job sent; the last message is its result (the durable queue stores it)."""

    __slots__ = ("messages",)
    subject = None
    sealed = False

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def send(self, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.messages.append(payload)

    async def end(self) -> None:
        return None

    @property
    def last(self) -> bytes | None:
        return self.messages[-1] if self.messages else None


class SealedReply:
    """Seals every message of a sealed job before it reaches `inner` (the caller's reply subject).

    The empty message that ends a stream stays empty (it says nothing); an error's text moves
    out of the clear `Nats-Service-Error` header (it may quote the request) and travels only
    in the sealed payload; the code stays, so generic NATS tools still see an error."""

    __slots__ = ("_box", "_inner")
    sealed = True

    def __init__(self, inner: ReplyChannel, box: SealedBox) -> None:
        self._inner = inner
        self._box = box

    @property
    def subject(self) -> str | None:
        return self._inner.subject

    async def send(self, payload: bytes, headers: dict[str, str] | None = None) -> None:
        if headers and subj.HDR_SERVICE_ERROR in headers:
            headers = {**headers, subj.HDR_SERVICE_ERROR: "sealed"}
        await self._inner.send(self._box.seal(payload), headers)

    async def end(self) -> None:
        await self._inner.end()


def error_headers(message: str, status: int) -> dict[str, str]:
    """The micro-style error headers, so the payload stays data."""
    return {
        subj.HDR_SERVICE_ERROR: message[:200].replace("\r", " ").replace("\n", " "),
        subj.HDR_SERVICE_ERROR_CODE: str(status),
    }

