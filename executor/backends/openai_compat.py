"""The backend for every server that speaks OpenAI's /v1 chat API over HTTP.

LM Studio, OpenAI, Ollama, vLLM and llama.cpp's server all answer
`POST {base_url}/chat/completions` (JSON, or SSE with `stream: true`) and
`GET {base_url}/models`. This module sends the request body `openai_chat.chat_body`
builds (OpenAI's fields only, never lloom's own), decodes the answer with typed
decoders built once (`openai_chat`), and translates every failure into one of
the typed errors of `protocol.errors` through `_status_error` and `_io_error`,
with a message that says what to do about it.

HTTP goes through the `Transport` the backend is given (`transport/`): by
default the lean keep-alive HTTP/1.1 pool, which costs a fraction of aiohttp's
CPU per request on the executor's hot path (see docs/benchmarks.md); aiohttp
where a proxy is needed (`transport/choose.py` decides). The backend owns its
transport and closes it in `aclose()`.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import AsyncIterator, Mapping

import aiohttp
import msgspec
import structlog

from executor.backends.model_caps import CapabilityProbe
from executor.backends.base import (
    Completion,
    Embeddings,
    Finish,
    ModelInfo,
    StreamEvent,
    TextChoice,
    TextCompletions,
    TextParams,
)
from executor.backends.transport.base import (
    ConnectFailed,
    ConnectionDropped,
    HttpTimeout,
    MalformedResponse,
    PoolTimeout,
    Timeouts,
    Transport,
    TransportError,
)
from executor.backends.openai_chat import (
    WireUsage,
    chat_body,
    decode_chunk,
    decode_response,
    delta_of,
    tool_calls_of,
    usage_of,
)
from executor.backends.transport.choose import choose_transport
from executor.backends.transport.http1 import Http1Transport
from executor.backends.presets import PRESETS, Preset
from executor.config import ConfigError, LlmClientConfig
from executor.secrets import SecretMasker, read_key_file, redact_url, url_secrets
from executor.tokens import estimate_usage
from protocol.errors import (
    BackendAuthFailed,
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    LloomError,
    ModelNotFound,
    RateLimited,
    StreamInterrupted,
)
from protocol.messages import ChatRequest, FinishReason

log = structlog.get_logger(logger_name=__name__)

# -- the OpenAI wire format, as much of it as we read --------------------------


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _EmbeddingItem(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int = 0


class _EmbeddingList(msgspec.Struct):
    data: list[_EmbeddingItem]
    model: str = ""
    usage: _EmbeddingUsage | None = None


class _EmbeddingBody(msgspec.Struct, omit_defaults=True):
    model: str
    input: list[str]
    dimensions: int | None = None


class _TextChoice(msgspec.Struct):
    text: str = ""
    index: int = 0
    finish_reason: str | None = None


class _TextList(msgspec.Struct):
    choices: list[_TextChoice]
    model: str = ""
    usage: _Usage | None = None


class _TextBody(msgspec.Struct, omit_defaults=True):
    model: str
    prompt: list[str]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None


class _ModelEntry(msgspec.Struct):
    id: str
    context_length: int | None = None  # LM Studio, OpenRouter
    max_model_len: int | None = None  # vLLM
    meta: dict[str, object] | None = None  # llama.cpp: {"n_ctx_train": ...}


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]


_encode = msgspec.json.Encoder().encode
_decode_models = msgspec.json.Decoder(_ModelList).decode
_decode_embeddings = msgspec.json.Decoder(_EmbeddingList).decode
_decode_texts = msgspec.json.Decoder(_TextList).decode
_decode_any = msgspec.json.Decoder().decode

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
}


def _finish(reason: str | None) -> FinishReason:
    return _FINISH.get(reason, FinishReason.OTHER) if reason else FinishReason.OTHER


# -- the backend ---------------------------------------------------------------


class OpenAICompatibleBackend:
    """`Backend` over an OpenAI-compatible HTTP server.

    `session` is accepted for the factory signature shared with plugins. HTTP goes
    through `transport` (by default a new `Http1Transport` to `base_url` with
    `max_connections`), which the backend owns and closes in `aclose()`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout_secs: float = 300.0,
        preset: Preset = PRESETS["openai_compatible"],
        max_connections: int = 100,
        transport: Transport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.preset = preset
        self.timeout_secs = timeout_secs
        self.max_connections = max_connections
        self._http = transport or Http1Transport(self.base_url, max_connections=max_connections)
        # Waiting for a pooled connection is part of waiting for the backend: bounded by the same setting.
        self._timeouts = Timeouts(
            connect=min(timeout_secs, 10.0), acquire=timeout_secs, total=timeout_secs, idle_read=timeout_secs
        )
        self._probe_timeouts = msgspec.structs.replace(self._timeouts, total=min(timeout_secs, 5.0))
        # What error messages must never repeat: the key, and credentials inside base_url.
        self._masker = SecretMasker(url_secrets(self.base_url))
        self._display_url = redact_url(self.base_url)
        # Asks the server what its models can do, where the preset's server says (model_caps.py).
        self._caps = CapabilityProbe.for_preset(preset.name, self.base_url)
        self.set_api_key(api_key)

    def set_api_key(self, api_key: str | None) -> None:
        """Use `api_key` for every request from now on (a rotated key; calls in flight keep theirs)."""
        self._masker.add(api_key)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        # Keyless local servers (LM Studio's "not-needed") must not get a bogus header.
        if api_key and api_key != "not-needed":
            headers["Authorization"] = f"Bearer {api_key}"
        self._chat = self._http.endpoint("POST", "/chat/completions", headers)
        self._stream = self._http.endpoint("POST", "/chat/completions", {**headers, "Accept": "text/event-stream"})
        self._models = self._http.endpoint("GET", "/models", headers)
        self._embed = self._http.endpoint("POST", "/embeddings", headers)
        self._text = self._http.endpoint("POST", "/completions", headers)
        if self._caps is not None:
            self._caps.set_headers({k: v for k, v in headers.items() if k == "Authorization"})

    @property
    def name(self) -> str:
        return f"{self.preset.name} at {self._display_url}"

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._caps is not None:
            await self._caps.aclose()

    async def complete(self, request: ChatRequest) -> Completion:
        raw = await self._fetch(self._chat, chat_body(request, self.preset, stream=False), self._timeouts, request.model)
        try:
            parsed = decode_response(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BackendProtocolError(f"{self.name} sent a malformed completion ({e}): {_excerpt(raw)}") from e
        if not parsed.choices:
            raise BackendProtocolError(f"{self.name} sent a completion with no choices: {_excerpt(raw)}")
        choice = parsed.choices[0]
        message = choice.message
        content = message.content or ""
        try:
            tool_calls = tool_calls_of(message)
        except ValueError as e:
            raise BackendProtocolError(f"{self.name}: {e}") from e
        return Completion(
            model=parsed.model or request.model,
            content=content,
            finish_reason=_finish(choice.finish_reason),
            usage=usage_of(parsed.usage, request, content),
            tool_calls=tool_calls,
            reasoning_content=message.reasoning_content or message.reasoning or None,
            logprobs=choice.logprobs.content if choice.logprobs is not None else None,
        )

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        raw = await self._fetch(self._embed, _encode(_EmbeddingBody(model, inputs, dimensions)), self._timeouts, model)
        try:
            parsed = _decode_embeddings(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BackendProtocolError(f"{self.name} sent malformed embeddings ({e}): {_excerpt(raw)}") from e
        if sorted(item.index for item in parsed.data) != list(range(len(inputs))):
            raise BackendProtocolError(
                f"{self.name} sent {len(parsed.data)} embeddings for {len(inputs)} inputs: {_excerpt(raw)}"
            )
        vectors = [item.embedding for item in sorted(parsed.data, key=lambda item: item.index)]
        if parsed.usage is None or not parsed.usage.prompt_tokens:
            tokens = estimate_usage(inputs, "").prompt_tokens
            return Embeddings(model=parsed.model or model, vectors=vectors, prompt_tokens=tokens, estimated=True)
        return Embeddings(model=parsed.model or model, vectors=vectors, prompt_tokens=parsed.usage.prompt_tokens)

    async def complete_texts(self, model: str, prompts: list[str], params: TextParams) -> TextCompletions:
        body = _TextBody(model, prompts, params.max_tokens, params.temperature, params.top_p, params.stop)
        raw = await self._fetch(self._text, _encode(body), self._timeouts, model)
        try:
            parsed = _decode_texts(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BackendProtocolError(f"{self.name} sent a malformed text completion ({e}): {_excerpt(raw)}") from e
        if sorted(c.index for c in parsed.choices) != list(range(len(prompts))):
            raise BackendProtocolError(
                f"{self.name} sent {len(parsed.choices)} choices for {len(prompts)} prompts: {_excerpt(raw)}"
            )
        choices = [TextChoice(c.text, _finish(c.finish_reason)) for c in sorted(parsed.choices, key=lambda c: c.index)]
        if parsed.usage is None:
            usage = estimate_usage(prompts, "".join(c.text for c in choices))
            return TextCompletions(model=parsed.model or model, choices=choices, prompt_tokens=usage.prompt_tokens,
                                   completion_tokens=usage.completion_tokens, estimated=True)  # fmt: skip
        return TextCompletions(model=parsed.model or model, choices=choices, prompt_tokens=parsed.usage.prompt_tokens,
                               completion_tokens=parsed.usage.completion_tokens)  # fmt: skip

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        body = chat_body(request, self.preset, stream=True)
        started = False
        finish: str | None = None
        usage: WireUsage | None = None
        model = request.model
        parts: list[str] = []
        events = 0  # pieces relayed (text, reasoning or tool calls): a token each, for an estimate
        try:
            # A stream may run long; what must not happen is silence for timeout_secs.
            async with self._http.stream(self._stream, body, self._timeouts) as resp:
                if resp.status != 200:
                    raw = await resp.read_all()
                    raise await self._status_error(resp.status, raw, resp.headers, request.model)
                done = False
                async for line in resp.lines():
                    if not line.startswith(b"data:"):
                        continue  # blank separators, `:` comments, `event:` names
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = decode_chunk(data)
                    except (msgspec.DecodeError, msgspec.ValidationError) as e:
                        raise BackendProtocolError(
                            f"{self.name} sent a malformed stream event ({e}): {_excerpt(data)}"
                        ) from e
                    if chunk.error is not None:
                        raise BackendError(
                            f"{self.name} failed mid-stream: {self._masker.mask(str(chunk.error.message or chunk.error.code))[:500]}"
                        )
                    if chunk.model:
                        model = chunk.model
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices[:1]:
                        if choice.finish_reason:
                            finish = choice.finish_reason
                        delta = delta_of(choice)
                        if delta is not None:
                            started = True
                            events += 1
                            if delta.text:
                                parts.append(delta.text)
                            yield delta
                if not done and finish is None:
                    raise StreamInterrupted(f"{self.name} closed the stream before it finished")
                if done:
                    await resp.read_all()  # the end of the chunked body, so the connection can be reused
        except LloomError as e:
            if started and not isinstance(e, StreamInterrupted):
                raise StreamInterrupted(f"stream broke after it began: {e.message}") from e
            raise
        except TransportError as e:
            raise self._io_error(e, started=started) from e
        content = "".join(parts)
        yield Finish(model=model, finish_reason=_finish(finish), usage=usage_of(usage, request, content, events))

    async def list_models(self) -> list[ModelInfo]:
        raw = await self._fetch(self._models, b"", self._probe_timeouts, None)
        try:
            listing = _decode_models(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BackendProtocolError(f"{self.name} sent a malformed model list ({e}): {_excerpt(raw)}") from e
        caps = await self._caps.detect([m.id for m in listing.data]) if self._caps is not None else {}
        return [ModelInfo(id=m.id, context_length=_context_length(m), capabilities=caps.get(m.id))
                for m in listing.data]  # fmt: skip

    async def health_check(self) -> bool:
        try:
            await self.list_models()
        except LloomError:
            return False
        return True

    async def _fetch(self, endpoint: object, body: bytes, timeouts: Timeouts, model: str | None) -> bytes:
        """The whole body of a 200 answer; anything else raised as a typed error."""
        try:
            resp = await self._http.request(endpoint, body, timeouts)
        except TransportError as e:
            raise self._io_error(e, started=False) from e
        if resp.status != 200:
            raise await self._status_error(resp.status, resp.body, resp.headers, model)
        return resp.body

    # -- error translation: the one place HTTP failures become typed errors --

    async def _status_error(
        self, status: int, raw: bytes, headers: Mapping[str, str], model: str | None
    ) -> LloomError:
        # An upstream body may repeat what we sent (a rejected key above all): scrub it, keep it short.
        detail = self._masker.mask(_error_message(raw))
        where = f"{self.name} answered HTTP {status}"
        if status in (401, 403):
            hint = "set api_key in [llm_client] (e.g. \"${OPENAI_API_KEY}\") and check it is valid and permitted"
            return BackendAuthFailed(f"{where}: {detail}. The backend rejected our credentials: {hint}")
        if status == 429:
            retry_after = _retry_after(headers.get("retry-after"))
            return RateLimited(f"{where}: {detail}", retry_after_s=retry_after)
        if status == 404 and model is not None:
            try:
                available = [m.id for m in await self.list_models()]
            except LloomError:
                available = None
            if available is None or model not in available:
                listing = ", ".join(available) if available else "none could be listed"
                return ModelNotFound(
                    f"model {model!r} is not available on {self.name} (available: {listing}); load it in the backend",
                    available_models=available,
                )
            return BackendError(f"{where} for a listed model: {detail}; is base_url right (does it end in /v1)?")
        if status in (400, 413, 422):
            return InvalidRequest(f"{where}: {detail}")
        if status == 404:
            return BackendError(f"{where}: {detail}; is base_url right (does it end in /v1)?")
        return BackendError(f"{where}: {detail}")

    def _io_error(self, e: TransportError, *, started: bool) -> LloomError:
        if isinstance(e, PoolTimeout):
            # Retryable elsewhere: another executor may have connections to spare.
            return BackendUnavailable(
                f"{self.name}: {e}. Raise [llm_client] max_connections (now {e.max_connections}) if the backend"
                " can take more requests at once, or lower [node] max_concurrent_jobs"
            )
        if isinstance(e, HttpTimeout):
            what = "went silent mid-stream" if started else "did not answer"
            return BackendTimeout(
                f"{self.name} {what} within timeout_secs={self.timeout_secs:g}; the backend may be overloaded,"
                " or raise timeout_secs in [llm_client]"
            )
        if started:
            return StreamInterrupted(f"{self.name} broke the stream mid-way: {e}")
        if isinstance(e, ConnectFailed):
            return BackendUnavailable(f"cannot connect to {self.name}: {e}; {self.preset.start_hint}")
        if isinstance(e, MalformedResponse):
            return BackendProtocolError(f"{self.name} sent a malformed response: {e}")
        if isinstance(e, ConnectionDropped) and e.got_response:
            return BackendProtocolError(f"{self.name} sent a truncated response: {e}")
        return BackendUnavailable(f"{self.name} dropped the connection: {e}")


def from_config(config: LlmClientConfig, session: aiohttp.ClientSession) -> OpenAICompatibleBackend:
    """Factory for the built-in presets (and the `lloom.backends` entry-point signature)."""
    preset = PRESETS.get(config.backend, PRESETS["openai_compatible"])
    base_url = config.base_url or preset.base_url
    if not base_url:
        raise ConfigError(f"[llm_client] backend = {config.backend!r} needs base_url")
    if preset.needs_api_key and not (config.api_key or config.api_key_file):
        raise ConfigError(f"[llm_client] backend = {config.backend!r} needs api_key (e.g. \"${{OPENAI_API_KEY}}\")")
    # The environment is read here, when the backend is built, never at import.
    transport = choose_transport(
        base_url, mode=config.transport, env=os.environ, session=session, max_connections=config.max_connections
    )
    if not isinstance(transport, Http1Transport):
        log.info("backend HTTP through aiohttp", base_url=base_url, transport=transport.name, mode=config.transport)
    return OpenAICompatibleBackend(
        session,
        base_url=base_url,
        api_key=api_key_of(config),
        timeout_secs=config.timeout_secs,
        preset=preset,
        max_connections=config.max_connections,
        transport=transport,
    )


def api_key_of(config: LlmClientConfig) -> str | None:
    """The configured key: `api_key`, or the content of `api_key_file` (ConfigError naming the file)."""
    if not config.api_key_file:
        return config.api_key
    try:
        return read_key_file(config.api_key_file)
    except OSError as e:
        raise ConfigError(f"[llm_client] api_key_file {config.api_key_file!r} cannot be read: {e.strerror}") from e


def _context_length(m: _ModelEntry) -> int | None:
    if m.context_length or m.max_model_len:
        return m.context_length or m.max_model_len
    n = (m.meta or {}).get("n_ctx_train")
    return n if isinstance(n, int) else None


def _error_message(raw: bytes) -> str:
    """The human part of an error body, whichever server dialect sent it."""
    try:
        body = _decode_any(raw)
    except msgspec.DecodeError:
        return _excerpt(raw) or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("code")
        if err:
            return str(err)[:500]
    return _excerpt(raw)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return text + ("..." if len(raw) > limit else "")


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__
