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
import gc
import json
import math
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
from benchkit.procs import Procs, cpu_seconds, pin, rss_mb, run_all_stopped, tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

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


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summary_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": pct(ms, 0.5), "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99), "max_ms": max(ms),
            "min_ms": min(ms)}  # fmt: skip


def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """The measuring client alone on one core; broker, backend, executors and the simulator on the other."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


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


async def start_backend(procs: Procs, cpus: set[int] | None) -> str:
    argv = [sys.executable, str(ROOT / "scripts" / "fast_openai_server.py"), "--port", "0"]
    for c in sorted(cpus or []):
        argv += ["--cpu", str(c)]
    proc = procs.start("backend", argv, stdout_pipe=True)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
    if not line.startswith(b"READY "):
        raise RuntimeError(f"backend did not start: {line!r}\n{procs.log_tail('backend')}")
    return f"http://127.0.0.1:{int(line.split()[1])}/v1"


async def start_nats(procs: Procs, cpus: set[int] | None) -> tuple[str, int, int]:
    from executor.embedded_nats import find_nats_server, free_port

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
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.cli"]
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

    from executor.announcer import Announcer
    from executor.backends.openai_compat import OpenAICompatibleBackend
    from executor.config import NodeConfig
    from executor.node import ExecutorNode
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


class StubNode:
    """What `Announcer` reads of an `ExecutorNode`, without subscriptions or a backend."""

    def __init__(self, executor_id: str, models: list[str]) -> None:
        from executor.config import NodeConfig
        from executor.perf import PerfTracker

        self.id = executor_id
        self.models = frozenset(models)
        self.model_info: dict = {}
        self.perf = PerfTracker()
        for m in models:  # realistic announcements carry measured performance
            self.perf.record(m, ok=True, seconds=1.2, completion_tokens=128, ttft_s=0.15)
        self.on_models_changed: list = []
        self.backend_healthy = True
        self.backend_kind = "openai_compatible"
        self.in_flight = 0
        self.config = NodeConfig()

    def model_available(self, model: str) -> bool:
        return True


def _patient_catalog_class():  # type: ignore[no-untyped-def]
    """The catalogue whose first query waits for the first answer: the product's `Catalog` since e946c9d."""
    from protocol.catalog import Catalog

    return Catalog


