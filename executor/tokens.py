"""Token estimates for when a backend reports no usage.

This is the design document's estimation fallback (the average of a word-based
and a character-based guess). Usage made this way is marked `estimated` on the
wire, so nobody mistakes it for a count.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.messages import Usage


def estimate_tokens(text: str) -> int:
    words = len(text.split())
    chars = len(text)
    return (int(words * 1.3) + int(chars / 4.0)) // 2


def estimate_usage(prompt_texts: Iterable[str], completion: str, *, completion_tokens: int | None = None) -> Usage:
    """Estimate usage; `completion_tokens` overrides the guess when it is known (e.g. a count of stream chunks)."""
    prompt = sum(estimate_tokens(t) for t in prompt_texts)
    completion_n = estimate_tokens(completion) if completion_tokens is None else completion_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion_n, total_tokens=prompt + completion_n, estimated=True
    )
