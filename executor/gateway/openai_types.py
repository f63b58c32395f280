"""The HTTP wire of the gateway: OpenAI's (and OpenRouter's) request, response, chunk and error shapes.

Requests are decoded once, at the edge, into these Structs: unknown fields are refused
(as api.openai.com answers 400 to a misspelt parameter). The chat body carries every
field of `protocol.messages.ChatRequest` under OpenAI's own name plus the gateway-only
fields, kept apart so they never reach an executor: `provider` (OpenRouter's routing
preferences), `models` (models to fall back through), `route`, `stream_options`.
Responses are encoded from Structs too (no per-request dict building).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from protocol.chat_types import (
    MAX_TOOLS,
    ReasoningEffort,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from protocol.messages import MAX_EMBEDDING_INPUTS, MAX_TOKENS_LIMIT, Message
from protocol.subjects import MAX_MODEL_NAME

ModelName = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_NAME)]


class _Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


# -- OpenRouter's routing preferences ------------------------------------------------


class MaxPrice(_Body):
    """Ceilings in USD per million tokens (OpenRouter's unit, and the catalogue's)."""

    prompt: Decimal | None = None
    completion: Decimal | None = None

    def __post_init__(self) -> None:
        for price in (self.prompt, self.completion):
            if price is not None and (price < 0 or not price.is_finite()):
                raise ValueError("max_price values must be finite and >= 0 (USD per million tokens)")


class ProviderPreferences(_Body):
    """OpenRouter's `provider` object; executors play its providers (ids in order/only/ignore)."""

    sort: Literal["price", "throughput", "latency"] | None = None
    max_price: MaxPrice | None = None
    order: Annotated[list[str], Meta(max_length=64)] | None = None
    only: Annotated[list[str], Meta(max_length=64)] | None = None
    ignore: Annotated[list[str], Meta(max_length=64)] | None = None
    allow_fallbacks: bool = True
    require_parameters: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


# -- requests -------------------------------------------------------------------------


class ChatCompletionBody(_Body, kw_only=True):
    """`POST /v1/chat/completions`. `model` may be left out when `models` names the models to try."""

    model: ModelName | None = None
    messages: Annotated[list[Message], Meta(min_length=1, max_length=4096)]
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    # OpenAI takes one stop string or up to four.
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    stream: bool = False
    tools: Annotated[list[Tool], Meta(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=1024)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    reasoning_effort: ReasoningEffort | None = None
    # Lloom's own: whether an executor may answer from its response cache.
    cache: bool | None = None
    # -- gateway-only (never sent to an executor)
    provider: ProviderPreferences | None = None
    models: Annotated[list[ModelName], Meta(min_length=1, max_length=16)] | None = None
    route: Literal["fallback"] | None = None
    stream_options: StreamOptions | None = None


class CompletionBody(_Body):
    """`POST /v1/completions` (legacy text completion): one prompt."""

    model: ModelName
    prompt: Annotated[str, Meta(min_length=1)] | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    stream: Literal[False] = False
    user: Annotated[str, Meta(max_length=256)] | None = None


class EmbeddingBody(_Body):
    """`POST /v1/embeddings`: one text or a list of texts."""

    model: ModelName
    input: Annotated[str, Meta(min_length=1)] | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    dimensions: Annotated[int, Meta(ge=1, le=65_536)] | None = None
    # The openai SDK asks for base64 (little-endian float32) by default and decodes it itself.
    encoding_format: Literal["float", "base64"] = "float"
    user: Annotated[str, Meta(max_length=256)] | None = None


# -- responses --------------------------------------------------------------------------


class CompletionTokensDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int


class UsageOut(msgspec.Struct, frozen=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None
    cost: str | None = None  # USD, as OpenRouter reports it, from the signed receipt


class TopLogprobOut(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(msgspec.Struct, frozen=True):
    """OpenAI's shape: every key present (`top_logprobs` even when empty, `bytes` even when null)."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class LogprobsOut(msgspec.Struct, frozen=True):
    content: list[TokenLogprobOut]


def logprobs_out(items: list[TokenLogprob] | None) -> LogprobsOut | None:
    if items is None:
        return None
    return LogprobsOut([TokenLogprobOut(t.token, t.logprob, t.bytes,
                                        [TopLogprobOut(x.token, x.logprob, x.bytes) for x in t.top_logprobs])
                        for t in items])  # fmt: skip


class AssistantMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str  # "assistant" (a required field, so omit_defaults keeps it)
    content: str | None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class Choice(msgspec.Struct, frozen=True):
    message: AssistantMessage
    finish_reason: str
    index: int = 0
    logprobs: LogprobsOut | None = None


class ChatCompletion(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut
    object: str = "chat.completion"
    # The executor that served it (OpenRouter names the provider here).
    provider: str | None = None


class Delta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct, frozen=True):
    delta: Delta
    finish_reason: str | None = None
    index: int = 0
    logprobs: LogprobsOut | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: UsageOut | None = None
    provider: str | None = None


class TextChoice(msgspec.Struct, frozen=True):
    text: str
    finish_reason: str
    index: int = 0
    logprobs: None = None


class TextCompletion(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut
    object: str = "text_completion"
    provider: str | None = None


class EmbeddingItem(msgspec.Struct, frozen=True):
    embedding: list[float] | str  # a base64 string when asked for
    index: int
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, frozen=True):
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


# -- the models list (OpenRouter's shape, with OpenAI's object/owned_by so both SDKs read it) --


class ModelPricing(msgspec.Struct, frozen=True):
    prompt: str  # USD per token, a decimal string
    completion: str
    request: str = "0"
    image: str = "0"


class Architecture(msgspec.Struct, frozen=True):
    input_modalities: list[str]
    output_modalities: list[str]
    modality: str
    tokenizer: str = "Other"


class TopProvider(msgspec.Struct, frozen=True):
    context_length: int | None
    max_completion_tokens: int | None = None
    is_moderated: bool = False


class LloomModelInfo(msgspec.Struct, frozen=True):
    executors: list[str]  # ids of the live executors serving it
    price_unit: str = "USD per token"


class ModelCard(msgspec.Struct, frozen=True):
    id: str
    name: str
    created: int
    description: str
    context_length: int | None
    pricing: ModelPricing
    architecture: Architecture
    top_provider: TopProvider
    supported_parameters: list[str]
    lloom: LloomModelInfo
    canonical_slug: str | None = None
    per_request_limits: None = None
    object: str = "model"
    owned_by: str = "lloom"


class ModelList(msgspec.Struct, frozen=True):
    data: list[ModelCard]
    object: str = "list"


class Generation(msgspec.Struct, frozen=True, omit_defaults=True):
    """`GET /v1/generation?id=`: OpenRouter's fields, plus the signed receipt they come from."""

    id: str
    model: str
    provider_name: str  # the executor id
    total_cost: str  # USD
    tokens_prompt: int
    tokens_completion: int
    created_at: str  # ISO 8601, UTC
    finish_reason: str | None
    generation_time: int  # ms
    latency: int | None  # ms to the first token, streams only
    outcome: str
    verified: bool
    receipt: msgspec.Raw  # the signed receipt as stored


class GenerationBody(msgspec.Struct, frozen=True):
    data: Generation


chat_body_decoder = msgspec.json.Decoder(ChatCompletionBody)
completion_body_decoder = msgspec.json.Decoder(CompletionBody)
embedding_body_decoder = msgspec.json.Decoder(EmbeddingBody)
encoder = msgspec.json.Encoder(decimal_format="string")
