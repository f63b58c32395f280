"""The discovery benchmark's report: goals, tables and the findings, rendered from its results."""

from __future__ import annotations

import json
from pathlib import Path

from benchkit.discovery_common import GOAL_DROP_S, GOAL_VISIBLE_P99_MS, HEARTBEAT_S, MISSED, POLL_S, SIM_MODELS, pct


def _f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _row(label: str, s: dict | None, nd: int = 1) -> list[str]:
    if not s:
        return [label, "–", "–", "–", "–", "–", "0"]
    return [label, _f(s["p50_ms"], nd), _f(s["p90_ms"], nd), _f(s["p99_ms"], nd), _f(s["max_ms"], nd), _f(s["min_ms"], nd), str(s["n"])]


def goals(res: dict) -> list[tuple[str, str, bool]]:
    vis = res["inprocess"]["from_announcer_start"]
    kill = res["processes"]["kill_expiry"] or {}
    obs = res["processes"]["kill_observed"] or {}
    over = kill.get("max_ms", 0) - GOAL_DROP_S * 1000
    note = f"; over by {over:.1f} ms: a heartbeat was in flight at the kill, see Findings" if 0 < over < 50 else ""
    return [
        (f"new executor visible to a running client, p99 <= {GOAL_VISIBLE_P99_MS:.0f} ms",
         f"p99 {vis['p99_ms']:.1f} ms, max {vis['max_ms']:.1f} ms over {vis['n']} in-process executors",
         vis["p99_ms"] <= GOAL_VISIBLE_P99_MS and res["inprocess"]["failures"] == 0),
        (f"SIGKILLed executor dropped <= {GOAL_DROP_S} s (default heartbeat)",
         f"max {kill.get('max_ms', float('nan')):.1f} ms at the catalogue's expiry instant "
         f"(max {obs.get('max_ms', float('nan')):.1f} ms as seen polling every {POLL_S * 1000:.0f} ms), "
         f"{kill.get('n', 0)} kills{note}",
         bool(kill) and kill["max_ms"] <= GOAL_DROP_S * 1000 and res["processes"]["not_removed"] == 0),
    ]  # fmt: skip


def goal_lines(res: dict) -> list[str]:
    return [f"{'PASS' if ok else 'MISS'}  {name}: {value}" for name, value, ok in goals(res)]


def _conditions(c: dict) -> str:
    busy = ", ".join(f"{b['name']} (pid {b['pid']}) {b['cpu_pct']}%" for b in c["busy"]) or "none above 5% of a core"
    return f"load average {c['loadavg'][0]:.2f}/{c['loadavg'][1]:.2f}/{c['loadavg'][2]:.2f}; other busy processes: {busy}"


