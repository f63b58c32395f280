"""The requests tests send, with defaults the OpenAI test double answers, and ways of sending them."""

from __future__ import annotations

from protocol.client import LloomClient
from protocol.messages import ChatRequest, Message, Role
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.wait import within

# The model the conftest double lists first and every node serves by default.
MODEL = "double-model"


def ask(model: str = MODEL, text: str = "say something short", **kw: object) -> ChatRequest:
    """A one-message chat request; `kw` are any other ChatRequest fields."""
    return ChatRequest(model=model, messages=[Message(Role.USER, text)], **kw)  # type: ignore[arg-type]


async def leave_a_long_stream_early(client: LloomClient, double: OpenAIDouble, *, after_seq: int = 2) -> None:
    """Stream a slow 1000-token answer, leave after chunk `after_seq`, and return once the executor
    has hung up on the backend (what a caller who stops reading causes)."""
    double.completion_tokens = 1000
    double.fault = Fault.slow(0.01)  # slow enough that the answer is far from done when the caller leaves
    async with client.stream(ask()) as stream:
        async for chunk in stream:
            if chunk.seq == after_seq:
                break
    await within(double.disconnected.wait(), "the executor hung up on the backend")
