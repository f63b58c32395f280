"""Wire messages of protocol v1 as msgspec Structs, with their encoders and decoders.

A job is a `ChatRequest` published to a model's subject with a reply subject.
A unary job is answered by one `ChatResponse` or `ErrorReply`; a streamed job by
`StreamChunk`s in order, then exactly one `StreamEnd` or `ErrorReply`, then an
empty sentinel message (NATS ADR-47 request-many), so generic NATS tools know
the stream is over. Replies are a tagged union on the `type` field.

Inbound messages reject unknown fields: a typo in a request is an error, not a
silently ignored option. Decoders and encoders are built once, here.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec
from msgspec import Meta

from protocol.chat_types import (
    MAX_TOOLS,
    ContentPart,
    ReasoningEffort,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallId,
    ToolChoice,
)
from protocol.errors import ERROR_TYPES, ErrorCode, LloomError
from protocol.receipts import SignedReceipt
from protocol.subjects import MAX_MODEL_NAME
# Far above any real model's output; a larger value is a bug or an attack.
MAX_TOKENS_LIMIT = 1_000_000
# OpenAI's own limit on inputs per embeddings request.
MAX_EMBEDDING_INPUTS = 2048


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"  # a tool's result, answering the assistant's call `tool_call_id`
    DEVELOPER = "developer"  # OpenAI's newer name for system instructions


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"
    # The job ended before the model did: the caller cancelled or went away.
    CANCELLED = "cancelled"
    # A backend reported a reason this protocol does not know.
    OTHER = "other"


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One turn of a conversation. `content` is text or a list of parts (text, images);
    an assistant turn that called tools has `tool_calls` and may have no content; a
    `tool` turn answers one call and names it in `tool_call_id`. The rules between
    fields (which role may carry what) are checked by `protocol.chat_checks`."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: Annotated[str, Meta(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Meta(min_length=1)] | None = None
    tool_call_id: ToolCallId | None = None


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The normalized request every backend receives (the seed's `LlmRequest`)."""

    model: Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_NAME)]
    messages: Annotated[list[Message], Meta(min_length=1, max_length=4096)]
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: Annotated[list[str], Meta(max_length=4)] | None = None
    stream: bool = False
    # Whether an executor may answer from its response cache: by default only at
    # temperature 0; true opts in, false opts out. Never sent to a backend.
    cache: bool | None = None
    # OpenAI's newer name for max_tokens (reasoning models count their reasoning in it);
    # a request gives one or the other, and each backend gets the name it expects.
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    # -- tools (function calling)
    tools: Annotated[list[Tool], Meta(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # -- structured output
    response_format: ResponseFormat | None = None
    # -- sampling and output options, as OpenAI defines them
    seed: int | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    # token id (as a string, JSON object keys are strings) -> bias
    logit_bias: Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=1024)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    # More than one choice is not served: n > 1 is refused with unsupported_feature (protocol/chat_checks.py).
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    reasoning_effort: ReasoningEffort | None = None


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # True when a count was estimated by the executor rather than reported by the
    # backend (no usage reported; or tool definitions and images, which only the
    # backend can count exactly).
    estimated: bool = False
    # Of completion_tokens, those the model spent reasoning (OpenAI's
    # completion_tokens_details.reasoning_tokens), where the backend reports it.
    reasoning_tokens: int = 0


class ChatResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="response", tag_field="type"):
    """The normalized result of a unary job (the seed's `LlmResponse`)."""

    job_id: str
    executor_id: str
    model: str
    content: str
    finish_reason: FinishReason
    usage: Usage
    receipt: SignedReceipt | None = None
    # Set when the executor served the job differently from what was asked (another
    # model, fewer max_tokens) because nothing could serve it as asked.
    degraded: str | None = None
    cached: bool = False  # answered from the executor's response cache
    # The calls the model asked for (finish_reason tool_calls).
    tool_calls: list[ToolCall] | None = None
    # The model's reasoning, apart from its answer (vLLM, llama.cpp, DeepSeek: reasoning_content).
    reasoning_content: str | None = None
    logprobs: list[TokenLogprob] | None = None


