"""The measured phases: who runs when, and what the OS says each process spent on it.

Paths run in round-robin batches (the order rotating each round), so that any
drift of the machine (thermal, a noisy neighbour) hits every path alike. Around
every batch the CPU time of every child (and of this process, the load
generator) is read from /proc, so per-request CPU is attributed to exactly the
requests of that batch.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchkit import env, profile
from benchkit.paths import Batch, ExecutorPath, HttpPath, closed_loop, open_loop
from benchkit.procs import cpu_seconds, pin, rss_mb, self_cpu_seconds

SAT_CONCURRENCY = 32


def make_paths(backend_url: str, nats_url: str) -> dict:
    return {"direct": HttpPath("direct", backend_url), "executor": ExecutorPath(nats_url)}


def make_gateway_path(url: str) -> HttpPath:
    """HTTP client -> lloom-gateway -> NATS -> executor -> backend (OpenAI's wire, like direct and LiteLLM)."""
    return HttpPath("gateway", url)


def make_litellm_path(url: str) -> HttpPath:
    return HttpPath("litellm", url, api_key=env.MASTER_KEY)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(b: Batch, cpu: dict[str, float]) -> dict:
    n = b.ok
    out = {
        "n": b.ok, "errors": b.errors, "wall_s": b.wall, "rps": b.ok / b.wall if b.wall else 0.0,
        "p50_ms": pct(b.latencies, 0.5) * 1e3, "p90_ms": pct(b.latencies, 0.9) * 1e3, "p99_ms": pct(b.latencies, 0.99) * 1e3,
        "cpu_us": {k: v * 1e6 / n for k, v in cpu.items()} if n else {},
        "util": {k: v / b.wall for k, v in cpu.items()} if b.wall else {},
    }  # fmt: skip
    if b.ttfts:
        out |= {"ttft_p50_ms": pct(b.ttfts, 0.5) * 1e3, "ttft_p99_ms": pct(b.ttfts, 0.99) * 1e3}
    if b.chunks:
        out |= {"chunks": b.chunks, "chunks_per_s": b.chunks / b.wall if b.wall else 0.0}
    if b.lag_p99:
        out["lag_p99_ms"] = b.lag_p99 * 1e3
    if b.first_error:
        out["first_error"] = b.first_error
    return out


def receipts_ab(sat: dict, sigs: list[str], off_receipts: dict[str, int]) -> dict:
    """Receipts on (the `executor` path) vs off (`executor-noreceipts`) at saturation, per request."""
    on, off = sat["executor"], sat.get("executor-noreceipts")
    if off is None:
        return {"status": "not measured"}
    on_us, off_us = on["cpu_us"].get("executor", 0.0), off["cpu_us"].get("executor-noreceipts", 0.0)
    on_nats, off_nats = on["cpu_us"].get("nats-server", 0.0), off["cpu_us"].get("nats-server", 0.0)
    cost = on_us - off_us
    return {
        "status": "measured",
        "executor_cpu_us": {"on": on_us, "off": off_us}, "nats_cpu_us": {"on": on_nats, "off": off_nats},
        "rps": {"on": on["rps"], "off": off["rps"]}, "p99_ms": {"on": on["p99_ms"], "off": off["p99_ms"]},
        "cost_us": cost, "cost_share_of_off": cost / off_us if off_us else None,
        "nats_cost_us": on_nats - off_nats,
        "receipts_sampled": len(sigs), "signatures": len(set(sigs)),
        "receipts_per_signature": len(sigs) / len(set(sigs)) if sigs else None,
        "receipts_returned_with_receipts_off": sum(off_receipts.values()),
    }  # fmt: skip


class Runner:
    def __init__(
        self, paths: dict, pids: dict[str, int], params: dict, log: Callable[[str], None],
        cpus: tuple[set[int] | None, set[int] | None] = (None, None), ab_paths: dict | None = None,
    ) -> None:  # fmt: skip
        self.relay_cpus, self.harness_cpus = cpus
        self.paths = paths
        self.ab_paths = ab_paths or {}  # joins the saturation phase only (the receipts A/B)
        self.pids = pids
        self.p = params
        self.log = log

    def cpu(self) -> dict[str, float]:
        snap = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        snap["generator"] = self_cpu_seconds()
        return snap

    async def measured(self, coro: Awaitable[Batch], path: object = None) -> tuple[Batch, dict[str, float]]:
        before = self.cpu()
        batch = await coro
        settle = getattr(path, "settle", None)
        if settle is not None:
            await settle()  # e.g. the receipts of this batch published: their CPU counts here
        after = self.cpu()
        return batch, {k: after[k] - before.get(k, 0.0) for k in after}

    async def rounds(self, label: str, make: Callable[[str, object], Awaitable[Batch] | None], n_rounds: int) -> dict:
        """Run `make(name, path)` for every path, round-robin, and merge the batches per path."""
        acc: dict[str, tuple[Batch, dict[str, float]]] = {}
        names = list(self.paths)
        for r in range(n_rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                coro = make(name, self.paths[name])
                if coro is None:
                    continue
                batch, cpu = await self.measured(coro, self.paths[name])
                if name not in acc:
                    acc[name] = (Batch(), {})
                acc[name][0].add(batch)
                for k, v in cpu.items():
                    acc[name][1][k] = acc[name][1].get(k, 0.0) + v
            done = ", ".join(f"{n} {acc[n][0].ok}" for n in names if n in acc)
            self.log(f"{label}: round {r + 1}/{n_rounds} ({done} requests)")
        for name, (b, _) in acc.items():
            if b.ok == 0:
                raise RuntimeError(f"{label}: every request on the {name} path failed: {b.first_error}")
        self.last = acc
        return {name: summary(b, cpu) for name, (b, cpu) in acc.items()}

    async def run_all(self, res: dict) -> None:
        p = self.p
        res["rss_idle_mb"] = {name: rss_mb(pid) for name, pid in self.pids.items()}
        self.log("warm-up")
        for path in [*self.paths.values(), *self.ab_paths.values()]:
            await closed_loop(path, 4, 30.0, p["warmup"])
        # A request at concurrency 1 is a serial chain, so a second core cannot speed it up; but on this
        # VM some wake-ups sent to the other vCPU arrive 2-6 ms late (about one scheduler tick), which
        # hits every multi-process path. So c=1 is measured both ways: all on one core (the software's
        # own cost; the goals use it) and with the relay on its own core (the layout of every other phase).
        self.log("concurrency 1, every process on the harness core")
        self.move_relays(self.harness_cpus)
        try:
            res["c1"] = await self.rounds("c=1 one core", lambda n, path: closed_loop(path, 1, p["c1_s"], p["c1_cap"]), p["rounds"])
        finally:
            self.move_relays(self.relay_cpus)
        res["c1_latencies_ms"] = {n: [x * 1e3 for x in b.latencies] for n, (b, _) in self.last.items()}
        self.log("concurrency 1, relay on its own core")
        res["c1_split"] = await self.rounds("c=1 split", lambda n, path: closed_loop(path, 1, p["c1_s"], p["c1_cap"]), p["rounds"])
        res["c1_split_latencies_ms"] = {n: [x * 1e3 for x in b.latencies] for n, (b, _) in self.last.items()}
        self.log(f"saturation (concurrency {SAT_CONCURRENCY}), with the receipts A/B")
        main_paths = self.paths
        # The receipts-off executor runs right after the receipts-on one in each rotation.
        self.paths = {}
        for name, path in main_paths.items():
            self.paths[name] = path
            if name == "executor":
                self.paths.update(self.ab_paths)
        sigs: list[str] = []
        main_paths["executor"].sigs = sigs
        try:
            res["sat"] = await self.rounds(
                f"c={SAT_CONCURRENCY}", lambda n, path: closed_loop(path, SAT_CONCURRENCY, p["sat_s"], p["sat_cap"]), p["rounds"]
            )
        finally:
            self.paths = main_paths
            main_paths["executor"].sigs = None
        res["sat_latencies_ms"] = {n: [x * 1e3 for x in b.latencies] for n, (b, _) in self.last.items() if n in main_paths}
        res["receipts_ab"] = receipts_ab(res["sat"], sigs, {n: x.receipts for n, x in self.ab_paths.items()})
        res["rss_loaded_mb"] = {name: rss_mb(pid) for name, pid in self.pids.items()}
        await self.half_load(res)
        res["stream"] = {}
        for n_chunks in p["stream_lens"]:
            self.log(f"streams of {n_chunks} chunks")
            ttft = await self.rounds(
                f"stream {n_chunks} c=1", lambda n, path: closed_loop(path, 1, p["ttft_s"], 2000, n_chunks), p["stream_rounds"]
            )
            thr = await self.rounds(
                f"stream {n_chunks} c={p['stream_c']}",
                lambda n, path: closed_loop(path, p["stream_c"], p["stream_s"], 20000, n_chunks), p["stream_rounds"],
            )  # fmt: skip
            for name, s in thr.items():
                s["cpu_us_per_chunk"] = {k: v / n_chunks for k, v in s["cpu_us"].items()}
            res["stream"][str(n_chunks)] = {"ttft": ttft, "throughput": thr}
        res["rss_peak_mb"] = {name: rss_mb(pid, "VmHWM") for name, pid in self.pids.items()}

    def move_relays(self, cpus: set[int] | None) -> None:
        for name in ("executor", "gateway", "litellm"):
            if name in self.pids and cpus:
                pin(self.pids[name], cpus)

    async def half_load(self, res: dict) -> None:
        """Open-loop at half of the saturation rate: the executor's rate for direct and executor,
        LiteLLM's own (far lower) rate for LiteLLM, with a direct baseline at that rate too."""
        p = self.p
        sat = res["sat"]
        rates = {"direct": 0.5 * sat["executor"]["rps"], "executor": 0.5 * sat["executor"]["rps"]}
        if "gateway" in sat:
            rates["gateway"] = 0.5 * sat["gateway"]["rps"]
        if "litellm" in sat:
            rates["litellm"] = 0.5 * sat["litellm"]["rps"]
            self.paths["direct@litellm-rate"] = self.paths["direct"]
            rates["direct@litellm-rate"] = rates["litellm"]
        self.log("half of saturation: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()))
        try:
            res["half"] = await self.rounds(
                "50% load",
                lambda n, path: open_loop(path, rates[n], max(20, min(p["half_cap"], int(rates[n] * p["half_s"])))),
                p["rounds"],
            )
        finally:
            self.paths.pop("direct@litellm-rate", None)
        for name, rate in rates.items():
            res["half"][name]["rate"] = rate


async def profile_executor(runner: Runner, pid: int, seconds: float, tmp: Path, log: Callable[[str], None],
                           concurrency: int = SAT_CONCURRENCY) -> dict:  # fmt: skip
    """py-spy samples the executor under `concurrency` closed-loop callers (not a measured phase: sampling costs CPU)."""
    spy = env.bench_tool("py-spy")
    if spy is None:
        return {"status": "skipped: py-spy is not in the bench venv (it is installed with LiteLLM)"}
    out = tmp / "executor.collapsed"
    log(f"profiling the executor with py-spy for {seconds:.0f}s at concurrency {concurrency}")
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--format", "raw",
         *(() if os.environ.get("BENCH_SPY_BLOCKING") else ("--nonblocking",)), "--full-filenames", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(0.5)
    batch = await closed_loop(runner.paths["executor"], concurrency, seconds + 0.5, 10**6)
    err = (await asyncio.to_thread(proc.communicate, None, 30))[1]
    if proc.returncode != 0 or not out.exists():
        return {"status": f"py-spy failed: {err.decode(errors='replace')[-400:]}"}
    result = profile.summarize(out.read_text())
    result["status"] = f"{batch.ok} requests sampled at 250 Hz"
    return result


async def scaling(
    runner: Runner, p: dict, start: Callable[[int], int], ready: Callable[[int], Awaitable[None]]
) -> list[dict]:
    """1, 2, 4 executors in the queue group on one model; the extra ones may use every core."""
    path = runner.paths["executor"]
    exec_pids = [runner.pids["executor"]]
    rows = []
    for n in p["scaling"]:
        while len(exec_pids) < n:
            exec_pids.append(start(len(exec_pids) + 1))
            await ready(len(exec_pids))
        await closed_loop(path, SAT_CONCURRENCY, 1.0, 200)  # the new members' pools and code paths
        before = sum(cpu_seconds(x) for x in exec_pids), cpu_seconds(runner.pids["nats-server"])
        t0 = time.perf_counter()
        batch = await closed_loop(path, SAT_CONCURRENCY, p["scale_s"], 10**6)
        after = sum(cpu_seconds(x) for x in exec_pids), cpu_seconds(runner.pids["nats-server"])
        rows.append({
            "executors": n, "rps": batch.ok / (time.perf_counter() - t0), "n": batch.ok, "errors": batch.errors,
            "p50_ms": pct(batch.latencies, 0.5) * 1e3, "p99_ms": pct(batch.latencies, 0.99) * 1e3,
            "executor_cpu_us": (after[0] - before[0]) * 1e6 / max(1, batch.ok),
            "nats_cpu_us": (after[1] - before[1]) * 1e6 / max(1, batch.ok),
        })  # fmt: skip
        runner.log(f"scaling: {n} executor(s): {rows[-1]['rps']:.0f} req/s")
    return rows
