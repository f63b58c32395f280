"""OpenRouter's routing conventions -> the protocol's routing: where a chat job may go, in order.

    model "m:floor"      the cheapest executor of m first (provider.sort = price)
    model "m:nitro"      the fastest first (provider.sort = throughput)
    models [a, b]        fall back from a to b on no_executors / unavailable errors
    provider {sort, max_price {prompt, completion} (USD per million tokens), order, only, ignore
              (executor ids), allow_fallbacks, require_parameters}

A request that needs a capability (tools, images, json_schema, reasoning:
`protocol.capabilities.required_capabilities`) goes only to executors whose offer
announces it, as a required feature in `Constraints`. A plain request without any of
this takes the fast path: its model's queue group, no catalogue lookup at all.
`require_parameters` also requires the features behind every optional parameter the
request sets (`PARAMETER_FEATURES`; `/v1/models` lists them as `supported_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from executor.gateway.errors import BadRequestBody
from executor.gateway.openai_types import ChatCompletionBody, ProviderPreferences
from protocol.capabilities import required_capabilities
from protocol.errors import NoExecutors, UnsupportedFeature
from protocol.messages import ChatRequest
from protocol.replies import no_responders
from protocol.routing import Candidate, Constraints, Specific

if TYPE_CHECKING:
    from protocol.client import LloomClient

SUFFIX_SORT = {":floor": "price", ":nitro": "throughput"}

# Parameters every executor takes (the protocol carries them to any backend).
BASE_PARAMETERS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                   "presence_penalty", "frequency_penalty", "logit_bias", "user")  # fmt: skip
# Announced feature -> the parameters it makes supported (OpenRouter's names).
FEATURE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "tools": ("tools", "tool_choice", "parallel_tool_calls"),
    "json_schema": ("response_format", "structured_outputs"),
    "reasoning": ("reasoning", "include_reasoning", "reasoning_effort"),
    "logprobs": ("logprobs", "top_logprobs"),
}
# For require_parameters: request field -> the feature an offer must announce to honour it.
PARAMETER_FEATURES = {p: f for f, params in FEATURE_PARAMETERS.items() for p in params}


def supported_parameters(features: list[str] | set[str]) -> list[str]:
    out = list(BASE_PARAMETERS)
    for feature, params in FEATURE_PARAMETERS.items():
        if feature in features:
            out.extend(params)
    return sorted(out)


@dataclass(frozen=True, slots=True)
class Target:
    """One place to send the job: an executor of a model, or (executor None) the model's queue group."""

    model: str
    executor: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    models: tuple[str, ...]  # in fallback order
    provider: ProviderPreferences | None
    sort: str | None
    features: frozenset[str]

    @property
    def direct(self) -> bool:
        """Whether the queue groups will do: nothing asks for a choice among executors."""
        return self.provider is None and self.sort is None and not self.features

    def constraints(self) -> Constraints:
        mp = self.provider.max_price if self.provider else None
        return Constraints(
            max_input_price=mp.prompt if mp else None,
            max_output_price=mp.completion if mp else None,
            features=self.features,
        )


def split_suffix(model: str) -> tuple[str, str | None]:
    """`m:floor` -> (m, "price"); a colon elsewhere (`qwen2.5:7b`) is part of the name."""
    for suffix, sort in SUFFIX_SORT.items():
        if model.endswith(suffix) and len(model) > len(suffix):
            return model[: -len(suffix)], sort
    return model, None


def plan(body: ChatCompletionBody, request: ChatRequest) -> Plan:
    """How `body` asks to be routed; `request` is its job (for the capabilities it needs)."""
    names = [body.model] if body.model else []
    names += [m for m in body.models or () if m not in names]
    if not names:
        raise BadRequestBody("give `model` (or `models`, the models to try in order)", param="model")
    sort = body.provider.sort if body.provider else None
    models = []
    for name in names:
        model, suffix_sort = split_suffix(name)
        sort = sort or suffix_sort
        models.append(model)
    features = {c.value for c in required_capabilities(request)}
    if body.provider and body.provider.require_parameters:
        for field, feature in PARAMETER_FEATURES.items():
            if getattr(body, field, None) is not None:
                features.add(feature)
    return Plan(models=tuple(models), provider=body.provider, sort=sort, features=frozenset(features))


