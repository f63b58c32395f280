"""Benchmark: local token counting, to decide whether it can run on a job's hot path.

    .venv/bin/python scripts/bench_tokens.py

Needs the encoding files (`lloom-executor setup-tokenizers`). Prints, per encoding:
the one-time cost of building it, tokens/s counting a 4 KB prompt (`count_text` on
the first 4,096 characters of README.md: prose, commands and code), and the per-job
cost in µs of `count_messages` for a typical 200-character prompt (one system and
one user message); the same for the estimate. Each figure is the median of several timed batches on one core.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from executor.config import TokensConfig
from executor.tokens import TokenCounter
from protocol.messages import Message, Role

MODELS = {"cl100k_base": "gpt-4", "o200k_base": "gpt-4o", "p50k_base": "text-davinci-003", "estimate": "llama-3"}
PARAGRAPH = (
    "The executor receives a job from NATS, checks it, and sends it to its backend. While the "
    "backend streams tokens, the node forwards each chunk to the caller in order, and when the "
    "model stops it sends a final message with the finish reason and the usage: 1,024 prompt "
    "tokens, 256 completion tokens, priced per million at $2.50 and $10.00. Receipts are signed. "
)  # the job's user message is its first characters
PROMPT_4K = (Path(__file__).resolve().parent.parent / "README.md").read_text()[:4096]
SYSTEM = "You are a helpful assistant."
USER_200 = PARAGRAPH[: 200 - len(SYSTEM)]


def median_seconds(fn: Callable[[], object], *, repeat: int, batches: int = 7) -> float:
    """Median time of one call, over `batches` batches of `repeat` calls."""
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - start) / repeat)
    return statistics.median(times)


def main() -> int:
    counter = TokenCounter(TokensConfig())
    messages = [Message(Role.SYSTEM, SYSTEM), Message(Role.USER, USER_200)]
    print(f"python {sys.version.split()[0]}; 4 KB prompt (README.md) = {len(PROMPT_4K)} chars; job prompt = "
          f"{sum(len(m.content) for m in messages)} chars in 2 messages")  # fmt: skip
    print(f"{'encoding':<12} {'build ms':>9} {'4KB tokens':>10} {'tokens/s':>12} {'4KB µs':>9} {'job µs':>8}")
    for encoding, model in MODELS.items():
        start = time.perf_counter()
        method = counter.method_for(model)  # builds the encoding (once per process)
        build_ms = (time.perf_counter() - start) * 1e3
        if method.removeprefix("tiktoken:") != encoding:
            print(f"{encoding:<12} not installed ({method}); run `lloom-executor setup-tokenizers`")
            continue
        tokens = counter.count_text(model, PROMPT_4K).tokens
        per_4k = median_seconds(lambda: counter.count_text(model, PROMPT_4K), repeat=200)
        per_job = median_seconds(lambda: counter.count_messages(model, messages), repeat=2000)
        print(f"{encoding:<12} {build_ms:>9.0f} {tokens:>10} {tokens / per_4k:>12,.0f} "
              f"{per_4k * 1e6:>9.0f} {per_job * 1e6:>8.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