class StreamChunk(msgspec.Struct, frozen=True, omit_defaults=True, tag="chunk", tag_field="type"):
    """One piece of the answer; `seq` counts from 0 so a gap is detectable. `delta` is
    answer text (empty when the piece is only reasoning or tool calls); `reasoning` is
    reasoning text, kept apart from the answer; `tool_calls` are pieces of tool calls."""

    seq: int
    delta: str
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    logprobs: list[TokenLogprob] | None = None


class StreamEnd(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="end", tag_field="type"):
    """The last data message of a stream."""

    job_id: str
    executor_id: str
    model: str
    finish_reason: FinishReason
    usage: Usage
    chunks: int
    receipt: SignedReceipt | None = None
    degraded: str | None = None
    cached: bool = False


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="error", tag_field="type"):
    # A plain string so that a code added by a newer peer still decodes (as internal).
    code: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None
    available_models: list[str] | None = None
    job_id: str | None = None
    executor_id: str | None = None
    # For a stream that ended early: the receipt for what was produced.
    receipt: SignedReceipt | None = None


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Vectors for one or more texts (OpenAI's /v1/embeddings). Executors coalesce
    concurrent requests for the same model into one backend call (see executor/batching/coalescer.py)."""

    model: Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_NAME)]
    input: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    dimensions: Annotated[int, Meta(ge=1, le=65_536)] | None = None


class EmbeddingResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="embeddings",
                        tag_field="type"):  # fmt: skip
    job_id: str
    executor_id: str
    model: str
    embeddings: list[list[float]]  # one per input, in order
    usage: Usage  # prompt tokens only; this job's share when its backend call was shared
    receipt: SignedReceipt | None = None
    # How many jobs shared the backend call that served this one (1: it went alone).
    batched_with: int = 1


class TextRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A legacy text completion (OpenAI's /v1/completions): one prompt, no chat template.
    Executors coalesce concurrent requests with the same model and parameters into one
    backend call with a prompt array (see executor/batching/coalescer.py)."""

    model: Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_NAME)]
    prompt: Annotated[str, Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: Annotated[list[str], Meta(max_length=4)] | None = None


class TextResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="text", tag_field="type"):
    job_id: str
    executor_id: str
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage  # this job's share when its backend call was shared
    receipt: SignedReceipt | None = None
    batched_with: int = 1


UnaryReply = ChatResponse | ErrorReply
EmbeddingReply = EmbeddingResponse | ErrorReply
TextReply = TextResponse | ErrorReply
StreamReply = StreamChunk | StreamEnd | ErrorReply

request_decoder = msgspec.json.Decoder(ChatRequest)
unary_reply_decoder = msgspec.json.Decoder(UnaryReply)
embedding_request_decoder = msgspec.json.Decoder(EmbeddingRequest)
embedding_reply_decoder = msgspec.json.Decoder(EmbeddingReply)
text_request_decoder = msgspec.json.Decoder(TextRequest)
text_reply_decoder = msgspec.json.Decoder(TextReply)
stream_reply_decoder = msgspec.json.Decoder(StreamReply)
encoder = msgspec.json.Encoder()


def error_to_wire(err: LloomError, *, job_id: str | None = None, executor_id: str | None = None) -> ErrorReply:
    return ErrorReply(
        code=err.code.value,
        message=err.message,
        retryable=err.retryable,
        retry_after_s=err.retry_after_s,
        available_models=err.available_models,
        job_id=job_id,
        executor_id=executor_id,
    )


def error_from_wire(reply: ErrorReply) -> LloomError:
    """The exception a caller sees for `reply`: the same type the executor raised."""
    code = ErrorCode(reply.code) if reply.code in _KNOWN_CODES else ErrorCode.INTERNAL
    err = ERROR_TYPES[code](
        reply.message,
        retry_after_s=reply.retry_after_s,
        available_models=reply.available_models,
        job_id=reply.job_id,
        executor_id=reply.executor_id,
    )
    err.receipt = reply.receipt
    return err


_KNOWN_CODES = frozenset(c.value for c in ErrorCode)
