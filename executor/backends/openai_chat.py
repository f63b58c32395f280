"""OpenAI's chat wire format as a backend speaks it: the request body we send, and the
answers and stream events we read back.

`chat_body` is the one place a `ChatRequest` becomes the body of `POST /chat/completions`,
for unary and streamed calls alike: OpenAI's own field names, nothing lloom-only (`cache`
is the executor's business), no null fields, `stream`/`stream_options` only for streams,
the output token limit under the name the preset's server takes (`max_tokens` or
`max_completion_tokens`), and never `n` (more than one choice is refused before any
backend call, `protocol.chat_checks`).

Answers are decoded with typed decoders built once. Servers name the reasoning text
`reasoning_content` (vLLM, llama.cpp, DeepSeek) or `reasoning` (some newer servers);
either is read. Tool calls in a stream come as pieces keyed by `index` (parallel calls
may interleave); they are relayed as they come, never assembled here.
"""

from __future__ import annotations

import re

import msgspec

from executor.backends.base import Delta
from executor.backends.presets import Preset
from protocol.chat_types import (
    FunctionCall,
    FunctionCallDelta,
    ReasoningEffort,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from protocol.estimate import estimate_prompt_tokens, estimate_tokens
from protocol.messages import ChatRequest, Message, Usage

# -- what we send ----------------------------------------------------------------


class _StreamOptions(msgspec.Struct):
    include_usage: bool = True


_STREAM_OPTIONS = _StreamOptions()


class _ChatBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of `POST /chat/completions`, in OpenAI's field names; None fields are left out."""

    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    reasoning_effort: ReasoningEffort | None = None


_encode = msgspec.json.Encoder().encode


def chat_body(request: ChatRequest, preset: Preset, *, stream: bool) -> bytes:
    """The JSON body for `request` on a server of `preset`; see the module docstring."""
    limit = request.max_completion_tokens or request.max_tokens
    completion_limit = preset.token_limit_field == "max_completion_tokens"
    return _encode(
        _ChatBody(
            model=request.model,
            messages=request.messages,
            stream=stream,
            stream_options=_STREAM_OPTIONS if stream else None,
            max_tokens=None if completion_limit else limit,
            max_completion_tokens=limit if completion_limit else None,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            tools=request.tools,
            tool_choice=request.tool_choice,
            parallel_tool_calls=request.parallel_tool_calls,
            response_format=request.response_format,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=request.logit_bias,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            user=request.user,
            reasoning_effort=request.reasoning_effort,
        )
    )


# -- what we read ----------------------------------------------------------------


class _Details(msgspec.Struct):
    reasoning_tokens: int = 0


class WireUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: _Details | None = None


class ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: str | int | None = None


class _Function(msgspec.Struct):
    name: str = ""
    arguments: str = ""


class _ToolCall(msgspec.Struct):
    # Servers add fields of their own (an `index` in unary answers): read what OpenAI defines.
    id: str = ""
    function: _Function = msgspec.field(default_factory=_Function)


class _Logprobs(msgspec.Struct):
    content: list[TokenLogprob] | None = None


class _ChoiceMessage(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    message: _ChoiceMessage
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class WireResponse(msgspec.Struct):
    choices: list[_Choice]
    model: str = ""
    usage: WireUsage | None = None


class _DeltaFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallPiece(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: _DeltaFunction | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallPiece] | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class WireChunk(msgspec.Struct):
    choices: list[_ChunkChoice] = []
    model: str = ""
    usage: WireUsage | None = None
    # vLLM and OpenAI report a failure inside a started stream this way.
    error: ErrorBody | None = None


decode_response = msgspec.json.Decoder(WireResponse).decode
decode_chunk = msgspec.json.Decoder(WireChunk).decode


_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}\Z")


def tool_calls_of(message: _ChoiceMessage) -> list[ToolCall] | None:
    """The calls of a unary answer as the wire carries them. A call without an id gets one
    (`call_<n>`: the caller must be able to answer it); a function name the wire would refuse
    (the model wrote it, the backend did not check it) raises ValueError."""
    if not message.tool_calls:
        return None
    calls = []
    for n, c in enumerate(message.tool_calls):
        if not _FUNCTION_NAME.match(c.function.name):
            raise ValueError(f"a tool call names the function {c.function.name[:80]!r}, not a valid function name")
        calls.append(ToolCall(id=c.id[:256] or f"call_{n}",
                              function=FunctionCall(name=c.function.name, arguments=c.function.arguments)))  # fmt: skip
    return calls


def delta_of(choice: _ChunkChoice) -> Delta | None:
    """The event one stream choice carries, or None when it carries nothing (a role-only or final piece)."""
    d = choice.delta
    if d.tool_calls is None and d.reasoning_content is None and d.reasoning is None and choice.logprobs is None:
        return Delta(d.content) if d.content else None  # the plain text path: nothing more to build
    reasoning = d.reasoning_content or d.reasoning
    logprobs = choice.logprobs.content if choice.logprobs is not None else None
    pieces = None
    if d.tool_calls:
        pieces = [
            ToolCallDelta(
                index=p.index, id=p.id, type="function" if p.id else None,
                function=None if p.function is None else FunctionCallDelta(p.function.name, p.function.arguments),
            )
            for p in d.tool_calls
        ]  # fmt: skip
    if not (d.content or reasoning or pieces or logprobs):
        return None
    return Delta(d.content or "", reasoning or None, pieces, logprobs or None)


def usage_of(u: WireUsage | None, request: ChatRequest, content: str, chunks: int | None = None) -> Usage:
    """The backend's usage; without one, the executor's estimate (marked `estimated`)."""
    if u is None:
        prompt = estimate_prompt_tokens(request)
        completion = estimate_tokens(content) if chunks is None else chunks
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     estimated=True)  # fmt: skip
    total = u.total_tokens or u.prompt_tokens + u.completion_tokens
    reasoning = u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details is not None else 0
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=total,
                 reasoning_tokens=reasoning)  # fmt: skip
