"""Benchmark: network discovery (announcements, heartbeats, the client's live catalogue).

    .venv/bin/python scripts/bench_discovery.py            # full run (~2-3 min), writes docs/discovery.md
    .venv/bin/python scripts/bench_discovery.py --quick    # under a minute, for development
    .venv/bin/python scripts/bench_discovery.py --smoke --out /tmp/d.md   # seconds; what the test runs

Measures, against a real nats-server on 127.0.0.1:

1. how long a newly started executor takes to appear in an already-running
   client's `Catalog`: in-process `ExecutorNode` + `Announcer` pairs (many
   repetitions), and real `lloom-executor` processes (from process start, and
   from their "executor node started" log line);
2. how long a SIGKILLed executor stays listed with the default heartbeat
   (0.5 s, dropped after 3 missed), and how long a SIGTERMed one (goodbye);
3. 1,000 simulated executors: real `Announcer` objects (real keys, real signed
   messages) on stub nodes in one child process: message sizes, traffic on the
   announce subject, a new client's catalogue query time, its memory, and its
   CPU to follow the heartbeat stream (a separate child process, read from /proc).

Every child (nats-server, the fast backend, executors, the simulator, the
measuring client) is started through `benchkit.procs.Procs`, which stops it on
exit, error or Ctrl-C. Every loop is bounded by a count and a deadline.
Writes the markdown report and a JSON dump next to it, and prints PASS/MISS
for the two goals (visibility p99 <= 100 ms, SIGKILL drop <= 1.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import env  # noqa: E402
from benchkit.discovery_common import (  # noqa: E402
    HEARTBEAT_S,
    MISSED,
    MODES,
    POLL_S,
    SIM_MODELS,
    pct,
    summary_ms,
)
from benchkit.discovery_report import goal_lines, write  # noqa: E402
from benchkit.discovery_workers import worker_client, worker_simulate  # noqa: E402
from benchkit.harness import Progress, cpu_plan, start_fast_backend  # noqa: E402
from benchkit.procs import Procs, cpu_seconds, pin, run_all_stopped, tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

def foreign_load(exclude: set[int], seconds: float = 1.0) -> dict:
    """Load average and the busiest processes this run did not start, sampled over `seconds`."""

    def snap() -> dict[int, tuple[str, float]]:
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            f = stat[stat.rindex(")") + 2 :].split()
            out[int(d)] = (name, (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
        return out

    a = snap()
    time.sleep(seconds)
    b = snap()
    busy = []
    for pid, (name, t) in b.items():
        if pid in exclude or pid not in a:
            continue
        share = (t - a[pid][1]) / seconds
        if share >= 0.05:
            busy.append({"pid": pid, "name": name, "cpu_pct": round(100 * share)})
    busy.sort(key=lambda x: -x["cpu_pct"])
    return {"loadavg": os.getloadavg(), "busy": busy[:4]}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def varz(mport: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/varz", timeout=5) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------- children


async def start_nats(procs: Procs, cpus: set[int] | None) -> tuple[str, int, int]:
    from executor.process.embedded_nats import find_nats_server, free_port

    port, mport = free_port(), free_port()
    argv = [find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-m", str(mport)]
    proc = procs.start("nats-server", argv, cpus=cpus)
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            await asyncio.to_thread(varz, mport)
            pin(proc.pid, cpus)  # threads it started after the first pin
            return f"nats://127.0.0.1:{port}", mport, proc.pid
        except OSError:
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nats-server did not start\n{procs.log_tail('nats-server')}")


def executor_argv(tmp: Path, name: str, nats_url: str, backend_url: str) -> list[str]:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(
        f'[node]\nid = "{name}"\nnats_url = "{nats_url}"\nidentity_file = "{tmp / (name + ".nk")}"\n\n'
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{backend_url}"\nmodels = ["bench-model"]\n\n'
        '[logging]\nformat = "json"\n'
    )
    exe = Path(sys.executable).parent / "lloom-executor"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.runtime.cli"]
    return [*argv, "--config", str(cfg), "--nats", nats_url]


def log_event_time(procs: Procs, name: str, event: str) -> float | None:
    """Wall-clock time (epoch s) of the first JSON log line with this event in the child's log."""
    try:
        text = (procs.log_dir / f"{name}.log").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event and "timestamp" in rec:
            return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


