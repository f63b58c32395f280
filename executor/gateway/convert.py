"""OpenAI's HTTP bodies <-> the protocol's messages, both ways.

`decode_*` turns request bytes into the body Struct (a bad body is `BadRequestBody`
naming the offending parameter, as api.openai.com does); `chat_request` builds the
`ChatRequest` an executor receives (the gateway-only fields left behind); the
`*_response` functions build OpenAI's response Structs from a reply. Field by field,
written out: a new `ChatRequest` field shows up in `tests/test_gateway_convert.py`
until it is mapped here.
"""

from __future__ import annotations

import array
import base64
import re
import sys
import time

import msgspec

from executor.gateway.errors import BadRequestBody
from executor.gateway.openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionBody,
    Choice,
    CompletionBody,
    CompletionTokensDetails,
    EmbeddingBody,
    EmbeddingItem,
    EmbeddingList,
    EmbeddingUsage,
    logprobs_out,
    TextChoice,
    TextCompletion,
    UsageOut,
    chat_body_decoder,
    completion_body_decoder,
    embedding_body_decoder,
)
from protocol.messages import ChatRequest, ChatResponse, EmbeddingResponse, TextResponse, Usage
from protocol.receipts import SignedReceipt

assert sys.byteorder == "little", "base64 embeddings are little-endian float32"
_AT = re.compile(r"at `\$\.?([^`]*)`")
TOO_DEEP = "the request body is nested too deeply"
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _bad_body(err: msgspec.MsgspecError) -> BadRequestBody:
    text = str(err)
    if isinstance(err, msgspec.DecodeError) and not isinstance(err, msgspec.ValidationError):
        return BadRequestBody(f"the request body is not valid JSON: {text}")
    unknown = _UNKNOWN.search(text)
    at = _AT.search(text)
    where = at.group(1) if at else ""
    if unknown:
        param = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return BadRequestBody(f"Unrecognized request argument supplied: {param}", param=param)
    return BadRequestBody(f"invalid request: {text}", param=where or None)


def decode_chat(data: bytes) -> ChatCompletionBody:
    try:
        return chat_body_decoder.decode(data)
    except msgspec.MsgspecError as e:
        raise _bad_body(e) from None
    except RecursionError:  # msgspec's depth guard: JSON nested deeper than Python recurses
        raise BadRequestBody(TOO_DEEP) from None


def decode_completion(data: bytes) -> CompletionBody:
    try:
        return completion_body_decoder.decode(data)
    except msgspec.MsgspecError as e:
        raise _bad_body(e) from None
    except RecursionError:  # msgspec's depth guard: JSON nested deeper than Python recurses
        raise BadRequestBody(TOO_DEEP) from None


def decode_embedding(data: bytes) -> EmbeddingBody:
    try:
        return embedding_body_decoder.decode(data)
    except msgspec.MsgspecError as e:
        raise _bad_body(e) from None
    except RecursionError:  # msgspec's depth guard: JSON nested deeper than Python recurses
        raise BadRequestBody(TOO_DEEP) from None


def stop_list(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def chat_request(body: ChatCompletionBody, model: str) -> ChatRequest:
    """The job an executor receives for `body`, asking for `model`."""
    try:
        return ChatRequest(
            model=model,
            messages=body.messages,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop_list(body.stop),
            stream=body.stream,
            cache=body.cache,
            max_completion_tokens=body.max_completion_tokens,
            tools=body.tools,
            tool_choice=body.tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            response_format=body.response_format,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs,
            user=body.user,
            n=body.n,
            reasoning_effort=body.reasoning_effort,
        )
    except (TypeError, ValueError) as e:  # a model name the protocol refuses
        raise BadRequestBody(f"invalid request: {e}", param="model") from None


# The request fields `chat_request` maps; the test compares it with ChatRequest's.
MAPPED_FIELDS = frozenset({
    "model", "messages", "max_tokens", "temperature", "top_p", "stop", "stream", "cache", "max_completion_tokens",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "n", "reasoning_effort",
})  # fmt: skip


def usage_out(usage: Usage, receipt: SignedReceipt | None) -> UsageOut:
    return UsageOut(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        completion_tokens_details=CompletionTokensDetails(usage.reasoning_tokens) if usage.reasoning_tokens else None,
        cost=str(receipt.receipt.cost) if receipt is not None else None,
    )


def chat_completion(reply: ChatResponse) -> ChatCompletion:
    message = AssistantMessage(
        role="assistant",
        content=reply.content if reply.content or not reply.tool_calls else None,
        tool_calls=reply.tool_calls,
        reasoning_content=reply.reasoning_content,
    )
    logprobs = logprobs_out(reply.logprobs)
    return ChatCompletion(
        id=reply.job_id,
        created=int(time.time()),
        model=reply.model,
        choices=[Choice(message=message, finish_reason=reply.finish_reason.value, logprobs=logprobs)],
        usage=usage_out(reply.usage, reply.receipt),
        provider=reply.executor_id,
    )


def text_completion(reply: TextResponse) -> TextCompletion:
    return TextCompletion(
        id=reply.job_id,
        created=int(time.time()),
        model=reply.model,
        choices=[TextChoice(text=reply.text, finish_reason=reply.finish_reason.value)],
        usage=usage_out(reply.usage, reply.receipt),
        provider=reply.executor_id,
    )


def _base64(vector: list[float]) -> str:
    return base64.b64encode(array.array("f", vector).tobytes()).decode()


def embedding_list(reply: EmbeddingResponse, encoding: str = "float") -> EmbeddingList:
    as_base64 = encoding == "base64"
    return EmbeddingList(
        data=[EmbeddingItem(embedding=_base64(v) if as_base64 else v, index=i) for i, v in enumerate(reply.embeddings)],
        model=reply.model,
        usage=EmbeddingUsage(prompt_tokens=reply.usage.prompt_tokens, total_tokens=reply.usage.total_tokens),
    )


def receipt_id(receipt: SignedReceipt | None) -> str | None:
    """How a response names its receipt (`X-Lloom-Receipt`): the executor and its receipt number."""
    return None if receipt is None else f"{receipt.receipt.executor_id}#{receipt.receipt.seq}"
