"""The backend interface (the seed's `LlmBackend`) and the normalized types it returns.

A backend turns a normalized `ChatRequest` into a `Completion`, or into a stream
of `Delta`s closed by one `Finish`. It knows HTTP (or whatever it speaks) and
these types; it knows nothing of NATS. Failures are raised as the typed errors
of `protocol.errors` (BackendUnavailable, RateLimited, ModelNotFound, ...), so
the node can put them on the wire without knowing which backend raised them.

Custom backends implement this protocol and register a factory under the
`lloom.backends` entry-point group (see `registry.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import msgspec

from protocol.chat_types import TokenLogprob, ToolCall, ToolCallDelta
from protocol.messages import ChatRequest, FinishReason, Usage


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    content: str
    finish_reason: FinishReason
    usage: Usage
    # Set when a fallback served the job differently from what was asked (a pool's `degrade`).
    degraded: str | None = None
    tool_calls: list[ToolCall] | None = None  # the calls the model asked for
    reasoning_content: str | None = None  # the model's reasoning, apart from `content`
    logprobs: list[TokenLogprob] | None = None


class Delta(msgspec.Struct, frozen=True):
    """A piece of the answer, in order: generated text, and (rarer) reasoning text, pieces of
    tool calls, the log probabilities of the piece's tokens. `text` is "" when the piece
    carries only reasoning or tool calls."""

    text: str
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    logprobs: list[TokenLogprob] | None = None


class Finish(msgspec.Struct, frozen=True, kw_only=True):
    """The last event of a stream."""

    model: str
    finish_reason: FinishReason
    usage: Usage
    degraded: str | None = None


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    context_length: int | None = None
    # What the server says the model supports (`protocol.capabilities.Capability` names,
    # executor/backends/model_caps.py); None: it did not say, so only the config decides.
    capabilities: frozenset[str] | None = None


StreamEvent = Delta | Finish


class Embeddings(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    vectors: list[list[float]]  # one per input, in input order
    prompt_tokens: int
    estimated: bool = False  # the backend reported no usage


@runtime_checkable
class Backend(Protocol):
    """What the node needs from a backend."""

    @property
    def name(self) -> str:
        """Short label for logs and errors, e.g. `lmstudio at http://localhost:1234/v1`."""
        ...

    async def complete(self, request: ChatRequest) -> Completion: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Yield `Delta`s as the backend produces them, then exactly one `Finish`."""
        ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def health_check(self) -> bool: ...

    async def aclose(self) -> None: ...


class TextParams(msgspec.Struct, frozen=True):
    """Sampling parameters of a legacy text completion; jobs share a call only if these match."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None


class TextChoice(msgspec.Struct, frozen=True):
    text: str
    finish_reason: FinishReason


class TextCompletions(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    choices: list[TextChoice]  # one per prompt, in prompt order
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False  # the backend reported no usage


@runtime_checkable
class TextBackend(Protocol):
    """Optional: legacy text completions (OpenAI's /v1/completions), one choice per prompt."""

    async def complete_texts(self, model: str, prompts: list[str], params: TextParams) -> TextCompletions: ...


@runtime_checkable
class EmbeddingBackend(Protocol):
    """Optional: a backend that also computes embeddings (OpenAI's /v1/embeddings).

    `inputs` may hold the texts of several jobs at once (the node's batcher
    coalesces them), so one call serves many."""

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings: ...
