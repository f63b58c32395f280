"""Latency CDFs per path, run with the bench venv's python (matplotlib stays out of the project's venv).

    python plot.py results.json out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    res = json.load(open(sys.argv[1]))
    panels = [("c1_latencies_ms", "concurrency 1, one core"), ("c1_split_latencies_ms", "concurrency 1, relay on own core"),
              ("sat_latencies_ms", "concurrency 32 (saturation)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, values in res.get(key, {}).items():
            if not values:
                continue
            s = sorted(values)
            # ~2,000 points draw the same curve as 200,000 in a fraction of the time.
            idx = sorted({min(len(s) - 1, int(len(s) * k / 2000)) for k in range(2001)})
            xs = [s[i] for i in idx]
            ys = [(i + 1) / len(s) for i in idx]
            ax.plot(xs, ys, label=f"{name} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