# ---------------------------------------------------------------- catalogue helpers


def listed(catalog, executor_id: str):  # type: ignore[no-untyped-def]
    return next((e for e in catalog.entries() if e.executor_id == executor_id), None)


async def wait_listed(catalog, executor_id: str, deadline_s: float) -> bool:  # type: ignore[no-untyped-def]
    # Race-free on one loop: the check and wait_changed()'s clear() run without a yield between them.
    end = time.monotonic() + deadline_s
    while listed(catalog, executor_id) is None:
        if time.monotonic() > end:
            return False
        await catalog.wait_changed(timeout=0.05)
    return True


async def wait_unlisted(catalog, executor_id: str, deadline_s: float) -> tuple[bool, float | None]:  # type: ignore[no-untyped-def]
    """Poll entries() every POLL_S (expiry is lazy) and wake at once on a change (a goodbye).

    Also returns the entry's last `expires_at` (loop time): the instant the catalogue
    stops listing it, whatever the polling granularity."""
    end = time.monotonic() + deadline_s
    expires = None
    while (entry := listed(catalog, executor_id)) is not None:
        expires = entry.expires_at
        if time.monotonic() > end:
            return False, expires
        await catalog.wait_changed(timeout=POLL_S)
    return True, expires


def frame_sizes(msg, subject: str) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """Payload, header block and the publisher's whole frame (HPUB <subject> <hdr> <total>\\r\\n ... \\r\\n)."""
    hdr = len(b"NATS/1.0\r\n") + sum(len(k) + len(v) + 4 for k, v in (msg.headers or {}).items()) + 2
    line = f"HPUB {subject} {hdr} {hdr + len(msg.data)}\r\n"
    return len(msg.data), hdr, len(line) + hdr + len(msg.data) + 2


