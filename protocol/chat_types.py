"""The parts of OpenAI's chat API beyond plain text, as wire Structs: content parts
(text and images), tools and tool calls, structured-output formats, log
probabilities and streamed tool-call deltas.

Field names and shapes are OpenAI's own, so a peer that speaks the OpenAI API (the
HTTP gateway, an SDK user) maps them one to one and a backend receives them as it
expects. Inbound structs forbid unknown fields, like every request struct of the
protocol. Limits that depend on the bus (an image must fit NATS max_payload) are
checked where the payload size is known, not here.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# OpenAI's rule for function names.
FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# A tool call id is chosen by the backend (OpenAI: "call_..."), echoed back by the caller.
ToolCallId = Annotated[str, Meta(min_length=1, max_length=256)]
MAX_TOOLS = 128  # OpenAI's limit on `tools` per request


class _Inbound(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


# -- content parts -------------------------------------------------------------


class ImageDetail(enum.StrEnum):
    AUTO = "auto"
    LOW = "low"
    HIGH = "high"


class ImageUrl(_Inbound):
    # A data: URL (base64 image bytes) or an http(s) URL the backend fetches; executors never fetch it.
    url: Annotated[str, Meta(min_length=1)]
    detail: ImageDetail | None = None


class TextPart(_Inbound, tag="text", tag_field="type"):
    text: str


class ImagePart(_Inbound, tag="image_url", tag_field="type"):
    image_url: ImageUrl


ContentPart = TextPart | ImagePart


# -- tools ---------------------------------------------------------------------


class FunctionDefinition(_Inbound):
    name: FunctionName
    description: str | None = None
    # A JSON Schema of type "object" (checked by `protocol.chat_checks`).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Inbound, tag="function", tag_field="type"):
    function: FunctionDefinition


class ToolChoiceFunction(_Inbound):
    name: FunctionName


class NamedToolChoice(_Inbound, tag="function", tag_field="type"):
    """`tool_choice` naming the one function the model must call."""

    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Inbound):
    name: FunctionName
    # JSON text, as the model wrote it (it may not parse: the caller decides what to do then).
    arguments: str


class ToolCall(_Inbound, tag="function", tag_field="type"):
    """A call the assistant asked for (in a response, and echoed in the next request's history)."""

    id: ToolCallId
    function: FunctionCall


# -- structured output ---------------------------------------------------------


class JsonSchema(_Inbound):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    # msgspec would take the key `schema` fine; the attribute is renamed only to keep
    # it from reading like a method.
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class TextFormat(_Inbound, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(_Inbound, tag="json_object", tag_field="type"):
    pass


class JsonSchemaFormat(_Inbound, tag="json_schema", tag_field="type"):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class ReasoningEffort(enum.StrEnum):
    MINIMAL = "minimal"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


# -- what comes back -----------------------------------------------------------


class TopLogprob(msgspec.Struct, frozen=True, omit_defaults=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, frozen=True, omit_defaults=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class FunctionCallDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None  # a fragment; the fragments of one call concatenate to its arguments


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A piece of a streamed tool call. `index` says which call of the answer it belongs to:
    parallel calls may interleave. The first piece of a call carries `id` and the name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None
