"""What a backend says each of its models can do: tools, vision, json_schema, reasoning.

Some OpenAI-compatible servers describe their models outside the `/v1` API, at the
server's root; `CapabilityProbe` asks the one the preset names, when the model list
is read (`OpenAICompatibleBackend.list_models`), and turns the answer into
`protocol.capabilities.Capability` names:

| server | asked | tools | vision | json_schema | reasoning |
|---|---|---|---|---|---|
| llama.cpp (`llamacpp`, `local`) | `GET /props` | `chat_template_caps.supports_tools` | `modalities.vision` | always (grammar-constrained sampling) | template caps `supports_reasoning_effort`/`supports_preserve_reasoning`, or a template that mentions thinking |
| Ollama | `POST /api/show {"model": id}` per model | `capabilities` has `tools` | has `vision` | has `completion` (structured outputs) | has `thinking` |
| LM Studio | `GET /api/v0/models` | `capabilities` has `tool_use` | `type` is `vlm` | `type` is `llm`/`vlm` | never said |
| vLLM, OpenAI, other | nothing to ask | | | | |

A probe never raises: a server that does not answer, or answers something else,
leaves the model's capabilities unknown (`None`), and the executor then announces
only what `[[models]] features` says (executor/catalog/features.py has the rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import structlog

from executor.backends.transport.base import Timeouts, Transport, TransportError
from executor.backends.transport.http1 import Http1Transport
from protocol.capabilities import Capability

log = structlog.get_logger(logger_name=__name__)

PROBE_TIMEOUT_S = 3.0
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# Words a reasoning model's chat template uses (Qwen3, DeepSeek-R1, gpt-oss ...).
_THINKING_WORDS = ("enable_thinking", "reasoning_content", "<think>")

Detected = dict[str, frozenset[str]]  # model id -> capability names the server says it has


def server_root(base_url: str) -> str:
    """`http://host:port/v1` -> `http://host:port`: where the servers' own APIs live."""
    url = urlsplit(base_url.rstrip("/"))
    path = url.path[: -len("/v1")] if url.path.endswith("/v1") else url.path
    return urlunsplit((url.scheme, url.netloc, path, "", ""))


def from_llama_props(props: object) -> frozenset[str] | None:
    """Capabilities from llama-server's `/props`; None if it is not that shape."""
    if not isinstance(props, dict) or "default_generation_settings" not in props:
        return None
    found = {Capability.JSON_SCHEMA}  # llama-server turns any JSON schema into a grammar
    caps = props.get("chat_template_caps")
    caps = caps if isinstance(caps, dict) else {}
    if caps.get("supports_tools") is True:
        found.add(Capability.TOOLS)
    modalities = props.get("modalities")
    if isinstance(modalities, dict) and modalities.get("vision") is True:
        found.add(Capability.VISION)
    template = props.get("chat_template")
    thinks = isinstance(template, str) and any(w in template for w in _THINKING_WORDS)
    if thinks or caps.get("supports_reasoning_effort") is True or caps.get("supports_preserve_reasoning") is True:
        found.add(Capability.REASONING)
    return frozenset(str(c) for c in found)


_OLLAMA = {"tools": Capability.TOOLS, "vision": Capability.VISION, "thinking": Capability.REASONING,
           "completion": Capability.JSON_SCHEMA}  # fmt: skip


def from_ollama_show(show: object) -> frozenset[str] | None:
    """Capabilities from Ollama's `/api/show`; None if it does not list any (older Ollama)."""
    if not isinstance(show, dict) or not isinstance(show.get("capabilities"), list):
        return None
    return frozenset(str(_OLLAMA[c]) for c in show["capabilities"] if c in _OLLAMA)


def from_lmstudio_models(listing: object) -> Detected:
    """Capabilities per model from LM Studio's `/api/v0/models`."""
    data = listing.get("data") if isinstance(listing, dict) else None
    found: Detected = {}
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        caps: set[Capability] = set()
        if entry.get("type") in ("llm", "vlm"):
            caps.add(Capability.JSON_SCHEMA)
        if entry.get("type") == "vlm":
            caps.add(Capability.VISION)
        if "tool_use" in (entry.get("capabilities") or []):
            caps.add(Capability.TOOLS)
        found[entry["id"]] = frozenset(str(c) for c in caps)
    return found


class CapabilityProbe:
    """Asks one server (at the root of `base_url`) what its models can do; see the module docstring.

    Owns a small HTTP/1.1 pool of its own (the backend's transport is bound to `/v1`);
    the backend closes it in `aclose()`."""

    KINDS = ("llamacpp", "ollama", "lmstudio")

    def __init__(self, kind: str, base_url: str, *, transport: Transport | None = None,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:  # fmt: skip
        if kind not in self.KINDS:
            raise ValueError(f"no capability probe for {kind!r}")
        self.kind = kind
        self._http = transport or Http1Transport(server_root(base_url), max_connections=2)
        self._timeouts = Timeouts(connect=timeout_s, acquire=timeout_s, total=timeout_s, idle_read=timeout_s)
        self.set_headers({})

    @classmethod
    def for_preset(cls, preset_name: str, base_url: str) -> CapabilityProbe | None:
        return cls(preset_name, base_url) if preset_name in cls.KINDS else None

    def set_headers(self, headers: Mapping[str, str]) -> None:
        """The backend's headers (its API key), for servers that guard these endpoints too."""
        base = {**headers, "Accept": "application/json"}
        self._props = self._http.endpoint("GET", "/props", base)
        self._show = self._http.endpoint("POST", "/api/show", {**base, "Content-Type": "application/json"})
        self._lms = self._http.endpoint("GET", "/api/v0/models", base)

    async def detect(self, model_ids: list[str]) -> Detected:
        """Capabilities of each of `model_ids` the server describes; {} when it says nothing."""
        try:
            if self.kind == "llamacpp":
                caps = from_llama_props(await self._get(self._props, b""))
                return {} if caps is None else dict.fromkeys(model_ids, caps)  # one model per server
            if self.kind == "lmstudio":
                return from_lmstudio_models(await self._get(self._lms, b""))
            shown = await asyncio.gather(*(self._show_one(m) for m in model_ids))
            return {m: c for m, c in zip(model_ids, shown, strict=True) if c is not None}
        except _NoAnswer as e:
            log.debug("capability probe got no answer", kind=self.kind, error=str(e))
            return {}

    async def _show_one(self, model: str) -> frozenset[str] | None:
        try:  # one model Ollama cannot describe leaves only that one unknown
            return from_ollama_show(await self._get(self._show, _encode({"model": model})))
        except _NoAnswer:
            return None

    async def _get(self, endpoint: Any, body: bytes) -> object:
        try:
            resp = await self._http.request(endpoint, body, self._timeouts)
        except TransportError as e:
            raise _NoAnswer(str(e) or type(e).__name__) from e
        if resp.status != 200:
            raise _NoAnswer(f"HTTP {resp.status}")
        try:
            return _decode(resp.body)
        except msgspec.DecodeError as e:
            raise _NoAnswer(f"not JSON: {e}") from e

    async def aclose(self) -> None:
        await self._http.aclose()


class _NoAnswer(Exception):
    """The server said nothing usable: the capabilities stay unknown."""
