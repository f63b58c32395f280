"""What a model can do beyond plain chat, and which of it a request needs.

Executors announce each model's capabilities (in `ModelOffer.features`); the client
sends a request only to executors whose offer has every capability the request
needs (as OpenRouter routes by supported parameters), and an executor refuses a
request its model cannot serve with `UnsupportedFeature` before calling its backend.
"""

from __future__ import annotations

import enum

from protocol.chat_types import ImagePart, JsonObjectFormat, JsonSchemaFormat
from protocol.messages import ChatRequest


class Capability(enum.StrEnum):
    TOOLS = "tools"  # function calling: tools, tool_choice, tool_calls in answers
    VISION = "vision"  # image_url content parts
    JSON_SCHEMA = "json_schema"  # response_format json_schema / json_object (constrained output)
    REASONING = "reasoning"  # reasoning_content kept apart from the answer; reasoning_effort


def required_capabilities(request: ChatRequest) -> frozenset[Capability]:
    """The capabilities `request` needs from the model that serves it."""
    needed: set[Capability] = set()
    if request.tools and request.tool_choice != "none":
        needed.add(Capability.TOOLS)
    if isinstance(request.response_format, JsonSchemaFormat | JsonObjectFormat):
        needed.add(Capability.JSON_SCHEMA)
    if request.reasoning_effort is not None:
        needed.add(Capability.REASONING)
    for message in request.messages:
        if isinstance(message.content, list) and any(isinstance(p, ImagePart) for p in message.content):
            needed.add(Capability.VISION)
            break
    return frozenset(needed)
