"""Server-Sent Events for streamed chat: `data: {chat.completion.chunk}` lines, then `data: [DONE]`.

Plain text chunks (by far the most) take a fast path: the JSON around the delta is the
same for every chunk of a stream, so it is encoded once and each chunk costs one string
encode and two concatenations. Chunks with reasoning, tool calls or log probabilities
are encoded from their Structs.
"""

from __future__ import annotations

import time

from executor.gateway.openai_types import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    ErrorBody,
    LogprobsOut,
    UsageOut,
    encoder,
    logprobs_out,
)
from protocol.messages import StreamChunk

DONE = b"data: [DONE]\n\n"
_encode = encoder.encode


class ChunkWriter:
    """Encodes the chunks of one stream (one id, model and creation time)."""

    __slots__ = ("id", "model", "created", "_head", "_tail")

    def __init__(self, job_id: str, model: str) -> None:
        self.id = job_id
        self.model = model
        self.created = int(time.time())
        # `data: {"id":...,"choices":[{"delta":{"content":` + delta + `},"finish_reason":null,"index":0}]...}`
        probe = _encode(self._chunk(Delta(content="\x00")))
        head, tail = probe.split(b'"\\u0000"', 1)
        self._head = b"data: " + head
        self._tail = tail + b"\n\n"

    def _chunk(self, delta: Delta, finish: str | None = None, usage: UsageOut | None = None,
               logprobs: LogprobsOut | None = None, provider: str | None = None,
               choices: bool = True) -> ChatCompletionChunk:  # fmt: skip
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else [],
            usage=usage, provider=provider,
        )  # fmt: skip

    def role(self) -> bytes:
        """The first event: the assistant's role, as OpenAI sends it."""
        return b"data: " + _encode(self._chunk(Delta(role="assistant", content=""))) + b"\n\n"

    def chunk(self, c: StreamChunk) -> bytes:
        if c.reasoning is None and c.tool_calls is None and c.logprobs is None:
            return self._head + _encode(c.delta) + self._tail
        delta = Delta(content=c.delta or None, reasoning_content=c.reasoning, tool_calls=c.tool_calls)
        logprobs = logprobs_out(c.logprobs)
        return b"data: " + _encode(self._chunk(delta, logprobs=logprobs)) + b"\n\n"

    def finish(self, reason: str, provider: str) -> bytes:
        return b"data: " + _encode(self._chunk(Delta(), finish=reason, provider=provider)) + b"\n\n"

    def usage(self, usage: UsageOut) -> bytes:
        """`stream_options.include_usage`: a last chunk with no choices and the usage."""
        return b"data: " + _encode(self._chunk(Delta(), usage=usage, choices=False)) + b"\n\n"


def error_event(body: ErrorBody) -> bytes:
    """An error after the stream began: the SDKs raise it when they read an `error` object."""
    return b"data: " + _encode(body) + b"\n\n"
