"""The telemetry A/B: the same executor with `[telemetry]` off (the default) and on, per request.

Two executor processes on the relay core, identical (receipts on) but for `[telemetry]
prometheus_listen`; the telemetry-on one serves its own model name, so both are reached the
same way. Their paths run back to back in paired rounds (which goes first alternates), at
concurrency 1 and at the saturation concurrency; the figures are medians over the rounds
(the cost: the median of the rounds' differences in executor CPU per request), since the
machine is shared and one disturbed round should not decide the verdict. The telemetry-on executor's /metrics is scraped before and after, and its
request counter must grow by the requests the harness completed on it (the metrics count
what happened; the scrapes' own cost is negligible at one per 15 s). Goal (issue 18): at most +10 µs executor CPU per request at c=32, and no
change to added p50 at c=1 within noise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from statistics import median

import aiohttp

from benchkit.paths import closed_loop
from benchkit.phases import SAT_CONCURRENCY, Runner

OFF, ON = "executor", "executor-telemetry"
GOAL_US = 10.0


async def run(runner: Runner, p: dict, metrics_url: str, log: Callable[[str], None]) -> dict:
    """Both paths at c=1 and c=SAT_CONCURRENCY; `runner.paths` must be exactly {OFF, ON}."""
    out: dict = {"status": "measured"}
    before = await counted_requests(metrics_url) or 0.0
    rounds = max(4, 2 * p["rounds"])
    for phase, concurrency, seconds, cap in (("c1", 1, p["c1_s"], p["c1_cap"]),
                                             ("sat", SAT_CONCURRENCY, p["sat_s"], p["sat_cap"])):  # fmt: skip
        log(f"telemetry A/B: concurrency {concurrency}, {rounds} paired rounds")
        out[phase] = await paired(runner, f"telemetry c={concurrency}", concurrency, seconds, cap, rounds)
    out["counted"] = (await counted_requests(metrics_url) or 0.0) - before
    out["completed_on"] = out["c1"][ON]["n"] + out["sat"][ON]["n"]
    return out


async def paired(runner: Runner, label: str, concurrency: int, seconds: float, cap: int, rounds: int) -> dict:
    """`rounds` rounds of both paths back to back (alternating which goes first). The cost is the median
    of the rounds' differences: a round that another process on the machine disturbed moves it little."""
    off, on = runner.paths[OFF], runner.paths[ON]
    diffs: list[float] = []
    per_path: dict[str, list[dict]] = {OFF: [], ON: []}
    for r in range(rounds):
        runner.paths = {OFF: off, ON: on} if r % 2 == 0 else {ON: on, OFF: off}
        block = await runner.rounds(label, lambda n, path: closed_loop(path, concurrency, seconds, cap), 1)
        for name in (OFF, ON):
            per_path[name].append(block[name])
        diffs.append(block[ON]["cpu_us"].get(ON, 0.0) - block[OFF]["cpu_us"].get(OFF, 0.0))
    runner.paths = {OFF: off, ON: on}
    out: dict = {"cost_us": median(diffs), "cost_us_rounds": diffs}
    for name in (OFF, ON):
        rs = per_path[name]
        out[name] = {"n": sum(x["n"] for x in rs), "errors": sum(x["errors"] for x in rs),
                     "rps": median([x["rps"] for x in rs]), "cpu_us": {name: median([x["cpu_us"].get(name, 0.0) for x in rs])},
                     "p50_ms": median([x["p50_ms"] for x in rs]), "p99_ms": median([x["p99_ms"] for x in rs])}  # fmt: skip
    return out


async def counted_requests(metrics_url: str) -> float | None:
    """The telemetry-on executor's `lloom_requests_total` (all series), from its /metrics."""
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as r:
        text = await r.text()
    values = [float(m.group(1)) for m in re.finditer(r"^lloom_requests_total\{[^}]*\} (\S+)$", text, re.M)]
    return sum(values) if values else None


def render(ab: dict | None) -> list[str]:
    L = ["## Telemetry: what metrics cost (A/B, `[telemetry]` off vs on)", ""]
    if not ab or ab.get("status") != "measured":
        return L + ["Not measured in this run.", ""]
    rows = []
    for phase, label in (("c1", "c=1"), ("sat", f"c={SAT_CONCURRENCY}")):
        block = ab[phase]
        for name, what in ((OFF, "off (default)"), (ON, "on (`prometheus_listen`)")):
            s = block[name]
            rows.append([label, what, f"{s['rps']:.0f}", f"{s['cpu_us'].get(name, 0.0):.1f}", f"{s['p50_ms']:.3f}",
                         f"{s['p99_ms']:.3f}", str(s["n"])])  # fmt: skip
    sat, c1 = ab["sat"], ab["c1"]
    verdict = "PASS" if sat["cost_us"] <= GOAL_US else "MISS"
    head = ["concurrency", "telemetry", "req/s (median round)", "executor CPU µs/req (median)", "p50 ms (median)",
            "p99 ms (median)", "requests"]
    L += ["\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                     *("| " + " | ".join(r) + " |" for r in rows)]), "",  # fmt: skip
          f"- **Telemetry cost at c={SAT_CONCURRENCY}: {sat['cost_us']:+.1f} µs of executor CPU per request — "
          f"{verdict}** against the goal \"at most +{GOAL_US:.0f} µs\" (median of the rounds' differences: "
          f"{', '.join(f'{d:+.1f}' for d in sat['cost_us_rounds'])}); at c=1: {c1['cost_us']:+.1f} µs.",
          f"- p50 at c=1: {c1[OFF]['p50_ms']:.3f} ms off, {c1[ON]['p50_ms']:.3f} ms on "
          f"({c1[ON]['p50_ms'] - c1[OFF]['p50_ms']:+.3f} ms).",
          f"- The telemetry-on executor's `lloom_requests_total` grew by {ab['counted']:.0f} over these phases; "
          f"the harness completed {ab['completed_on']} requests on it.", ""]
    return L
