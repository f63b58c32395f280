"""The rules between a chat request's fields that its types cannot say, checked in one place.

`check_chat_request` raises `InvalidRequest` naming the field (and the message index)
for a request no backend should see: a `tool` message without `tool_call_id`, a
function whose `parameters` are not a JSON-schema object, `tool_choice` naming a
function not in `tools`, an image that is neither a data: nor an http(s) URL, and so
on; and `UnsupportedFeature` for `n > 1`, which no executor serves. The client runs it
before publishing (a bad request fails at once, locally) and the executor again at
admission (a peer that skipped it gets the same typed error on the wire).
"""

from __future__ import annotations

import re

from protocol.chat_types import ImagePart, JsonSchemaFormat, NamedToolChoice
from protocol.errors import InvalidRequest, UnsupportedFeature
from protocol.messages import ChatRequest, Message, Role

# What OpenAI accepts inline: a base64 image of a common type (`data:image/png;base64,...`).
_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|gif|webp);base64,[A-Za-z0-9+/=\s]+\Z")
_HTTP_URL = re.compile(r"https?://[^\s/?#]+\S*\Z", re.IGNORECASE)
_CONTENT_REQUIRED = (Role.USER, Role.SYSTEM, Role.DEVELOPER, Role.TOOL)
_TEXT_ONLY = (Role.SYSTEM, Role.DEVELOPER, Role.TOOL, Role.ASSISTANT)


def check_chat_request(req: ChatRequest) -> None:
    """Raise `InvalidRequest` (or `UnsupportedFeature`) for the first broken rule; see the module docstring."""
    if req.n is not None and req.n > 1:
        raise UnsupportedFeature(f"n={req.n}: n>1 is not served; send n requests (each may go to another executor)")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise InvalidRequest("max_tokens and max_completion_tokens are both set: give one of them")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    if req.logit_bias is not None:
        for token in req.logit_bias:
            if not token.isdigit():
                raise InvalidRequest(f"logit_bias: key {token!r} is not a token id (a decimal integer as a string)")
    if req.tools is not None or req.tool_choice is not None or req.parallel_tool_calls is not None:
        _check_tools(req)
    if isinstance(req.response_format, JsonSchemaFormat) and not isinstance(req.response_format.json_schema.schema_,
                                                                            dict):  # fmt: skip
        raise InvalidRequest("response_format.json_schema.schema: a JSON schema object is required")
    for i, m in enumerate(req.messages):
        # A plain text turn (most of them) has nothing more to check: no call per message on the hot path.
        if type(m.content) is not str or m.tool_calls is not None or m.tool_call_id is not None or m.role is Role.TOOL:
            _check_message(i, m)


def _check_tools(req: ChatRequest) -> None:
    names: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        fn = tool.function
        where = f"tools[{i}].function"
        if fn.name in names:
            raise InvalidRequest(f"{where}.name: {fn.name!r} is defined twice")
        names.add(fn.name)
        if fn.parameters is not None and fn.parameters.get("type") != "object":
            raise InvalidRequest(
                f"{where}.parameters: must be a JSON schema of type \"object\""
                f" (got type {fn.parameters.get('type')!r}), e.g. {{\"type\": \"object\", \"properties\": {{...}}}}"
            )
    if req.tools is None:
        if req.tool_choice is not None:
            raise InvalidRequest("tool_choice is set but tools is not: give the tools it chooses from")
        if req.parallel_tool_calls is not None:
            raise InvalidRequest("parallel_tool_calls is set but tools is not")
        return
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice.function.name: {choice.function.name!r} is not one of the tools ({', '.join(sorted(names))})"
        )


def _check_message(i: int, m: Message) -> None:
    where = f"messages[{i}]"
    if m.content is None and m.role in _CONTENT_REQUIRED:
        raise InvalidRequest(f"{where}: a {m.role.value} message needs content")
    if m.role is Role.ASSISTANT and m.content is None and not m.tool_calls:
        raise InvalidRequest(f"{where}: an assistant message needs content or tool_calls")
    if m.role is Role.TOOL and m.tool_call_id is None:
        raise InvalidRequest(f"{where}.tool_call_id: a tool message must name the call it answers")
    if m.role is not Role.TOOL and m.tool_call_id is not None:
        raise InvalidRequest(f"{where}.tool_call_id: only tool messages answer a call")
    if m.role is not Role.ASSISTANT and m.tool_calls is not None:
        raise InvalidRequest(f"{where}.tool_calls: only assistant messages carry tool calls")
    if isinstance(m.content, list):
        if not m.content:
            raise InvalidRequest(f"{where}.content: an empty list of parts")
        for k, part in enumerate(m.content):
            if isinstance(part, ImagePart):
                if m.role in _TEXT_ONLY:
                    raise InvalidRequest(f"{where}.content[{k}]: image parts are for user messages, not {m.role.value}")
                _check_image_url(f"{where}.content[{k}].image_url.url", part.image_url.url)


def _check_image_url(where: str, url: str) -> None:
    if url[:5].lower() == "data:":
        if not _DATA_URL.match(url):
            raise InvalidRequest(
                f"{where}: a data URL must be a base64 image (data:image/png|jpeg|gif|webp;base64,...)"
            )
        return
    if not _HTTP_URL.match(url):
        shown = url if len(url) <= 60 else url[:60] + "..."
        raise InvalidRequest(f"{where}: {shown!r} is neither an http(s) URL nor a data: URL of an image")
