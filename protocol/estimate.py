"""The design document's token estimate, for when no tokenizer is at hand.

The average of a word-based guess (1.3 tokens a word) and a character-based one
(4 characters a token). Clients use it to estimate a job's cost before routing;
executors to fill in usage a backend did not report (marked `estimated`).
"""

from __future__ import annotations


def estimate_tokens(text: str) -> int:
    words = len(text.split())
    chars = len(text)
    return (int(words * 1.3) + int(chars / 4.0)) // 2
