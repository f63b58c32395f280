"""Token estimates for when a backend reports no usage.

The design document's estimation fallback (`protocol.estimate`) applied to a
job. Usage made this way is marked `estimated` on the wire, so nobody mistakes
it for a count.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.estimate import estimate_tokens
from protocol.messages import Usage


def estimate_usage(prompt_texts: Iterable[str], completion: str, *, completion_tokens: int | None = None) -> Usage:
    """Estimate usage; `completion_tokens` overrides the guess when it is known (e.g. a count of stream chunks)."""
    prompt = sum(estimate_tokens(t) for t in prompt_texts)
    completion_n = estimate_tokens(completion) if completion_tokens is None else completion_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion_n, total_tokens=prompt + completion_n, estimated=True
    )
