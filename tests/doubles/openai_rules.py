"""What api.openai.com refuses, for the OpenAI test double: unknown top-level arguments
(`Unrecognized request argument supplied: cache`) on /v1/chat/completions,
/v1/completions and /v1/embeddings, and malformed messages, content parts, tools,
tool_choice and response_format on chat completions. Each check raises `Refused`
with OpenAI's message; the double answers it with OpenAI's error body (400,
`invalid_request_error`). Standard library only, like the double.
"""

from __future__ import annotations

import re
from typing import Any

# The top-level arguments OpenAI documents for each endpoint (as of its 2025 API reference).
CHAT_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})  # fmt: skip
COMPLETION_FIELDS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
})  # fmt: skip
EMBEDDING_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    for key in body:
        if key not in known:
            raise Refused(f"Unrecognized request argument supplied: {key}")


def check_chat(body: dict[str, Any]) -> None:
    """Everything the double checks on a chat completion besides the model and max_tokens."""
    check_fields(body, CHAT_FIELDS)
    for i, m in enumerate(body.get("messages") or ()):
        _check_message(i, m)
    tools = body.get("tools")
    names = _check_tools(tools) if tools is not None else set()
    _check_tool_choice(body.get("tool_choice"), tools, names)
    if "response_format" in body:
        _check_response_format(body["response_format"])
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise Refused("Invalid value for 'top_logprobs': 'logprobs' must be set to true.")


def _check_message(i: int, m: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise Refused(f"Invalid type for '{where}': expected an object.")
    role = m.get("role")
    if role not in _ROLES:
        raise Refused(f"Invalid value: '{role}'. Supported values are: {', '.join(repr(r) for r in _ROLES)}.")
    content = m.get("content")
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise Refused(f"Missing required parameter: '{where}.tool_call_id'.")
    if role in ("system", "developer", "user", "tool") and content is None:
        raise Refused(f"Missing required parameter: '{where}.content'.")
    if role == "assistant" and content is None and not m.get("tool_calls"):
        raise Refused(f"Invalid value for '{where}': an assistant message needs content or tool_calls.")
    if isinstance(content, list):
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _PART_TYPES:
                raise Refused(f"Invalid value: '{kind}'. Supported values are: "
                              f"{', '.join(repr(t) for t in _PART_TYPES)}.")  # fmt: skip
            if kind == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/")):
                    raise Refused(f"Invalid 'messages[{i}].content[{k}].image_url.url': expected a URL or a data URL.")
    elif content is not None and not isinstance(content, str):
        raise Refused(f"Invalid type for '{where}.content': expected one of a string or array of objects.")
    for j, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if call.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
            raise Refused(f"Invalid value for '{where}.tool_calls[{j}]'.")


def _check_tools(tools: Any) -> set[str]:
    if not isinstance(tools, list):
        raise Refused("Invalid type for 'tools': expected an array.")
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise Refused(f"Invalid value for 'tools[{i}].type': expected 'function'.")
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise Refused(f"Invalid 'tools[{i}].function.name': string does not match pattern. Expected a string"
                          " that matches the pattern '^[a-zA-Z0-9_-]+$'.")  # fmt: skip
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type") != "object"):
            got = params.get("type") if isinstance(params, dict) else type(params).__name__
            raise Refused(f"Invalid schema for function '{name}': schema must be a JSON Schema of 'type: \"object\"',"
                          f" got 'type: \"{got}\"'.")  # fmt: skip
        names.add(name)
    return names


def _check_tool_choice(choice: Any, tools: Any, names: set[str]) -> None:
    if choice is None:
        return
    if tools is None:
        raise Refused("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.")
    if choice in ("none", "auto", "required"):
        return
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise Refused("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a named function.")
    if fn["name"] not in names:
        raise Refused(f"Invalid value for 'tool_choice': function '{fn['name']}' is not one of the tools.")


def _check_response_format(fmt: Any) -> None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise Refused(f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object' and 'json_schema'.")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise Refused("Missing required parameter: 'response_format.json_schema.name'.")
        if "schema" in spec and not isinstance(spec["schema"], dict):
            raise Refused("Invalid type for 'response_format.json_schema.schema': expected an object.")
