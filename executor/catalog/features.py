"""The one rule for what an executor says each model can do, and refuses when it cannot.

A model's features are what the catalogue announces (`ModelOffer.features`) and what
the node checks a request against before calling its backend (`JobContext.check_features`):

- `[[models]] features` set for the model: exactly that list (the operator knows best:
  a server may not say, or say wrong);
- unset: `chat`, `stream`, and the capabilities the backend reported when it listed its
  models (executor/backends/model_caps.py: llama-server `/props`, Ollama `/api/show`,
  LM Studio `/api/v0/models`); nothing more when it did not say (vLLM, OpenAI, a failed probe).
"""

from __future__ import annotations

from collections.abc import Iterable

BASE_FEATURES = ("chat", "stream")


def model_features(configured: list[str] | None, detected: Iterable[str] | None) -> list[str]:
    """The features to announce and enforce for one model; see the module docstring."""
    if configured is not None:
        return list(configured)
    return [*BASE_FEATURES, *sorted(str(c) for c in detected or ())]