class Tap:
    """Counts what crosses the announce subject: per-type sizes, per-key arrival gaps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = {"heartbeat": 0, "announce": 0, "down": 0}
        self.payload = {"heartbeat": 0, "announce": 0, "down": 0}
        self.header = {"heartbeat": 0, "announce": 0, "down": 0}
        self.wire = {"heartbeat": 0, "announce": 0, "down": 0}
        self.sizes: dict[str, tuple[int, int, int]] = {}
        self.last: dict[str, float] = {}
        self.gaps: list[float] = []

    async def on_msg(self, msg) -> None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        data = msg.data
        kind = "heartbeat" if data.startswith(b'{"type":"heartbeat"') else "down" if b'"state":"down"' in data else "announce"
        _, hdr, wire = frame_sizes(msg, msg.subject)
        self.counts[kind] += 1
        self.payload[kind] += len(data)
        self.header[kind] += hdr
        self.wire[kind] += wire
        self.sizes.setdefault(kind, (len(data), hdr, wire))
        key = data[data.find(b'"key":"') + 7 :][:56].decode(errors="replace")
        if kind != "down":
            if key in self.last:
                self.gaps.append(now - self.last[key])
            self.last[key] = now


# ---------------------------------------------------------------- phase 1: in-process visibility


async def phase_inprocess(nats_url: str, backend_url: str, catalog, n: int, log: Progress) -> dict:  # type: ignore[no-untyped-def]
    import nats

    from executor.catalog.announcer import Announcer
    from executor.backends.openai_compat import OpenAICompatibleBackend
    from executor.config import NodeConfig
    from executor.jobs.node import ExecutorNode
    from protocol.identity import Identity

    after_start, after_node, goodbye, failures = [], [], [], 0
    deadline = time.monotonic() + max(30.0, n * 0.5)
    for i in range(n):
        if time.monotonic() > deadline:
            break
        nc = await nats.connect(nats_url)
        backend = OpenAICompatibleBackend(base_url=backend_url, timeout_secs=5)
        ident = Identity.generate()
        eid = f"inproc-{os.getpid()}-{i}"
        node = ExecutorNode(nc, backend, NodeConfig(), executor_id=eid, models=["bench-model"])
        t_node = time.perf_counter()
        await node.start()
        announcer = Announcer(nc, node, ident, heartbeat_interval=HEARTBEAT_S)
        t0 = time.perf_counter()
        await announcer.start()
        ok = await wait_listed(catalog, eid, 5.0)
        t1 = time.perf_counter()
        if ok:
            after_start.append(t1 - t0)
            after_node.append(t1 - t_node)
        else:
            failures += 1
        t2 = time.perf_counter()
        await announcer.stop()
        gone, _ = await wait_unlisted(catalog, eid, 5.0)
        if gone:
            goodbye.append(time.perf_counter() - t2)
        await node.stop(drain_timeout=0)
        await nc.close()
        await backend.aclose()
    log(f"in-process: {len(after_start)} visible, {failures} not within 5 s")
    return {"from_announcer_start": summary_ms(after_start), "from_node_start": summary_ms(after_node),
            "goodbye": summary_ms(goodbye), "failures": failures, "samples_ms": [v * 1000 for v in after_start]}  # fmt: skip


async def query_times(nc, runs: int) -> list[dict]:  # type: ignore[no-untyped-def]
    """New catalogues on `nc`, started one after another: how long start() takes and how many it finds."""
    from protocol.catalog import Catalog

    out = []
    for _ in range(runs):
        c = Catalog(nc)
        t0 = time.perf_counter()
        await c.start()
        dt = time.perf_counter() - t0
        out.append({"ms": dt * 1000, "entries": len(c.entries())})
        await c.stop()
    return out


# ---------------------------------------------------------------- phase 2: real processes


async def phase_processes(procs: Procs, tmp: Path, nats_url: str, backend_url: str, catalog, p: dict,
                          cpus: set[int] | None, log: Progress) -> dict:  # type: ignore[no-untyped-def]  # fmt: skip
    runs: list[dict] = []
    plan = ["kill"] * p["proc_kill"] + ["term"] * p["proc_term"]
    for i, how in enumerate(plan):
        name = f"disc-exec-{i}"
        argv = executor_argv(tmp, name, nats_url, backend_url)
        t_spawn_wall, t_spawn = time.time(), time.monotonic()
        proc = procs.start(name, argv, cpus=cpus)
        ok = await wait_listed(catalog, name, 30.0)
        t_vis, t_vis_wall = time.monotonic(), time.time()
        if not ok:
            raise RuntimeError(f"{name} never appeared in the catalogue\n{procs.log_tail(name)}")
        started = None
        for _ in range(50):
            started = log_event_time(procs, name, "executor node started")
            if started is not None:
                break
            await asyncio.sleep(0.02)
        # Let it run a random part of a heartbeat period (and a few beats), so the kill
        # lands at every phase of the heartbeat cycle across runs.
        await asyncio.sleep(1.0 + (i * 0.37) % HEARTBEAT_S)
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        gone, expires = await wait_unlisted(catalog, name, 10.0)
        t_gone = time.monotonic()
        await asyncio.to_thread(proc.wait, 15)
        procs.stop(proc)  # forgets it (already exited)
        run = {"how": how, "spawn_to_visible_s": t_vis - t_spawn,
               "log_to_visible_s": (t_vis_wall - started) if started else None,
               "spawn_to_log_s": (started - t_spawn_wall) if started else None,
               "removed": gone, "removal_observed_s": t_gone - t_sig,
               "removal_expiry_s": (expires - t_sig) if (how == "kill" and expires is not None) else None}  # fmt: skip
        runs.append(run)
        log(f"{name}: visible {run['spawn_to_visible_s']:.2f} s after spawn, {how} -> removed after "
            f"{run['removal_observed_s'] * 1000:.0f} ms")  # fmt: skip
    kills = [r for r in runs if r["how"] == "kill" and r["removed"]]
    terms = [r for r in runs if r["how"] == "term" and r["removed"]]
    logs = [r["log_to_visible_s"] for r in runs if r["log_to_visible_s"] is not None]
    return {
        "runs": runs,
        "spawn_to_visible": summary_ms([r["spawn_to_visible_s"] for r in runs]),
        "log_to_visible": summary_ms(logs) if logs else None,
        "kill_observed": summary_ms([r["removal_observed_s"] for r in kills]) if kills else None,
        "kill_expiry": summary_ms([r["removal_expiry_s"] for r in kills if r["removal_expiry_s"] is not None]) if kills else None,
        "term": summary_ms([r["removal_observed_s"] for r in terms]) if terms else None,
        "not_removed": sum(1 for r in runs if not r["removed"]),
    }  # fmt: skip


# ---------------------------------------------------------------- phase 3: 1,000 simulated executors


async def phase_simulated(procs: Procs, nats_url: str, mport: int, nats_pid: int, p: dict,
                          cpus: tuple[set[int] | None, set[int] | None], log: Progress) -> dict:  # type: ignore[no-untyped-def]  # fmt: skip
    import nats

    from protocol import subjects as subj

    client_cpus, other_cpus = cpus
    n = p["sim_n"]
    me = [sys.executable, str(Path(__file__).resolve())]
    sim = procs.start("simulator", [*me, "--worker", "simulate", "--nats", nats_url, "--count", str(n)],
                      cpus=other_cpus, stdout_pipe=True)  # fmt: skip
    assert sim.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(sim.stdout.readline), 120)
    if not line.startswith(b"READY "):
        raise RuntimeError(f"simulator did not start: {line!r}\n{procs.log_tail('simulator')}")
    ready = json.loads(line[6:])
    log(f"{n} simulated executors announcing (set up in {ready['setup_s']:.1f} s)")
    await asyncio.sleep(1.5)  # past the start-up burst

    # Traffic on the announce subject, the simulator's and the server's CPU, over one window.
    tap = Tap()
    nc = await nats.connect(nats_url)
    t_q = time.perf_counter()
    answer = await nc.request(subj.CATALOG_QUERY, b"", timeout=10)  # the first of n answers: a full announcement
    first_answer_ms = (time.perf_counter() - t_q) * 1000
    full_size = frame_sizes(answer, subj.CATALOG_ANNOUNCE)
    sub = await nc.subscribe(subj.CATALOG_ANNOUNCE, cb=tap.on_msg)
    await nc.flush()
    await asyncio.sleep(HEARTBEAT_S * 2)  # every key seen once: gaps count from here
    tap.reset()
    v0 = await asyncio.to_thread(varz, mport)
    s0, n0, h0, m0, w0 = cpu_seconds(sim.pid), cpu_seconds(nats_pid), cpu_seconds(os.getpid(), with_children=False), busy_cpu_s(), time.monotonic()
    await asyncio.sleep(p["window_s"])
    s1, n1, h1, m1, w1 = cpu_seconds(sim.pid), cpu_seconds(nats_pid), cpu_seconds(os.getpid(), with_children=False), busy_cpu_s(), time.monotonic()
    v1 = await asyncio.to_thread(varz, mport)
    await sub.unsubscribe()
    await nc.close()
    wall = w1 - w0
    msgs = sum(tap.counts.values())
    tap.sizes["announce"] = full_size
    mean_gap = sum(tap.gaps) / len(tap.gaps) if tap.gaps else None
    traffic = {
        "seconds": wall, "msgs": msgs, "msgs_per_s": msgs / wall,
        # From each executor's gaps (a short window holds a whole number of synchronised bursts).
        "per_executor_per_s": 1 / mean_gap if mean_gap else 0.0, "target_per_executor_per_s": 1 / HEARTBEAT_S,
        "payload_bytes_per_s": sum(tap.payload.values()) / wall,
        "wire_bytes_per_s": sum(tap.wire.values()) / wall,
        "counts": tap.counts, "sizes": {k: {"payload": a, "headers": b, "wire": c} for k, (a, b, c) in tap.sizes.items()},
        "server_in_msgs_per_s": (v1["in_msgs"] - v0["in_msgs"]) / wall,
        "server_in_bytes_per_s": (v1["in_bytes"] - v0["in_bytes"]) / wall,
        "gap_p50_ms": pct(tap.gaps, 0.5) * 1000 if tap.gaps else None,
        "gap_p99_ms": pct(tap.gaps, 0.99) * 1000 if tap.gaps else None,
        "gap_max_ms": max(tap.gaps) * 1000 if tap.gaps else None,
        "gaps_over_expiry": sum(1 for g in tap.gaps if g >= MISSED * HEARTBEAT_S),
        "simulator_cpu_pct": 100 * (s1 - s0) / wall,
        "simulator_cpu_us_per_msg": 1e6 * (s1 - s0) / msgs if msgs else None,
        "others_cpu_pct": 100 * ((m1 - m0) - (s1 - s0) - (n1 - n0) - (h1 - h0)) / wall,
        "nats_cpu_pct": 100 * (n1 - n0) / wall,
        "nats_cpu_us_per_msg": 1e6 * (n1 - n0) / msgs if msgs else None,
    }  # fmt: skip
    log(f"announce subject: {traffic['msgs_per_s']:,.0f} msg/s ({traffic['per_executor_per_s']:.2f}/s per executor, "
        f"target {1 / HEARTBEAT_S:.1f}), simulator CPU {traffic['simulator_cpu_pct']:.0f}%")  # fmt: skip

    # A new client in its own process: query, memory, CPU to follow the stream.
    args = [*me, "--worker", "client", "--nats", nats_url, "--count", str(n), "--window", str(p["window_s"]),
            "--profile", str(p["profile_s"]), "--queries", str(p["queries"])]  # fmt: skip
    cl = procs.start("client", args, cpus=client_cpus, stdout_pipe=True)
    assert cl.stdout is not None
    out = await asyncio.wait_for(asyncio.to_thread(cl.stdout.read), 60 + 4 * p["window_s"])
    await asyncio.to_thread(cl.wait, 10)
    procs.stop(cl)
    if cl.returncode != 0 or not out.startswith(b"RESULT "):
        raise RuntimeError(f"measuring client failed ({cl.returncode}): {out[-500:]!r}\n{procs.log_tail('client')}")
    client = json.loads(out[7:])
    log(f"new client: catalogue of {client['queries'][0]['entries']} in {client['queries'][0]['ms']:.0f} ms, "
        f"CPU {client['window']['cpu_pct']:.1f}% following {client['window']['msgs_per_s']:,.0f} msg/s")  # fmt: skip
    procs.stop(sim)
    return {"n": n, "models_each": len(SIM_MODELS), "setup_s": ready["setup_s"], "first_answer_ms": first_answer_ms,
            "traffic": traffic, "client": client}  # fmt: skip


# ---------------------------------------------------------------- workers (child processes)


# ---------------------------------------------------------------- main


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path, log: Progress) -> dict:
    import nats

    from protocol import subjects as subj
    from protocol.catalog import Catalog

    import logging

    import structlog

    # The in-process executors log through structlog's default (stdout): keep warnings only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    p = MODES[args.mode]
    client_cpus, other_cpus = cpu_plan()
    res: dict = {"mode": args.mode, "params": p, "machine": env.machine(), "versions": versions(),
                 "pinning": {"client": sorted(client_cpus or []), "others": sorted(other_cpus or [])},
                 "heartbeat_s": HEARTBEAT_S, "missed": MISSED, "poll_ms": POLL_S * 1000,
                 "sources": source_digests()}  # fmt: skip
    res["conditions_before"] = await asyncio.to_thread(foreign_load, {os.getpid()})
    log(f"load before: {res['conditions_before']}")
    backend_url, _ = await start_fast_backend(procs, other_cpus)
    nats_url, mport, nats_pid = await start_nats(procs, other_cpus)
    if client_cpus:
        pin(os.getpid(), client_cpus)
    log(f"nats-server at {nats_url}, backend at {backend_url}")
    nc = await nats.connect(nats_url)
    tap = Tap()
    tap_sub = await nc.subscribe(subj.CATALOG_ANNOUNCE, cb=tap.on_msg)
    try:
        res["query_empty"] = await query_times(nc, p["idle_queries"])  # no executor: no-responders ends it
        catalog = Catalog(nc)
        await catalog.start()
        res["inprocess"] = await phase_inprocess(nats_url, backend_url, catalog, p["visible_n"], log)
        res["processes"] = await phase_processes(procs, tmp, nats_url, backend_url, catalog, p, other_cpus, log)
        # One real executor listening: how long a new client's first catalogue takes (one idle gap).
        name = "disc-exec-query"
        proc = procs.start(name, executor_argv(tmp, name, nats_url, backend_url), cpus=other_cpus)
        if not await wait_listed(catalog, name, 30):
            raise RuntimeError(f"{name} never appeared\n{procs.log_tail(name)}")
        res["query_one"] = await query_times(nc, p["idle_queries"])
        procs.stop(proc)
        res["sizes_one_model"] = {k: {"payload": a, "headers": b, "wire": c} for k, (a, b, c) in tap.sizes.items()}
        await tap_sub.unsubscribe()
        await catalog.stop()
        res["simulated"] = await phase_simulated(procs, nats_url, mport, nats_pid, p, (client_cpus, other_cpus), log)
    finally:
        await nc.close()
    ours = {pid for _, pr in procs.started for pid in tree(pr.pid)} | {os.getpid()}
    res["conditions_after"] = await asyncio.to_thread(foreign_load, ours)
    log(f"load after: {res['conditions_after']}")
    return res


def source_digests() -> dict[str, str]:
    """Which discovery code was measured (the working tree may differ from any commit)."""
    import hashlib

    files = ["protocol/catalog.py", "protocol/announcements.py", "protocol/identity.py", "executor/catalog/announcer.py"]
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files if (ROOT / f).exists()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from executor.process.embedded_nats import find_nats_server

    out = {"python": sys.version.split()[0]}
    try:  # read-only: which code was measured
        out["lloom commit"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        out["lloom commit"] = "unknown"
    for dist in ("nats-py", "msgspec", "pynacl", "nkeys", "uvloop"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["nats-server"] = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True,
                                            timeout=10).stdout.strip().removeprefix("nats-server: ")  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        out["nats-server"] = "unknown"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark network discovery: visibility, expiry, 1,000 executors.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick", help="under a minute")
    g.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="seconds; checks the harness only")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "discovery.md", help="markdown report to write")
    ap.add_argument("--quiet", action="store_true")
    # Internal: the benchmark's own child processes.
    ap.add_argument("--worker", choices=["simulate", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--nats", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--window", type=float, default=5.0, help=argparse.SUPPRESS)
    ap.add_argument("--profile", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--queries", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "simulate":
        try:
            import uvloop  # as the executor process does

            uvloop.run(worker_simulate(args))
        except ImportError:
            asyncio.run(worker_simulate(args))
        return 0
    if args.worker == "client":
        asyncio.run(worker_client(args))
        return 0
    args.mode = args.mode or "full"
    log = Progress(args.quiet)
    with tempfile.TemporaryDirectory(prefix="lloom-bench-discovery-") as tmp_s:
        tmp = Path(tmp_s)
        procs = Procs(tmp)
        res = run_all_stopped(amain(args, procs, tmp, log), procs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(res, args.out)
    for line in goal_lines(res):
        print(line)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