async def worker_simulate(a: argparse.Namespace) -> None:
    from decimal import Decimal

    import nats

    from executor.announcer import Announcer
    from executor.config import ModelConfig
    from protocol.identity import Identity

    cfgs = [ModelConfig(name=m, input_price=Decimal(i), output_price=Decimal(o), context_length=c, category=cat)  # type: ignore[arg-type]
            for m, i, o, c, cat in SIM_MODELS]  # fmt: skip
    conns = [await nats.connect(a.nats) for _ in range(max(1, min(10, a.count // 50)))]
    t0 = time.perf_counter()
    announcers = []
    for i in range(a.count):
        node = StubNode(f"sim-{i:05d}", [c.name for c in cfgs])
        ann = Announcer(conns[i % len(conns)], node, Identity.generate(), models=cfgs, heartbeat_interval=HEARTBEAT_S)  # type: ignore[arg-type]
        await ann.start()
        announcers.append(ann)
    for c in conns:
        await c.flush()
    print("READY " + json.dumps({"setup_s": time.perf_counter() - t0}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with asyncio.timeout(600):  # bounded even if the parent forgets it
            await stop.wait()
    except TimeoutError:
        pass
    for c in conns:
        await c.close()


async def worker_client(a: argparse.Namespace) -> None:
    import cProfile
    import pstats
    import tracemalloc

    import nats

    from protocol.catalog import Catalog

    PatientCatalog = _patient_catalog_class()  # noqa: N806
    nc = await nats.connect(a.nats)
    gc.collect()
    rss0 = rss_mb(os.getpid())
    queries, keep = [], None
    count = 0

    for q in range(a.queries):
        c = Catalog(nc)
        if q == 0:  # counts what the kept catalogue receives on the announce subject
            orig_on = c._on_message

            async def counting(msg, orig_on=orig_on):  # type: ignore[no-untyped-def]
                nonlocal count
                count += 1
                await orig_on(msg)

            c._on_message = counting  # type: ignore[method-assign]
        stamps: list[float] = []
        orig = c._accept

        def accept(msg, orig=orig, stamps=stamps, **kw):  # type: ignore[no-untyped-def]
            if msg.subject != "lloom.v1.catalog.announce":  # a query answer, not a broadcast
                stamps.append(time.perf_counter())
            orig(msg, **kw)

        c._accept = accept  # type: ignore[method-assign]
        cpu0, t0 = time.process_time(), time.perf_counter()
        await c.start()
        t1, cpu1 = time.perf_counter(), time.process_time()
        c._accept = orig  # type: ignore[method-assign]
        queries.append({"ms": (t1 - t0) * 1000, "entries": len(c.entries()), "answers": len(stamps),
                        "first_ms": (stamps[0] - t0) * 1000 if stamps else None,
                        "last_ms": (stamps[-1] - t0) * 1000 if stamps else None,
                        "cpu_ms": (cpu1 - cpu0) * 1000})  # fmt: skip
        queries[-1]["rejected_by_then"] = dict(c.rejected)
        # The shipped catalogue fills up from heartbeats (and info requests) if the query missed executors.
        while len(c.entries()) < a.count and time.perf_counter() - t0 < 10:
            await c.wait_changed(timeout=0.1)
        queries[-1]["complete_ms"] = (time.perf_counter() - t0) * 1000 if len(c.entries()) >= a.count else None
        if q == 0:
            keep = c
            gc.collect()
            rss1 = rss_mb(os.getpid())
        else:
            await c.stop()
    assert keep is not None
    await asyncio.sleep(1.0)  # past the later queries' answers
    sizes: list[int] = []
    count = 0
    c0, t0 = time.process_time(), time.perf_counter()
    end = t0 + a.window
    while time.perf_counter() < end:
        sizes.append(len(keep.entries()))
        await asyncio.sleep(0.1)
    c1, t1 = time.process_time(), time.perf_counter()
    window = {"seconds": t1 - t0, "msgs": count, "msgs_per_s": count / (t1 - t0), "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
              "cpu_us_per_msg": 1e6 * (c1 - c0) / count if count else None, "min_entries": min(sizes),
              "max_entries": max(sizes), "rejected": dict(keep.rejected)}  # fmt: skip
    profile = None
    if a.profile > 0:
        prof = cProfile.Profile()
        prof.enable()
        await asyncio.sleep(a.profile)
        prof.disable()
        st = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in st.values()) or 1.0
        top = sorted(st.items(), key=lambda kv: -kv[1][2])[:8]
        focus = {}
        for (file, _line, func), (_cc, _nc, tt, ct, _callers) in st.items():
            if func in ("verify", "_raw_public_key", "open_signed", "_check_fresh", "_accept", "entries") and ("protocol" in file):
                focus[func] = round(100 * ct / total, 1)
        profile = {"top_tottime": [{"func": f"{Path(k[0]).name}:{k[2]}", "pct": round(100 * v[2] / total, 1)} for k, v in top],
                   "cumulative_pct": focus}  # fmt: skip
    # A variant of the query that waits for the *first* answer up to the query timeout (no-responders
    # still ends an empty network at once), then applies the idle gap between answers.
    patient = []
    for _ in range(a.queries):
        c = PatientCatalog(nc)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await c.start()
        t1, cpu1 = time.perf_counter(), time.process_time()
        patient.append({"ms": (t1 - t0) * 1000, "entries": len(c.entries()), "cpu_ms": (cpu1 - cpu0) * 1000,
                        "rejected": dict(c.rejected)})  # fmt: skip
        await c.stop()
    # The catalogue's own heap: a fresh one, traced.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    traced = Catalog(nc)
    await traced.start()
    t0 = time.perf_counter()
    while len(traced.entries()) < a.count and time.perf_counter() - t0 < 10:
        await traced.wait_changed(timeout=0.1)
    gc.collect()
    entries_traced = len(traced.entries())
    heap = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    await traced.stop()
    await keep.stop()
    await nc.close()
    result = {"queries": queries, "patient": patient, "rss_before_mb": rss0, "rss_after_mb": rss1, "heap_kib": heap / 1024,
              "heap_entries": entries_traced, "window": window, "profile": profile}  # fmt: skip
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


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
    backend_url = await start_backend(procs, other_cpus)
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

    files = ["protocol/catalog.py", "protocol/announcements.py", "protocol/identity.py", "executor/announcer.py"]
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files if (ROOT / f).exists()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from executor.embedded_nats import find_nats_server

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


# ---------------------------------------------------------------- report


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