def _sort_key(sort: str | None):  # type: ignore[no-untyped-def]
    def full(c: Candidate) -> bool:
        return c.load >= 1.0

    if sort == "price":
        return lambda c: (full(c), c.offer.pricing.input + c.offer.pricing.output, c.expected_cost, c.load)
    if sort == "latency":
        return lambda c: (full(c), c.latency_ms if c.latency_ms is not None else 0.0, c.load)
    if sort == "throughput":
        # Most tokens per second first; the unmeasured are tried (like rank's Fastest), then placed by figures.
        return lambda c: (full(c), -(c.offer.perf.tokens_per_s or float("inf")),
                          c.latency_ms if c.latency_ms is not None else 0.0, c.load)  # fmt: skip
    return None


def choose(found: list[Candidate], p: Plan) -> list[Candidate]:
    """Filter and order the catalogue's candidates for one model as the provider object asks."""
    pr = p.provider
    if pr is not None and pr.only is not None:
        found = [c for c in found if c.executor_id in pr.only]
    if pr is not None and pr.ignore:
        found = [c for c in found if c.executor_id not in pr.ignore]
    key = _sort_key(p.sort)
    if key is not None:
        found = sorted(found, key=key)  # stable: rank's random tie-break survives
    if pr is not None and pr.order:
        rank_of = {executor: i for i, executor in enumerate(pr.order)}
        listed = sorted((c for c in found if c.executor_id in rank_of), key=lambda c: rank_of[c.executor_id])
        rest = [c for c in found if c.executor_id not in rank_of]
        found = listed + (rest if pr.allow_fallbacks else [])
    if pr is not None and not pr.allow_fallbacks:
        found = found[:1]
    return found


def describe(p: Plan, model: str) -> str:
    parts = []
    if p.features:
        parts.append(f"announcing {', '.join(sorted(p.features))}")
    pr = p.provider
    if pr is not None and pr.max_price is not None:
        parts.append(f"within max_price {pr.max_price.prompt}/{pr.max_price.completion} USD per 1M tokens")
    if pr is not None and (pr.only or pr.ignore):
        parts.append("among the executors only/ignore allow")
    return f"no executor serves model {model!r}" + (f" {' and '.join(parts)}" if parts else "")


async def targets_for(client: LloomClient, p: Plan, request: ChatRequest, model: str) -> list[Target]:
    """The executors to try for `model`, best first, from the client's live catalogue."""
    if p.direct:
        return [Target(model)]
    try:
        found = await client.candidates(request, Specific(model), p.constraints())
    except NoExecutors:
        found = []
    chosen = choose(found, p)
    if not chosen:
        served = (await client.catalog()).model_names()
        if model not in served:
            raise no_responders((model, None), served)  # a 404 naming the served models
        if p.features and await _served_without(client, p, request, model):
            raise UnsupportedFeature(f"model {model!r} is served, but none of its executors announces"
                                     f" {', '.join(sorted(p.features))}, which this request needs")  # fmt: skip
        raise NoExecutors(describe(p, model))
    return [Target(c.model, c.executor_id) for c in chosen]


async def _served_without(client: LloomClient, p: Plan, request: ChatRequest, model: str) -> bool:
    """Whether executors would take `model` if the request needed no capabilities (a 422, not a 503)."""
    c = p.constraints()
    try:
        found = await client.candidates(request, Specific(model), Constraints(
            max_input_price=c.max_input_price, max_output_price=c.max_output_price))
    except NoExecutors:
        return False
    return bool(choose(found, p))