def render(res: dict) -> str:
    m, v, p = res["machine"], res["versions"], res["params"]
    ip, pr, sim = res["inprocess"], res["processes"], res["simulated"]
    tr, cl = sim["traffic"], sim["client"]
    n = sim["n"]
    mode_flag = {"full": "", "quick": " --quick", "smoke": " --smoke"}[res["mode"]]
    L = ["# Discovery benchmarks: announcements, heartbeats and the client's catalogue", ""]
    L += [f"Written by `scripts/bench_discovery.py` (mode `{res['mode']}`); rerun with "
          f"`.venv/bin/python scripts/bench_discovery.py{mode_flag}`. Raw figures: `{Path(res.get('json_name', 'discovery.json'))}` beside this file.", ""]  # fmt: skip
    L += ["## Goals", ""]
    L += [f"- **{'PASS' if ok else 'MISS'}** {name}: {value}" for name, value, ok in goals(res)]
    L += [""]
    L += ["## Machine and conditions", ""]
    L += [f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory']}; kernel {m['kernel']}"]
    L += ["- " + ", ".join(f"{k} {val}" for k, val in v.items())]
    pin_note = (f"the measuring client on CPU {res['pinning']['client']}, nats-server, the backend, executor processes "
                f"and the simulator on CPU {res['pinning']['others']}") if res["pinning"]["client"] else "no pinning (one CPU)"  # fmt: skip
    L += [f"- Pinning: {pin_note}."]
    L += [f"- Before the run: {_conditions(res['conditions_before'])}."]
    L += [f"- After the run: {_conditions(res['conditions_after'])}."]
    L += ["- Discovery sources measured (sha256, 12 digits): " + ", ".join(f"`{k}` {d}" for k, d in res["sources"].items())]
    L += ["- Every process talks over 127.0.0.1 only; each figure below is one run, not a best-of.", ""]

    L += ["## Method", ""]
    L += [
        "- One `nats-server` (monitoring on 127.0.0.1, for its message counters), the benchmark's fast OpenAI-format "
        "backend (`scripts/fast_openai_server.py`), and a measuring client: a `protocol.catalog.Catalog` started "
        "before any executor, on the harness's event loop (plain asyncio).",
        f"- **Visibility, in-process** ({ip['from_announcer_start']['n']} repetitions): each repetition opens a NATS "
        f"connection, starts a real `ExecutorNode` (one model) and a real `Announcer` (new key, heartbeat "
        f"{HEARTBEAT_S} s) on the harness's loop, and times `announcer.start()` until the client's `Catalog` lists the "
        f"executor (woken by `wait_changed`; the check and the wait run without a yield between them, so no change is "
        f"missed). Then the announcer stops (goodbye) and the time until the entry goes is the in-process goodbye row.",
        f"- **Real processes** ({len(pr['runs'])} `lloom-executor` processes, one at a time, `[llm_client] backend = "
        f"\"openai_compatible\"` against the fast backend, default heartbeat): time from `Popen` to listed, and from "
        f"the process's own `executor node started` log line (its JSON timestamp, same clock) to listed. After 1.0-1.5 s "
        f"(the offset varies so kills land at every phase of the heartbeat cycle) the process gets SIGKILL "
        f"({p['proc_kill']}x) or SIGTERM ({p['proc_term']}x). Expiry is lazy (on `entries()`), so the client polls "
        f"`entries()` every {POLL_S * 1000:.0f} ms and also wakes on any change; the SIGKILL figure judged against the "
        f"goal is the entry's last `expires_at` minus the kill instant (when the catalogue stops listing it, "
        f"independent of the polling), the polled figure is shown beside it.",
        f"- **{n:,} simulated executors**: one child process runs {n:,} real `Announcer` objects (each with its own "
        f"Ed25519 nkey, {len(SIM_MODELS)} models with prices, context length, category, features and measured "
        f"performance) on stub nodes, over {max(1, min(10, n // 50))} NATS connections, on uvloop. A tap subscriber in "
        f"the harness counts messages and sizes on `lloom.v1.catalog.announce` over {p['window_s']} s; `/varz` of the "
        f"server gives its own message and byte counters; CPU of the simulator and of nats-server comes from /proc. "
        f"Then a new client process (pinned alone) starts {p['queries']} catalogues one after another (the first is "
        f"kept), reports its RSS before and after, follows the heartbeat stream for {p['window_s']} s "
        f"(`time.process_time`), profiles {p['profile_s']} s more with cProfile, and traces one more catalogue's "
        f"heap with tracemalloc.",
        "",
    ]  # fmt: skip

    L += ["## 1. Time until a new executor is visible to a running client", ""]
    head = ["measured", "p50 ms", "p90 ms", "p99 ms", "max ms", "min ms", "n"]
    rows = [
        _row("in-process: `announcer.start()` -> listed", ip["from_announcer_start"], 2),
        _row("in-process: `node.start()` -> listed", ip["from_node_start"], 2),
        _row("in-process: `announcer.stop()` (goodbye) -> unlisted", ip["goodbye"], 2),
        _row("`lloom-executor` process: spawn -> listed", pr["spawn_to_visible"]),
        _row("`lloom-executor` process: `executor node started` log line -> listed", pr["log_to_visible"], 2),
    ]
    L += [_table(head, rows), ""]
    if ip["failures"]:
        L += [f"{ip['failures']} in-process executors were not listed within 5 s.", ""]
    L += [f"Spawn to listed is almost all Python start-up and imports of the executor process "
          f"(spawn to its log line: p50 "
          f"{_f(pct([r['spawn_to_log_s'] * 1000 for r in pr['runs'] if r['spawn_to_log_s'] is not None] or [0], 0.5), 0)} ms); "
          f"from the node's start the announcement takes milliseconds.", ""]  # fmt: skip
    L += ["A new client's first catalogue (`Catalog.start()`: the query, then answers until an idle gap of 50 ms or "
          "the server's no-responders status):", ""]
    qe = [q["ms"] for q in res["query_empty"]]
    qo = [q["ms"] for q in res["query_one"]]
    q3 = [q["ms"] for q in cl["queries"]]
    L += [_table(["executors on the network", "start() p50 ms", "max ms", "runs", "entries found"], [
        ["0 (no-responders status ends the query)", _f(pct(qe, 0.5), 2), _f(max(qe), 2), str(len(qe)), "0"],
        ["1 (`lloom-executor` process)", _f(pct(qo, 0.5), 2), _f(max(qo), 2), str(len(qo)),
         str(res["query_one"][0]["entries"])],
        [f"{n:,} (simulated, one process answers them all)", _f(pct(q3, 0.5), 0), _f(max(q3), 0), str(len(q3)),
         " / ".join(str(q["entries"]) for q in cl["queries"])],
    ]), ""]  # fmt: skip

    L += ["## 2. Time until a dead or stopped executor is dropped", ""]
    rows = [
        _row("SIGKILL -> catalogue's expiry instant (last `expires_at` - kill)", pr["kill_expiry"], 0),
        _row(f"SIGKILL -> unlisted, polling `entries()` every {POLL_S * 1000:.0f} ms", pr["kill_observed"], 0),
        _row("SIGTERM -> unlisted (goodbye announcement)", pr["term"], 1),
    ]
    L += [_table(head, rows), ""]
    L += [f"With heartbeat {HEARTBEAT_S} s and {MISSED} missed, an entry expires {MISSED * HEARTBEAT_S:.1f} s after "
          f"the client *received* the last heartbeat, so a kill is noticed {MISSED * HEARTBEAT_S - HEARTBEAT_S:.1f}-"
          f"{MISSED * HEARTBEAT_S:.1f} s later depending on where in the heartbeat cycle it lands; the worst case "
          f"equals the goal, with only the heartbeat's transit time (well under a millisecond here) as the margin "
          f"either way.{' ' + str(pr['not_removed']) + ' executors were never removed.' if pr['not_removed'] else ''}", ""]  # fmt: skip

    L += [f"## 3. {n:,} simulated executors: size, traffic, a new client's cost", ""]
    L += ["Message sizes (bytes; the signature travels in the `Lloom-Sig` header; \"wire\" is the publisher's whole "
          "`HPUB` frame):", ""]
    srows = []
    for label, sizes in ((f"{len(SIM_MODELS)} models", tr["sizes"]), ("1 model, no prices configured", res["sizes_one_model"])):
        for kind in ("announce", "heartbeat", "down"):
            if kind in sizes:
                s = sizes[kind]
                srows.append([{"announce": "full announcement", "heartbeat": "heartbeat", "down": "goodbye"}[kind], label,
                              str(s["payload"]), str(s["headers"]), str(s["wire"])])  # fmt: skip
    L += [_table(["message", "offer", "payload", "headers", "wire"], srows), ""]
    achieved = tr["per_executor_per_s"] / tr["target_per_executor_per_s"]
    hb_w, full_w = tr["sizes"]["heartbeat"]["wire"], tr["sizes"]["announce"]["wire"]
    steady = n * (19 * hb_w + full_w) / 20 / HEARTBEAT_S
    L += [_table(["announce subject, default heartbeat", "value"], [
        ["messages/s (tap)", f"{tr['msgs_per_s']:,.0f} ({tr['counts']['heartbeat']:,} heartbeats, {tr['counts']['announce']:,} full announcements in {tr['seconds']:.1f} s; every 20th beat is a full announcement)"],
        ["messages/s per executor, from its gaps (target)", f"{tr['per_executor_per_s']:.2f} ({tr['target_per_executor_per_s']:.2f}): {100 * achieved:.0f}% kept"],
        ["payload bytes/s", f"{tr['payload_bytes_per_s'] / 1024:,.0f} KiB/s"],
        ["wire bytes/s into the server (HPUB frames)", f"{tr['wire_bytes_per_s'] / 1024:,.0f} KiB/s"],
        ["server's own count in (`/varz`)", f"{tr['server_in_msgs_per_s']:,.0f} msg/s, {tr['server_in_bytes_per_s'] / 1024:,.0f} KiB/s (headers + payload)"],
        ["gap between one executor's messages p50 / p99 / max", f"{_f(tr['gap_p50_ms'], 0)} / {_f(tr['gap_p99_ms'], 0)} / {_f(tr['gap_max_ms'], 0)} ms"],
        [f"gaps >= {MISSED * HEARTBEAT_S:.1f} s (an expiry)", str(tr["gaps_over_expiry"])],
        ["steady state (19 heartbeats + 1 full announcement per executor per 10 s), wire", f"{steady / 1024:,.0f} KiB/s into the server, and the same again out to every subscribed client"],
        [f"simulator CPU ({n:,} announcers, one process)", f"{tr['simulator_cpu_pct']:.0f}% of a core, {_f(tr['simulator_cpu_us_per_msg'], 0)} µs per message"],
        ["CPU of everything else on the machine during the window (other users' processes, the idle backend)", f"{tr['others_cpu_pct']:.0f}% of a core"],
        ["nats-server CPU", f"{tr['nats_cpu_pct']:.1f}% of a core, {_f(tr['nats_cpu_us_per_msg'], 1)} µs per message (in, and out to the one tap subscriber)"],
    ]), ""]  # fmt: skip
    sim_cap = 1e6 / tr["simulator_cpu_us_per_msg"] if tr["simulator_cpu_us_per_msg"] else None
    if achieved >= 0.95 and tr["gaps_over_expiry"] == 0:
        L += [f"One process kept all {n:,} announcers on the {HEARTBEAT_S} s heartbeat "
              f"({100 * achieved:.0f}% of the target rate, no gap long enough to expire an entry)."]  # fmt: skip
    else:
        L += [f"**One process could not keep {n:,} announcers on the {HEARTBEAT_S} s heartbeat**: it achieved "
              f"{tr['per_executor_per_s']:.2f} messages/s per executor ({100 * achieved:.0f}% of the target), with "
              f"{tr['gaps_over_expiry']} gaps long enough to expire an entry."]  # fmt: skip
    if sim_cap:
        L += [f"At {tr['simulator_cpu_us_per_msg']:.0f} µs of CPU per message, one core signs and sends about "
              f"{sim_cap:,.0f} messages/s, so {n:,} announcers in one process need a heartbeat of at least "
              f"{n / sim_cap:.2f} s (with the core fully busy). Real executors each send 2 messages/s, which costs "
              f"each of them {2 * tr['simulator_cpu_us_per_msg'] / 1e4:.3f}% of a core."]  # fmt: skip
    L += [""]
    w = cl["window"]
    q0 = cl["queries"][0]
    pq = cl["patient"][0]
    per_ann = 1000 * pq["cpu_ms"] / max(1, pq["entries"])
    replayed = w["rejected"].get("replayed", 0) + sum(q["rejected"].get("replayed", 0) for q in cl["patient"])
    cap = 1e6 / w["cpu_us_per_msg"] if w["cpu_us_per_msg"] else None
    L += [_table(["new client (own process, own core)", "value"], [
        ["catalogues started one after another: `start()` returns after / entries then / all listed after",
         "; ".join(f"{q['ms']:,.0f} ms / {q['entries']:,} / {_f(q.get('complete_ms'), 0)} ms" for q in cl["queries"])],
        ["first catalogue: query answers received (first after / last after)",
         f"{q0['answers']:,} ({_f(q0['first_ms'], 1)} ms / {_f(q0['last_ms'], 0)} ms)"],
        ["first answer to a plain request on the query subject (harness, just before)", f"{sim['first_answer_ms']:,.0f} ms"],
        ["variant: first answer awaited up to the query timeout, then the idle gap (`protocol.catalog.Catalog` since e946c9d; a variant of this script before): returns after / entries",
         "; ".join(f"{q['ms']:,.0f} ms / {q['entries']:,}" for q in cl["patient"])],
        ["legitimate messages rejected as \"replayed\" (first catalogue by the end; each variant catalogue)",
         f"{w['rejected'].get('replayed', 0)}; " + ", ".join(str(q['rejected'].get('replayed', 0)) for q in cl["patient"])],
        ["client CPU for a catalogue filled by the query (variant, first run)", f"{pq['cpu_ms']:,.0f} ms ({per_ann:,.0f} µs per announcement, heartbeats arriving meanwhile included)"],
        ["RSS before / after the first catalogue", f"{cl['rss_before_mb']:.1f} / {cl['rss_after_mb']:.1f} MiB (+{cl['rss_after_mb'] - cl['rss_before_mb']:.1f} MiB)"],
        ["heap growth while one more catalogue fills (tracemalloc, whole process)", f"{cl['heap_kib']:,.0f} KiB for {cl['heap_entries']:,} entries ({1024 * cl['heap_kib'] / max(1, cl['heap_entries']):,.0f} B each)"],
        ["following the heartbeat stream: CPU", f"{w['cpu_pct']:.1f}% of a core at {w['msgs_per_s']:,.0f} msg/s ({_f(w['cpu_us_per_msg'], 0)} µs per message)"],
        ["entries listed during the window (min / max)", f"{w['min_entries']:,} / {w['max_entries']:,}"],
    ]), ""]  # fmt: skip
    if cap:
        L += [f"At {w['cpu_us_per_msg']:.0f} µs per message a client core follows about {cap:,.0f} catalogue messages/s: "
              f"{cap * HEARTBEAT_S:,.0f} executors at the {HEARTBEAT_S} s heartbeat with the core doing nothing else.", ""]  # fmt: skip
    prof = cl.get("profile")
    if prof:
        L += [f"Where the client's time goes while following the stream (cProfile, {p['profile_s']} s; shares of "
              "profiled time, profiler overhead included):", ""]
        L += [_table(["function (own time)", "share"], [[f"`{t['func']}`", f"{t['pct']}%"] for t in prof["top_tottime"]]), ""]
        cum = prof["cumulative_pct"]
        L += ["Cumulative: " + ", ".join(f"`{k}` {val}%" for k, val in sorted(cum.items(), key=lambda kv: -kv[1])) + ".", ""]

    missed_q = sum(1 for q in cl["queries"] if q["entries"] < n)
    cum = prof["cumulative_pct"] if prof else {}
    patient_ms = ", ".join(f"{q['ms']:,.0f}" for q in cl["patient"])
    L += ["## Findings", ""]
    L += [
        f"- **The query gives up if the *first* answer takes longer than the idle gap.** `Catalog.refresh()` waits "
        f"`min(idle_gap, left)` for every answer including the first, so when no answer arrives within 50 ms the "
        f"catalogue starts empty, although the no-responders status already ends the query at once on an empty network. "
        f"Here {missed_q} of {len(cl['queries'])} new catalogues with {n:,} executors returned early with fewer than "
        f"{n:,} entries (first answer after {sim['first_answer_ms']:,.0f} ms, because one process signs all the answers, and pauses "
        f"between its connections' flushes); "
        f"heartbeats and per-executor info requests then completed them "
        f"{', '.join(_f(q.get('complete_ms'), 0) + ' ms' for q in cl['queries'])} after start. The same happens on a "
        f"real network whenever every executor is more than ~50 ms away (a WAN round trip) or busy, and also when "
        f"answers pause for 50 ms mid-stream. Waiting for the first answer up to `query_timeout` (the variant above) "
        f"found {', '.join(str(q['entries']) for q in cl['patient'])} entries; it costs nothing on an empty network.",
        f"- **Legitimate messages are counted as \"replayed\".** An announcer numbers its broadcasts and its query/info "
        f"answers from one sequence, but the client takes them from different subscriptions (the announce callback, "
        f"the query inbox read by `refresh()`), which nats.py serves independently, so one executor's messages are "
        f"often processed out of their sequence order and the older one is rejected. Seen here: {replayed} such "
        f"rejections in this run, all from genuine executors. When the rejected message is a query answer that a "
        f"heartbeat overtook, the heartbeat has already triggered an info request for the same announcement (extra "
        f"traffic); either way the `rejected` counter meant to reveal attacks fills with false alarms.",
        f"- **The SIGKILL bound is exact, not conservative**: expiry counts {MISSED} x {HEARTBEAT_S} s from when the "
        f"client *received* the last heartbeat, so a kill just after a heartbeat left is seen 1.5 s + the heartbeat's "
        f"transit later (max here {pr['kill_expiry']['max_ms'] if pr['kill_expiry'] else float('nan'):.1f} ms).",
        f"- **Client CPU is mostly signature checks**: `verify` is {cum.get('verify', 0)}% of profiled time against "
        f"`_accept`'s {cum.get('_accept', 0)}% (all of the catalogue's work), and `_raw_public_key` (base32 and CRC16 "
        f"of the same public key, again for every message) is {cum.get('_raw_public_key', 0)}% of it; a per-key cache "
        f"of the decoded `VerifyKey` would save that part. Heartbeats are not jittered: executors started together stay in phase, so "
        f"a client receives them in bursts (all {n:,} within a few ms, every {HEARTBEAT_S} s).",
        "",
    ]  # fmt: skip
    L += ["## Why a query subject rather than a JetStream KV bucket", ""]
    L += [
        f"The catalogue's state lives in the executors: each answers `lloom.v1.catalog.query` itself and the server only "
        f"routes, so a new client's catalogue is as fresh as the moment it asks, every entry carries its executor's "
        f"signature, and no server keeps any discovery state. Measured here: with no executor the no-responders status "
        f"ends the query in {pct(qe, 0.5):.1f} ms; with one, the catalogue is ready after {pct(qo, 0.5):.0f} ms, which "
        f"is the cost of the design: one idle gap (50 ms) after the last answer, because the client cannot know that "
        f"no further executor will answer. With {n:,} executors a catalogue filled by the query took "
        f"{patient_ms} ms (bounded below here by one process "
        f"signing all the answers; the client's own share is {per_ann:,.0f} µs per announcement). A KV bucket would "
        f"save the idle gap (a watcher learns where the initial values end) but turn every heartbeat into a stored "
        f"write: {n:,} executors at the default heartbeat publish {tr['msgs_per_s']:,.0f} messages/s "
        f"({steady / 1024:,.0f} KiB/s), which cost nats-server {tr['nats_cpu_pct']:.1f}% of a core here as plain "
        f"publish/subscribe; as KV puts each would also be appended to a stream (replicated in a cluster, so "
        f"JetStream must be enabled with storage on the servers), and expiry would come from a key or bucket TTL "
        f"rather than from the client counting missed heartbeats. Load changes twice a second per executor, which is "
        f"traffic, not state worth storing; the query keeps the server stateless and needs no JetStream.",
        "",
    ]  # fmt: skip
    return "\n".join(L)


def write(res: dict, out: Path) -> None:
    json_path = out.with_suffix(".json")
    res["json_name"] = json_path.name
    json_path.write_text(json.dumps(res, indent=1, default=str))
    out.write_text(render(res))
