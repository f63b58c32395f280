"""docs/benchmarks.md from one run's results: tables, ratios against direct, goals, profile, plot."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from benchkit import env, telemetry_ab


def _f(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}x"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def relay_cpu(s: dict, path: str) -> float | None:
    """CPU µs per request of the relay process(es) of `path` (None for the direct path)."""
    cpu = s.get("cpu_us", {})
    if path == "executor":
        return cpu.get("executor")
    if path == "executor-noreceipts":
        return cpu.get("executor-noreceipts")
    if path == "litellm":
        return cpu.get("litellm")
    if path == "gateway":  # the gateway's relay is two processes: the gateway and the executor behind it
        return cpu.get("gateway", 0.0) + cpu.get("executor", 0.0)
    return None


def gateway_goals(res: dict) -> list[tuple[str, str, bool | None]]:
    """The gateway's goals (issue #17): added latency over direct, req/s per core vs LiteLLM, chunks, idle RSS."""
    c1, sat = res["c1"], res["sat"]
    if "gateway" not in c1:
        return []
    g, d = c1["gateway"], c1["direct"]
    a50, a99 = g["p50_ms"] - d["p50_ms"], g["p99_ms"] - d["p99_ms"]
    out: list[tuple[str, str, bool | None]] = [
        ("added p50 at c=1 over direct <= 0.7 ms", f"{a50:.3f} ms", a50 <= 0.7),
        ("added p99 at c=1 over direct <= 2 ms", f"{a99:.3f} ms", a99 <= 2.0),
    ]
    gc = sat["gateway"]["cpu_us"]
    g_us = gc.get("gateway", 0.0) + gc.get("executor", 0.0) + gc.get("nats-server", 0.0)
    if "litellm" in sat and g_us:
        l_us = sat["litellm"]["cpu_us"].get("litellm") or 0.0
        ratio = l_us / g_us if l_us else 0.0
        out.append((">= 50x LiteLLM's req/s per core (gateway + executor + nats-server CPU)",
                    f"{1e6 / g_us:.0f} vs {1e6 / l_us if l_us else 0:.0f} req/s per core: {ratio:.1f}x", ratio >= 50))
    else:
        out.append((">= 50x LiteLLM's req/s per core", f"{1e6 / g_us if g_us else 0:.0f} req/s per core; LiteLLM not measured", None))
    best = None
    for blk in res.get("stream", {}).values():
        us = blk["throughput"].get("gateway", {}).get("cpu_us_per_chunk", {}).get("gateway")
        if us:
            best = max(best or 0.0, 1e6 / us)
    out.append((">= 50,000 streamed chunks/s per gateway process (per gateway CPU-second)",
                f"{best:.0f}" if best else "n/a", best >= 50_000 if best else None))
    idle = res["rss_idle_mb"].get("gateway")
    out.append(("gateway idle RSS <= 60 MB", f"{idle:.1f} MB" if idle else "n/a", idle <= 60 if idle else None))
    return out


