"""Known OpenAI-compatible servers: where they listen and how to start them.

A preset fills in `base_url` when the config leaves it out, says whether an API
key is expected, and gives the hint an operator needs when the server is not
reachable. The order of `PRESETS` is the probing order of `backend = "auto"`.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Preset(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    base_url: str | None
    needs_api_key: bool = False
    start_hint: str
    # Local servers are probed by `backend = "auto"`; remote ones never are.
    local: bool = True
    # The name the server takes for the output token limit: OpenAI deprecated `max_tokens`
    # for `max_completion_tokens` (its reasoning models refuse the old name); local servers
    # know only `max_tokens`. A request's limit, whichever name it used, goes under this one.
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="lmstudio",
            base_url="http://localhost:1234/v1",
            start_hint="start LM Studio's local server (Developer tab > Start Server, or `lms server start`)"
            " and load a model",
        ),
        Preset(
            name="ollama",
            base_url="http://localhost:11434/v1",
            start_hint="start Ollama with `ollama serve` and pull a model (`ollama pull qwen2.5:0.5b`)",
        ),
        Preset(
            name="vllm",
            base_url="http://localhost:8000/v1",
            start_hint="start vLLM with `vllm serve <model>`",
        ),
        Preset(
            name="llamacpp",
            base_url="http://localhost:8080/v1",
            start_hint="start llama.cpp's server with `llama-server -m <model.gguf>`",
        ),
        Preset(
            name="openai",
            base_url="https://api.openai.com/v1",
            needs_api_key=True,
            token_limit_field="max_completion_tokens",
            start_hint="check network access to the API and that api_key is set (e.g. api_key = \"${OPENAI_API_KEY}\")",
            local=False,
        ),
        Preset(
            name="openai_compatible",
            base_url=None,
            start_hint="start the server named by base_url",
            local=False,
        ),
    )
}
