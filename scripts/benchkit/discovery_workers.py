"""The discovery benchmark's child processes: 1,000 simulated executors, and the measuring client.

Both run as `bench_discovery.py --worker simulate|client` so that their CPU and memory are
their own (read from /proc by the harness).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

from benchkit.discovery_common import HEARTBEAT_S, SIM_MODELS
from benchkit.procs import rss_mb


class StubNode:
    """What `Announcer` reads of an `ExecutorNode`, without subscriptions or a backend."""

    def __init__(self, executor_id: str, models: list[str]) -> None:
        from executor.config import NodeConfig
        from executor.catalog.perf import PerfTracker
        from protocol.sealing import CurveKeyPair

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
        # Real executors announce a curve key for sealed jobs: the stub's announcements are as long.
        self.curve = CurveKeyPair.generate()

    def model_available(self, model: str) -> bool:
        return True


async def worker_simulate(a: argparse.Namespace) -> None:
    from decimal import Decimal

    import nats

    from executor.catalog.announcer import Announcer
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
        c = Catalog(nc)
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