def goals(res: dict) -> list[tuple[str, str, bool | None]]:
    c1, sat, split = res["c1"], res["sat"], res["c1_split"]
    d, e, lt = c1["direct"], c1["executor"], c1.get("litellm")
    add50, add99 = e["p50_ms"] - d["p50_ms"], e["p99_ms"] - d["p99_ms"]
    s50 = split["executor"]["p50_ms"] - split["direct"]["p50_ms"]
    s99 = split["executor"]["p99_ms"] - split["direct"]["p99_ms"]
    cpu_sat = relay_cpu(sat["executor"], "executor") or 0.0
    streams = res["stream"]
    first, longest = next(iter(streams)), max(streams, key=int)

    def cap(n: str) -> float:
        us = streams[n]["throughput"]["executor"]["cpu_us_per_chunk"].get("executor") or 0.0
        return 1e6 / us if us else 0.0

    chunk_cap = cap(longest)
    chunk_note = f"{chunk_cap:,.0f}/s at {longest}-chunk streams" + (
        f" ({cap(first):,.0f}/s at {first})" if first != longest else "")
    first = streams[first]
    t = first["ttft"]
    add_ttft = t["executor"]["ttft_p50_ms"] - t["direct"]["ttft_p50_ms"]
    idle = res["rss_idle_mb"]["executor"]
    out: list[tuple[str, str, bool | None]] = [
        ("added p50 at c=1 <= 0.25 ms (one core)", f"{add50:.3f} ms ({s50:.3f} ms with the relay on its own core)", add50 <= 0.25),
        ("added p99 at c=1 <= 0.8 ms (one core)", f"{add99:.3f} ms ({s99:.3f} ms with the relay on its own core)", add99 <= 0.8),
        ("executor CPU per request at c=32 <= 50 µs (receipts on)", f"{cpu_sat:.0f} µs", cpu_sat <= 50),
        ("relayed stream chunks/s per process >= 100,000 (1 / executor CPU per chunk, longest stream)", chunk_note,
         chunk_cap >= 100_000),
        ("added TTFT p50 <= 0.5 ms (shortest stream)", f"{add_ttft:.3f} ms", add_ttft <= 0.5),
        ("executor idle RSS <= 50 MB", f"{idle:.1f} MiB", idle <= 50),
    ]  # fmt: skip
    ab = res.get("receipts_ab", {})
    if ab.get("status") == "measured":
        share = ab["cost_share_of_off"]  # None when the off run was too short to register CPU time
        out.append(("receipt signing + publishing cost per job <= 10 µs of executor CPU (c=32, on vs off)",
                    f"{ab['cost_us']:.1f} µs ({_f(None if share is None else 100 * share, 1)}% of "
                    f"{ab['executor_cpu_us']['off']:.1f} µs)", ab["cost_us"] <= 10))  # fmt: skip
    if lt and "litellm" in sat:
        e_core = 1e6 / ((sat["executor"]["cpu_us"].get("executor", 0) + sat["executor"]["cpu_us"].get("nats-server", 0)) or 1)
        l_core = 1e6 / (sat["litellm"]["cpu_us"].get("litellm") or 1)
        lt_add99 = lt["p99_ms"] - d["p99_ms"]
        out.append((">= 150x LiteLLM's requests/s per core (executor + nats-server CPU vs LiteLLM CPU)",
                    f"{e_core / l_core:.1f}x", e_core / l_core >= 150))  # fmt: skip
        out.append(("added p99 <= 1/20 of LiteLLM's (c=1, one core)", f"{add99:.3f} vs {lt_add99:.3f} ms (1/{lt_add99 / add99 if add99 > 0 else float('inf'):.1f})",
                    add99 * 20 <= lt_add99))  # fmt: skip
    else:
        out.append((">= 150x LiteLLM's requests/s per core", "LiteLLM not measured", None))
        out.append(("added p99 <= 1/20 of LiteLLM's", "LiteLLM not measured", None))
    return out


def goal_lines(res: dict) -> list[str]:
    return [f"{'PASS' if ok else 'MISS' if ok is False else 'N/A '}  {name}: {value}" for name, value, ok in goals(res)]


def latency_table(block: dict, with_rate: bool = False) -> str:
    d = block["direct"]
    rows = []
    for name, s in block.items():
        base = block["direct@litellm-rate"] if name == "litellm" and "direct@litellm-rate" in block else d
        added = [s[k] - base[k] for k in ("p50_ms", "p90_ms", "p99_ms")]
        row = [name] + ([_f(s.get("rate"), 0)] if with_rate else [])
        row += [_f(s["p50_ms"], 3), _f(s["p90_ms"], 3), _f(s["p99_ms"], 3)]
        row += ["–"] * 3 if name.startswith("direct") else [_f(a, 3) for a in added]
        row += [_ratio(s["p50_ms"], base["p50_ms"]), str(s["n"]), str(s["errors"])]
        rows.append(row)
    head = ["path"] + (["rate/s"] if with_rate else []) + ["p50 ms", "p90 ms", "p99 ms", "added p50", "added p90",
                                                            "added p99", "p50 vs direct", "requests", "errors"]  # fmt: skip
    return _table(head, rows)


def errors_note(block: dict) -> list[str]:
    bad = [f"{n}: {s['errors']} failed, first: `{s.get('first_error', '')[:200]}`" for n, s in block.items() if s["errors"]]
    return ["Errors: " + "; ".join(bad), ""] if bad else []


def cpu_table(block: dict, label: str) -> str:
    procs = ["executor", "gateway", "nats-server", "litellm", "backend", "generator"]
    rows = []
    for name, s in block.items():
        cpu = dict(s["cpu_us"])
        if name == "executor-noreceipts":  # its relay is the receipts-off executor process
            cpu["executor"] = cpu.get("executor-noreceipts")
        rows.append([name, _f(s["rps"], 0)] + [_f(cpu.get(p), 1) for p in procs] + [
            ", ".join(f"{p} {100 * u:.0f}%" for p, u in s["util"].items() if u >= 0.05)])
    return _table(["path", "req/s", *[f"{p} µs/{label}" for p in procs], "busy processes (% of one core)"], rows)


