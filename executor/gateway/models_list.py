"""`GET /v1/models`: the live catalogue as OpenRouter's models list (OpenAI's `object`/`owned_by` too).

One card per model name, over every live executor offering it: the lowest prices (as
USD-per-token decimal strings, OpenRouter's unit), the largest context length, the
parameters any of its executors supports (from announced features, see
`routing.supported_parameters`), and the executors' ids.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from executor.gateway.openai_types import (
    Architecture,
    LloomModelInfo,
    ModelCard,
    ModelList,
    ModelPricing,
    TopProvider,
)
from executor.gateway.routing import supported_parameters
from protocol.announcements import ModelOffer
from protocol.catalog import Catalog

PER_TOKEN = Decimal(1_000_000)


def per_token(per_million: Decimal) -> str:
    """USD per million tokens -> USD per token, as a plain decimal string ("0.0000025")."""
    value = (per_million / PER_TOKEN).normalize()
    return format(value, "f") if value else "0"


def model_cards(catalog: Catalog) -> list[ModelCard]:
    offers: dict[str, list[tuple[str, int, ModelOffer]]] = defaultdict(list)
    for entry, offer in catalog.offers():
        if offer.available:
            offers[offer.name].append((entry.executor_id, entry.announcement.epoch // 1000, offer))
    cards = []
    for name in sorted(offers):
        found = offers[name]
        features = {f for _, _, o in found for f in o.features}
        contexts = [o.context_length for _, _, o in found if o.context_length]
        context = max(contexts) if contexts else None
        inputs = ["text", "image"] if "vision" in features else ["text"]
        cards.append(ModelCard(
            id=name, name=name, canonical_slug=name,
            created=min(created for _, created, _ in found),
            description=f"{name}, served by {len(found)} executor(s) of the Lloom network",
            context_length=context,
            pricing=ModelPricing(prompt=per_token(min(o.pricing.input for _, _, o in found)),
                                 completion=per_token(min(o.pricing.output for _, _, o in found))),
            architecture=Architecture(input_modalities=inputs, output_modalities=["text"],
                                      modality=f"{'+'.join(inputs)}->text"),
            top_provider=TopProvider(context_length=context),
            supported_parameters=supported_parameters(features),
            lloom=LloomModelInfo(executors=sorted({e for e, _, _ in found})),
        ))  # fmt: skip
    return cards


def model_list(catalog: Catalog) -> ModelList:
    return ModelList(data=model_cards(catalog))
