"""What the discovery benchmark's parts share: its modes, the defaults it measures against, its goals."""

from __future__ import annotations

import math

MODES = {
    "full": dict(visible_n=200, proc_kill=10, proc_term=5, sim_n=1000, window_s=10.0, profile_s=4.0, queries=5,
                 idle_queries=10),
    "quick": dict(visible_n=100, proc_kill=5, proc_term=2, sim_n=1000, window_s=4.0, profile_s=2.0, queries=3,
                  idle_queries=5),
    "smoke": dict(visible_n=10, proc_kill=1, proc_term=1, sim_n=20, window_s=1.0, profile_s=0.5, queries=2,
                  idle_queries=2),
}  # fmt: skip
HEARTBEAT_S = 0.5  # the executor's default (NodeConfig.heartbeat_interval_secs)
MISSED = 3  # Catalog's default missed_heartbeats
GOAL_VISIBLE_P99_MS = 100.0
GOAL_DROP_S = 1.5
POLL_S = 0.01  # how often the measuring client reads entries() while waiting for an expiry

SIM_MODELS = [  # (name, input price, output price, context length, category)
    ("llama-3.1-8b-instruct", "0.10", "0.20", 131072, "balanced"),
    ("qwen2.5:7b", "0.08", "0.16", 32768, "fast"),
    ("mistral-small-24b-instruct", "0.40", "1.20", 32768, "quality"),
]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summary_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": pct(ms, 0.5), "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99), "max_ms": max(ms),
            "min_ms": min(ms)}  # fmt: skip