def write(res: dict, out: Path, log) -> None:  # type: ignore[no-untyped-def]
    json_path = out.with_suffix(".json")
    png = out.with_name(out.stem + "-cdf.png")
    plot_note = f"![latency CDFs]({png.name})"
    if env.BENCH_PY.exists() and env.package_version(str(env.BENCH_PY), "matplotlib") != "not installed":
        with tempfile.NamedTemporaryFile("w", suffix=".json") as full:  # every sample, for the plot only
            json.dump(res, full)
            full.flush()
            r = subprocess.run([str(env.BENCH_PY), str(Path(__file__).with_name("plot.py")), full.name, str(png)],
                               capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            plot_note = f"(plot skipped: matplotlib failed: {r.stderr.strip()[-300:]})"
    else:
        plot_note = "(plot skipped: matplotlib is not installed; it comes with the bench venv, i.e. a run without --no-litellm)"
    json_path.write_text(json.dumps(_trimmed(res), indent=1))
    log(plot_note)
    out.write_text(render(res, plot_note))


def _trimmed(res: dict) -> dict:
    """`res` with each latency list cut to 201 quantiles (0, 0.5, ..., 100%): enough to redraw its
    CDF, without the tens of thousands of raw samples a run collects."""
    out = dict(res)
    for key in ("c1_latencies_ms", "c1_split_latencies_ms", "sat_latencies_ms"):
        if key in out:
            out[key] = {path: _quantiles(xs, 201) for path, xs in out[key].items()}
    return out


def _quantiles(xs: list[float], n: int) -> list[float]:
    s = sorted(xs)
    if len(s) <= n:
        return s
    return [round(s[round(i * (len(s) - 1) / (n - 1))], 4) for i in range(n)]


def render(res: dict, plot_note: str) -> str:
    m, v, p = res["machine"], res["versions"], res["params"]
    sat = res["sat"]
    L: list[str] = ["# Benchmarks: executor path vs direct HTTP vs LiteLLM's proxy", ""]
    L += [f"Written by `scripts/bench.py` (mode `{res['mode']}`); rerun with `.venv/bin/python scripts/bench.py"
          f"{' --quick' if res['mode'] == 'quick' else ''}`. Raw figures: `{Path('benchmarks.json')}` beside this file.", ""]  # fmt: skip
    L += ["## Machine and versions", ""]
    L += [f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory']}; kernel {m['kernel']}"]
    L += ["- " + ", ".join(f"{k} {val}" for k, val in v.items())]
    L += [f"- LiteLLM path: {res['litellm_status']}", ""]
    L += ["## Method", ""]
    L += [
        "- Backend: `scripts/fast_openai_server.py`, a raw asyncio protocol on uvloop with pre-encoded answers "
        "(constant small completion; streams of N chunks with no pause), so the relay is what is measured. "
        "Its own CPU per request is in the CPU tables (the `backend` column).",
        "- Paths: **direct** = aiohttp -> backend; **executor** = `LloomClient` -> nats-server -> one `lloom-executor` "
        "process -> backend; **litellm** = aiohttp -> `litellm` proxy (1 worker) -> backend. Same request, same backend.",
        "- Receipts are on, as by default: nats-server runs JetStream (file store in the run's temp dir, "
        "`sync_interval: always`, as the embedded server does), each executor's outbox and key are in that temp dir, "
        "and after every measured batch of the executor path the harness waits until JetStream holds all of its "
        "receipts, so their publishing is charged to that batch. The saturation phase also runs the same executor "
        "with `[receipts] enabled = false` (path `executor-noreceipts`) for the A/B below.",
        f"- Interleaving: each phase runs the paths in round-robin batches ({p['rounds']} rounds, rotating order), "
        "so drift hits every path alike. Every loop is bounded by a request count and a time.",
        f"- CPU pinning on this {m['cores']}-core machine: the relay under test (executor or LiteLLM) runs alone on "
        f"CPU {res['pinning']['relay']}; the load generator (this harness, one uvloop process), the backend and "
        f"nats-server share CPU {res['pinning']['harness']}. The generator's own CPU per request and every process's "
        "busy share are reported below, so a saturated harness core is visible rather than hidden.",
        "- CPU per request is read from `/proc/<pid>/stat` (utime+stime) before and after each batch and divided by "
        "that batch's completed requests; RSS from `/proc/<pid>/status` (VmRSS; peak = VmHWM).",
        "- Added latency = percentile of the path minus the same percentile of direct, measured in the same run. "
        "50% load is open-loop (fixed arrival rate, sends never wait for answers; latency counted from the actual send, and how late sends were is reported).",
        "",
    ]
    L += ["## Goals for the executor path", "", _table(["goal", "measured", "result"],
          [[n, val, "PASS" if ok else "MISS" if ok is False else "n/a"] for n, val, ok in goals(res)]), ""]  # fmt: skip
    if gateway_goals(res):
        L += ["## Goals for the gateway path (HTTP -> lloom-gateway -> NATS -> executor -> backend)", "",
              _table(["goal", "measured", "result"],
                     [[n, val, "PASS" if ok else "MISS" if ok is False else "n/a"] for n, val, ok in gateway_goals(res)]),
              ""]  # fmt: skip
    L += ["## Latency at concurrency 1", "",
          "A request at concurrency 1 is a serial chain of processes, so a second core cannot make it faster; on this "
          "VM, though, a few per cent of the requests that cross to the other vCPU are delayed by 2-6 ms, spread "
          "evenly (about one 4 ms scheduler tick: a wake-up that waits for the other vCPU's next tick, as far as we "
          "can tell), which inflates the tail of every multi-process path. So c=1 is measured twice, interleaved the "
          "same way: first with every process on the harness core (the software's own cost; the goals use this), "
          "then with the relay on its own core as in all other phases.", "",
          "Every process on one core:", "", latency_table(res["c1"]), ""] + errors_note(res["c1"])
    L += ["Relay (executor or LiteLLM) on its own core, harness, backend and nats-server on the other:", "",
          latency_table(res["c1_split"]), ""] + errors_note(res["c1_split"])
    L += ["CPU per request at concurrency 1 (µs of each process per completed request):", "", cpu_table(res["c1"], "req"), ""]
    L += ["## Saturation (concurrency 32, closed loop)", "", cpu_table(sat, "req"), ""] + errors_note(sat)
    hb = [n for n, s in sat.items() if sum(u for k, u in s["util"].items() if k in ("generator", "backend", "nats-server")) >= 0.9]
    if hb:
        L += [f"The harness core (generator + backend + nats-server) was at least 90% busy for: {', '.join(hb)}; "
              "those paths' req/s is a lower bound set by the harness, not by the relay.", ""]
    d_rps = sat["direct"]["rps"]
    rows = []
    for name, s in sat.items():
        relay = relay_cpu(s, name)
        nats = s["cpu_us"].get("nats-server") if name.startswith(("executor", "gateway")) else 0.0
        per_core = 1e6 / (relay + (nats or 0)) if relay else None
        rows.append([name, _f(s["rps"], 0), _ratio(s["rps"], d_rps), _f(s["p50_ms"], 2), _f(s["p99_ms"], 2),
                     _f(relay, 1), _f(per_core, 0)])  # fmt: skip
    L += [_table(["path", "req/s", "vs direct", "p50 ms", "p99 ms", "relay CPU µs/req",
                  "req/s per relay core (incl. nats-server)"], rows), ""]  # fmt: skip
    L += render_receipts(res.get("receipts_ab"))
    L += telemetry_ab.render(res.get("telemetry_ab"))
    lag = ", ".join(f"{k} {s.get('lag_p99_ms', 0):.1f} ms" for k, s in res["half"].items())
    L += ["## Latency at 50% of saturation (open loop)", "", latency_table(res["half"], with_rate=True), "",
          *errors_note(res["half"]),
          f"How late the generator sent (p99 of send time minus schedule): {lag}. Lag of more than a millisecond "
          "or two means the harness core, not the relay, limited this phase.", "",
          "LiteLLM is driven at half of its own saturation rate and compared with a direct run at that same rate "
          "(`direct@litellm-rate`); direct and executor run at half of the executor's saturation rate.", ""]
    L += ["## Streaming", ""]
    for n_chunks, blk in res["stream"].items():
        t, thr = blk["ttft"], blk["throughput"]
        rows = []
        for name, s in thr.items():
            ec = s["cpu_us_per_chunk"]
            relay = (ec.get("executor") if name == "executor" else ec.get("litellm") if name == "litellm"
                     else ec.get("gateway") if name == "gateway" else None)  # fmt: skip
            rows.append([name, _f(s.get("chunks_per_s"), 0), _f(relay, 2), _f(1e6 / relay if relay else None, 0),
                         _f(ec.get("nats-server"), 2), _f(t[name]["ttft_p50_ms"], 3), _f(t[name]["ttft_p99_ms"], 3),
                         "–" if name == "direct" else _f(t[name]["ttft_p50_ms"] - t["direct"]["ttft_p50_ms"], 3)])  # fmt: skip
        L += [f"Streams of {n_chunks} chunks; throughput at concurrency {p['stream_c']}, TTFT at concurrency 1:", "",
              _table(["path", "chunks/s observed", "relay CPU µs/chunk", "chunks/s per relay core",
                      "nats-server µs/chunk", "TTFT p50 ms", "TTFT p99 ms", "added TTFT p50"], rows), ""]  # fmt: skip
    L += ["The backend writes a whole stream at once, so TTFT here includes how long a relay takes before it "
          "forwards the first chunk of a burst. nats-py only queues on publish and writes from its flusher task, so "
          "unless the job task yields after the first chunk, that chunk waits behind every already-buffered line "
          "(the executor yields once there since b2d1604). If TTFT grows with stream length, the first chunk is "
          "being held back again.", ""]
    L += ["## Memory (MiB)", ""]
    rows = [[k, _f(res["rss_idle_mb"].get(k), 1), _f(res["rss_loaded_mb"].get(k), 1), _f(res["rss_peak_mb"].get(k), 1)]
            for k in res["rss_idle_mb"]]  # fmt: skip
    L += [_table(["process", "idle RSS (ready, no traffic)", "RSS after saturation", "peak RSS"], rows), ""]
    L += ["## Scaling: executors sharing one model (queue group), concurrency 32", ""]
    base = res["scaling"][0]["rps"] if res["scaling"] else 0
    L += [_table(["executors", "req/s", "vs 1", "p50 ms", "p99 ms", "executor CPU µs/req (all)", "nats-server µs/req"],
                 [[str(r["executors"]), _f(r["rps"], 0), _ratio(r["rps"], base), _f(r["p50_ms"], 2), _f(r["p99_ms"], 2),
                   _f(r["executor_cpu_us"], 1), _f(r["nats_cpu_us"], 1)] for r in res["scaling"]]), ""]  # fmt: skip
    L += ["All executors are pinned to the relay core, so they share one core's CPU: with 2 cores and the harness on "
          "the other, this shows how the queue group spreads the load and what running N processes costs, not a "
          "multi-core speed-up (there is no spare core to give them).", ""]
    L += ["## Latency distributions", "", plot_note, ""]
    L += render_profile(res.get("profile"), sat["executor"]["cpu_us"].get("executor"))
    split = res.get("c1_split", {}).get("executor", {})
    L += render_profile(res.get("profile_c1"), split.get("cpu_us", {}).get("executor"), concurrency=1)
    L += HOT_PATH
    return "\n".join(L) + "\n"


def render_receipts(ab: dict | None) -> list[str]:
    L = ["## Receipts: what signing and publishing them costs (A/B at saturation)", ""]
    if not ab or ab.get("status") != "measured":
        return L + ["Not measured in this run.", ""]
    e, n = ab["executor_cpu_us"], ab["nats_cpu_us"]
    rows = [["executor (receipts on, default)", _f(ab["rps"]["on"], 0), _f(e["on"], 1), _f(n["on"], 1), _f(ab["p99_ms"]["on"], 2)],
            ["executor-noreceipts (`[receipts] enabled = false`)", _f(ab["rps"]["off"], 0), _f(e["off"], 1), _f(n["off"], 1),
             _f(ab["p99_ms"]["off"], 2)],
            ["difference (receipts on − off)", _f(ab["rps"]["on"] - ab["rps"]["off"], 0), _f(ab["cost_us"], 1),
             _f(ab["nats_cost_us"], 1), _f(ab["p99_ms"]["on"] - ab["p99_ms"]["off"], 2)]]  # fmt: skip
    share = ab["cost_share_of_off"]
    verdict = "n/a (no CPU time registered with receipts off)" if share is None else "PASS" if ab["cost_us"] <= 10 else "MISS"
    share = share or 0.0
    lag = ab.get("publisher_lag_s", {})
    st = ab.get("stream", {})
    L += ["Two executor processes on the relay core, identical but for `[receipts] enabled`; the receipts-off one "
          "serves its own model name, so both are reached the same way (queue group by model). They run as two paths "
          "of the saturation phase, interleaved with the others. After every batch of the receipts-on path the "
          "harness waits until JetStream holds every receipt the executor wrote before reading CPU, so "
          "publishing a batch's receipts is charged to that batch. nats-server runs JetStream with file storage and "
          "`sync_interval: always` (as the embedded server does), on the harness core.", "",
          _table(["executor", "req/s", "executor CPU µs/req", "nats-server CPU µs/req", "p99 ms"], rows), "",
          f"- **Receipt signing + publishing cost per job: {ab['cost_us']:.1f} µs of executor CPU, "
          f"{100 * share:.1f}% of the receipts-off executor's {e['off']:.1f} µs — {verdict}** against the goal "
          "\"at most 10 µs per job\" (issue #20). nats-server spends "
          f"{ab['nats_cost_us']:.1f} µs more per job storing the receipt.",
          f"- Receipts per signature at saturation: {_f(ab['receipts_per_signature'], 1)} "
          f"({ab['receipts_sampled']:,} receipts returned to the harness, {ab['signatures']:,} distinct `proof.sig`).",
          f"- Waiting for the outbox to drain after a batch: mean {1e3 * lag.get('mean', 0):.0f} ms, "
          f"max {1e3 * lag.get('max', 0):.0f} ms.",
          f"- End of run: {st.get('written', '–')} receipts written by {st.get('outboxes', '–')} executors, "
          f"{st.get('stored', '–')} receipts in `LLOOM_RECEIPTS` ({st.get('duplicates', '–')} twice), "
          f"in {st.get('messages', '–')} messages (batches); the outboxes' `acked` marks sum to "
          f"{st.get('acked_marks', '–')} (written once per sync interval, so they lag a little).", ""]
    return L


def render_profile(prof: dict | None, exec_us: float | None, *, concurrency: int = 32) -> list[str]:
    where = "saturation" if concurrency > 1 else "one caller at a time"
    measured = "measured at saturation" if concurrency > 1 else "measured at c=1 with the relay on its own core"
    L = [f"## Where the executor's CPU goes (py-spy, {where})", ""]
    if concurrency == 1 and prof is None:
        return []  # a report written before the c=1 profile existed
    if not prof or "samples" not in prof:
        return L + [f"Not profiled in this run: {(prof or {}).get('status', 'profiling is off in this mode')}.", ""]
    L += [f"{prof['status']}; {prof['samples']} samples of the executor process with Python stacks. "
          "Time inside C extensions (uvloop's loop and socket calls, msgspec) is counted on the Python frame "
          "that called them.", ""]  # fmt: skip
    L += [f"By library of the innermost frame, with the share of the {exec_us or 0:.0f} µs of executor CPU per request "
          f"{measured} (py-spy sees only Python stacks: a sample whose innermost frame is "
          "`Runner.run (asyncio/runners.py)` is time in uvloop's C loop itself, i.e. epoll and socket system calls "
          "and callback dispatch):", "",
          _table(["layer", "samples", "%", "≈ µs/request"],
                 [[n, str(c), f"{pc:.1f}", _f((exec_us or 0) * pc / 100, 0)] for n, c, pc in prof["layers"]]), ""]
    L += ["Top self time (innermost frame):", "",
          _table(["function", "samples", "%"], [[f"`{n}`", str(c), f"{pc:.1f}"] for n, c, pc in prof["self"]]), ""]
    L += ["Top inclusive time:", "",
          _table(["function", "samples", "%"], [[f"`{n}`", str(c), f"{pc:.1f}"] for n, c, pc in prof["inclusive"]]), ""]
    return L


# The analysis (what the microseconds are made of, the levers tried, what stands between the
# figures and the goals) is hand-written from same-run A/Bs, in docs/hot-path.md: not regenerated here.
HOT_PATH = [
    "## Hot path analysis", "",
    "Where the executor's microseconds go, process by process and piece by piece, the levers tried with their "
    "same-run before/after figures, and what stands between these figures and issue #20's goals: "
    "[hot-path.md](hot-path.md) (hand-written from `scripts/bench_executor.py` A/Bs; not regenerated by this script).",
    "",
]
