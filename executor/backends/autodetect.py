"""`backend = "auto"`: find a local OpenAI-compatible server on its usual port.

Probes every local preset (LM Studio 1234, Ollama 11434, vLLM 8000, llama.cpp
8080) at once with a short timeout and picks the first in preset order that
lists its models. When none answers and the local backend is set up (its model
prepared and `llama-server` built by `lloom-executor setup-local`),
it becomes the local backend instead: a node on a fresh machine serves a real
model with no configuration. Otherwise, until a server answers, the backend has
no models and every job gets a `backend_unavailable` error that says what was
tried; each model refresh of the node probes again, so starting LM Studio later
is enough.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from executor.backends import local
from executor.backends.base import (
    Backend,
    Completion,
    EmbeddingBackend,
    Embeddings,
    ModelInfo,
    StreamEvent,
    TextBackend,
    TextCompletions,
    TextParams,
)
from executor.backends.openai_compat import OpenAICompatibleBackend, api_key_of
from executor.backends.presets import PRESETS, Preset
from executor.config import LlmClientConfig
from protocol.errors import BackendUnavailable, InvalidRequest, LloomError
from protocol.messages import ChatRequest

PROBE_TIMEOUT_S = 0.5


class ProbeResult:
    def __init__(self, backend: OpenAICompatibleBackend, models: list[ModelInfo] | None, error: str | None) -> None:
        self.backend = backend
        self.models = models
        self.error = error


async def probe_local(
    session: aiohttp.ClientSession, config: LlmClientConfig, presets: list[Preset] | None = None
) -> list[ProbeResult]:
    """Ask every local preset for its models, concurrently; results in preset order."""
    candidates = presets if presets is not None else [p for p in PRESETS.values() if p.local]

    async def probe(preset: Preset) -> ProbeResult:
        assert preset.base_url is not None
        backend = OpenAICompatibleBackend(
            session, base_url=preset.base_url, api_key=api_key_of(config), timeout_secs=PROBE_TIMEOUT_S, preset=preset
        )
        try:
            return ProbeResult(backend, await backend.list_models(), None)
        except LloomError as e:
            return ProbeResult(backend, None, e.message)
        finally:
            await backend.aclose()  # a probe's connection; the chosen server gets a backend of its own

    return list(await asyncio.gather(*(probe(p) for p in candidates)))


class AutoDetectBackend:
    """A `Backend` that becomes the first local server found, else the local backend if set up."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: LlmClientConfig,
        presets: list[Preset] | None = None,
        *,
        local_fallback: bool | None = None,
    ) -> None:
        self._session = session
        self._config = config
        self._presets = presets
        # Default: fall back to `local` only when probing the standard ports.
        self._local_fallback = presets is None if local_fallback is None else local_fallback
        self._inner: Backend | None = None
        self._resolving = asyncio.Lock()  # one probe at a time: never two local model servers
        self.last_probe: list[ProbeResult] = []

    @property
    def name(self) -> str:
        return f"auto ({self._inner.name})" if self._inner else "auto (no local server found yet)"

    @property
    def resolved(self) -> Backend | None:
        return self._inner

    def set_api_key(self, api_key: str | None) -> None:
        """A rotated key: for the server found, and for one found later."""
        self._config = msgspec.structs.replace(self._config, api_key=api_key, api_key_file=None)
        setter = getattr(self._inner, "set_api_key", None)
        if callable(setter):
            setter(api_key)

    async def _resolve(self) -> Backend | None:
        if self._inner is not None:
            return self._inner
        async with self._resolving:
            return await self._probe_once()

    async def _probe_once(self) -> Backend | None:
        if self._inner is None:
            self.last_probe = await probe_local(self._session, self._config, self._presets)
            found = next((r for r in self.last_probe if r.models is not None), None)
            if found is not None:
                self._inner = OpenAICompatibleBackend(
                    self._session,
                    base_url=found.backend.base_url,
                    api_key=api_key_of(self._config),
                    timeout_secs=self._config.timeout_secs,
                    preset=found.backend.preset,
                )
            elif self._local_fallback and local.local_available(self._config):
                self._inner = local.from_config(self._config, self._session)
        return self._inner

    def _nothing_found(self) -> BackendUnavailable:
        tried = "; ".join(f"{r.backend.name}: {r.error}" for r in self.last_probe) or "nothing probed yet"
        return BackendUnavailable(
            f"no local LLM server found (tried {tried}). Start LM Studio, Ollama, vLLM or llama-server,"
            " or set [llm_client] backend and base_url, or serve a local model (SmolLM2-135M-Instruct):"
            " run `lloom-executor setup-local` once"
        )

    async def complete(self, request: ChatRequest) -> Completion:
        inner = await self._resolve()
        if inner is None:
            raise self._nothing_found()
        return await inner.complete(request)

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        inner = await self._resolve()
        if inner is None:
            raise self._nothing_found()
        if not isinstance(inner, EmbeddingBackend):
            raise InvalidRequest(f"{inner.name} does not compute embeddings")
        return await inner.embed(model, inputs, dimensions)

    async def complete_texts(self, model: str, prompts: list[str], params: TextParams) -> TextCompletions:
        inner = await self._resolve()
        if inner is None:
            raise self._nothing_found()
        if not isinstance(inner, TextBackend):
            raise InvalidRequest(f"{inner.name} does not serve text completions")
        return await inner.complete_texts(model, prompts, params)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        inner = await self._resolve()
        if inner is None:
            raise self._nothing_found()
        async for event in inner.stream(request):
            yield event

    async def list_models(self) -> list[ModelInfo]:
        inner = await self._resolve()
        if inner is None:
            raise self._nothing_found()
        return await inner.list_models()

    async def health_check(self) -> bool:
        inner = await self._resolve()
        return inner is not None and await inner.health_check()

    async def aclose(self) -> None:
        """Closes what it became (the session is the caller's)."""
        if self._inner is not None:
            await self._inner.aclose()
