"""Real model, several slots: streamed chat through the executor vs straight to the same llama-server.

Starts the project's `llama-server` build with SmolLM2-135M-Instruct and `--parallel N`
slots (continuous batching), a `nats-server`, and one `lloom-executor` with
`[llm_client] backend = "llamacpp"` pointed at that server, receipts on (the default).
Then, for each concurrency, it runs the same streamed request (fixed prompt,
max_tokens, temperature 0, a seed, `cache = false`) in rounds that alternate the two
paths (A B, then B A, ...) so the machine's drift hits both alike:

- direct: aiohttp, OpenAI SSE, straight to llama-server;
- executor: `LloomClient.stream` -> NATS -> executor -> the same llama-server.

Per path and concurrency it reports aggregate completion tokens/s (sum of `usage`
over wall time), TTFT (to the first content chunk) p50/p90 and request latency p50,
and checks issue #20's goals: tokens/s via the executor >= 0.97x direct and added
TTFT p50 <= 1 ms. Prints a Markdown report; `--json` writes the figures.

    .venv/bin/python scripts/bench_local_model.py            # c = 1, 4, 8; about 3-4 minutes on 2 cores
    .venv/bin/python scripts/bench_local_model.py --smoke    # c = 1, 2, a few short requests (the test)

Needs `lloom-executor setup-local` (the llama-server build and the model in ~/.cache/lloom).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import start_nats  # noqa: E402
from benchkit import env  # noqa: E402
from benchkit.procs import Procs, cpu_seconds, run_in_tempdir  # noqa: E402

from executor.backends import llama_build, local_models  # noqa: E402
from executor.backends.local import LocalModelServer  # noqa: E402
from protocol.client import LloomClient  # noqa: E402
from protocol.errors import LloomError  # noqa: E402
from protocol.messages import ChatRequest, Message, Role  # noqa: E402

MODEL = local_models.DEFAULT.name
PROMPT = "Tell me a long story about a dragon who guards a library."
SEED = 42
TTFT_GOAL_MS = 1.0
TPS_GOAL = 0.97

MODES = {
    # per_worker: requests each of the c concurrent workers sends per batch (one batch per path per round)
    "full": dict(concurrency=[1, 4, 8], rounds=4, per_worker=2, max_tokens=128, slots=8),
    "smoke": dict(concurrency=[1, 2], rounds=1, per_worker=1, max_tokens=8, slots=2),
}


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


@dataclass
class Series:
    """One path at one concurrency, summed over rounds."""

    wall: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    def tps(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall if self.wall else 0.0


def pct_ms(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] * 1000 if xs else float("nan")
    return (statistics.median(xs) if q == 50 else statistics.quantiles(xs, n=100, method="inclusive")[q - 1]) * 1000


class Direct:
    """OpenAI SSE over aiohttp, as any HTTP client of llama-server would read it."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, max_tokens: int) -> None:
        self.http = http
        self.url = f"{base_url}/v1/chat/completions"
        self.body = msgspec.json.encode({
            "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "seed": SEED, "stream": True, "stream_options": {"include_usage": True},
        })  # fmt: skip
        self.reconnects = 0

    async def one(self) -> Sample:
        # A pooled connection llama-server closed while idle (its keep-alive is 5 s) fails before
        # anything is sent: retried at once, timed from the retry, counted in the report.
        for _ in range(3):
            try:
                return await self._one()
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                self.reconnects += 1
        return await self._one()

    async def _one(self) -> Sample:
        t0 = time.perf_counter()
        ttft, tokens = 0.0, 0
        async with self.http.post(self.url, data=self.body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                raise RuntimeError(f"direct: HTTP {r.status}: {(await r.read())[:200]!r}")
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue  # read on to the end of the body, so the connection goes back to the pool
                chunk = msgspec.json.decode(data)
                choices = chunk.get("choices")
                if not ttft and choices and choices[0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if not ttft or not tokens:
            raise RuntimeError("direct: a stream without content or without usage")
        return Sample(ttft, time.perf_counter() - t0, tokens)


class ViaExecutor:
    """LloomClient.stream -> NATS -> executor -> llama-server; the client verifies each receipt (the default)."""

    def __init__(self, client: LloomClient, max_tokens: int) -> None:
        self.client = client
        self.request = ChatRequest(model=MODEL, messages=[Message(Role.USER, PROMPT)], max_tokens=max_tokens,
                                   temperature=0, seed=SEED, cache=False, stream=True)  # fmt: skip

    async def one(self) -> Sample:
        t0 = time.perf_counter()
        ttft = 0.0
        async with self.client.stream(self.request) as s:
            async for chunk in s:
                if not ttft and chunk.delta:
                    ttft = time.perf_counter() - t0
        if not ttft or s.end is None or s.end.receipt is None:
            raise RuntimeError("executor: a stream without content or without a receipt")
        return Sample(ttft, time.perf_counter() - t0, s.end.usage.completion_tokens)


async def batch(one: Callable[[], Awaitable[Sample]], concurrency: int, n: int, into: Series) -> None:
    """`n` requests from `concurrency` closed-loop workers; wall time from the first send to the last end."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            into.samples.append(await one())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    into.wall += time.perf_counter() - t0


async def wait_served(client: LloomClient, via: ViaExecutor, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            await via.one()
            return
        except LloomError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


def start_executor(procs: Procs, tmp: Path, llama_url: str, nats_url: str) -> int:
    cfg = tmp / "executor.toml"
    cfg.write_text(
        f'[node]\nid = "bench-local"\nnats_url = "{nats_url}"\nidentity_file = "{tmp / "executor.nk"}"\n\n'
        f'[llm_client]\nbackend = "llamacpp"\nbase_url = "{llama_url}/v1"\ntimeout_secs = 120\n\n'
        f'[receipts]\noutbox_dir = "{tmp / "outbox"}"\n\n[logging]\nformat = "json"\n'
    )
    exe = Path(sys.executable).parent / "lloom-executor"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.runtime.cli"]
    return procs.start("executor", [*argv, "--config", str(cfg), "--nats", nats_url]).pid


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f})"


async def amain(a: argparse.Namespace, procs: Procs, tmp: Path) -> dict:
    m = MODES["smoke" if a.smoke else "full"]
    slots = a.slots or m["slots"]
    threads = a.threads or max(1, (os.cpu_count() or 1) - 1)
    binary = llama_build.find_llama_server(None)
    gguf = local_models.ready_path(local_models.DEFAULT)
    res: dict = {"params": {**m, "slots": slots, "threads": threads, "ctx_per_slot": a.ctx_per_slot,
                            "binary": str(binary), "model": MODEL, "prompt": PROMPT, "seed": SEED},
                 "machine": env.machine(), "load_before": load(), "rows": []}  # fmt: skip
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    began = time.perf_counter()
    # Idle connections dropped after 1 s, before llama-server drops them (5 s): the direct path's
    # pool goes cold while the executor's batch runs, so each batch may open fresh connections.
    connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=1.0)
    async with aiohttp.ClientSession(connector=connector) as http:
        args = ["--model", str(gguf), "--alias", MODEL, "--no-webui", "--jinja", "--parallel", str(slots),
                "--ctx-size", str(slots * a.ctx_per_slot), "--threads", str(threads),
                # cpp-httplib holds a thread per keep-alive connection: room for both paths' pools
                # (the default, slots + 2, leaves new connections queued behind the other path's idle ones).
                "--threads-http", str(4 * slots + 4)]  # fmt: skip
        server = LocalModelServer(binary, args, session=http)
        await server.start()
        try:
            nats_url, nats_pid = await start_nats(procs, None, tmp)
            exec_pid = start_executor(procs, tmp, server.base_url, nats_url)
            async with await LloomClient.connect(nats_url, timeout=120) as client:
                direct, via = Direct(http, server.base_url, m["max_tokens"]), ViaExecutor(client, m["max_tokens"])
                await wait_served(client, via)
                cmax = max(m["concurrency"])  # warm both paths' connections and every slot
                await batch(direct.one, cmax, cmax, Series())
                await batch(via.one, cmax, cmax, Series())
                cpu0 = {p: cpu_seconds(p) for p in (exec_pid, nats_pid, server.pid)}
                via_requests = 0
                for c in m["concurrency"]:
                    d, e = Series(), Series()
                    n = c * m["per_worker"]
                    for r in range(m["rounds"]):
                        order = [(direct, d), (via, e)] if r % 2 == 0 else [(via, e), (direct, d)]
                        for path, into in order:
                            await batch(path.one, c, n, into)
                    via_requests += len(e.samples)
                    row = {"c": c, "requests": len(d.samples), "tps_direct": d.tps(), "tps_executor": e.tps()}
                    for name, s in (("direct", d), ("executor", e)):
                        ttft = [x.ttft for x in s.samples]
                        lat = [x.latency for x in s.samples]
                        row |= {f"ttft_p50_{name}": pct_ms(ttft, 50), f"ttft_p90_{name}": pct_ms(ttft, 90),
                                f"lat_p50_{name}": pct_ms(lat, 50), f"tokens_{name}": sum(x.tokens for x in s.samples)}  # fmt: skip
                    row["ratio"] = row["tps_executor"] / row["tps_direct"]
                    row["added_ttft_p50"] = row["ttft_p50_executor"] - row["ttft_p50_direct"]
                    row["pass_tps"] = row["ratio"] >= TPS_GOAL
                    row["pass_ttft"] = row["added_ttft_p50"] <= TTFT_GOAL_MS
                    res["rows"].append(row)
                    log(f"c={c}: {row['tps_direct']:.1f} / {row['tps_executor']:.1f} tok/s, "
                        f"added TTFT p50 {row['added_ttft_p50']:+.2f} ms")  # fmt: skip
                cpu = {p: cpu_seconds(p) - cpu0[p] for p in cpu0}
                res["cpu_s"] = {"executor": cpu[exec_pid], "nats": cpu[nats_pid], "llama": cpu[server.pid]}
                res["direct_reconnects"] = direct.reconnects
                res["executor_cpu_ms_per_request"] = cpu[exec_pid] / via_requests * 1000 if via_requests else None
        finally:
            await server.stop()
    res["seconds"] = time.perf_counter() - began
    res["load_after"] = load()
    return res


def render(res: dict, command: str) -> str:
    p = res["params"]
    L = [
        f"`{command}`: SmolLM2-135M-Instruct (Q4_1), llama-server `--parallel {p['slots']}` "
        f"(context {p['ctx_per_slot']} per slot), `--threads {p['threads']}`, prompt \"{p['prompt']}\", "
        f"max_tokens {p['max_tokens']}, temperature 0, seed {p['seed']}; {p['rounds']} rounds per concurrency, "
        f"each {p['per_worker']} request(s) per worker per path, paths alternating. "
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; load average before "
        f"{res['load_before']}, after {res['load_after']}; run took {res['seconds']:.0f} s.",
        "",
        "| c | requests per path | tok/s direct | tok/s executor | ratio | TTFT p50 direct / executor (ms) | "
        "added TTFT p50 (ms) | TTFT p90 direct / executor (ms) | latency p50 direct / executor (ms) | goals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        goals = f"tok/s {'PASS' if r['pass_tps'] else 'MISS'}, TTFT {'PASS' if r['pass_ttft'] else 'MISS'}"
        L.append(
            f"| {r['c']} | {r['requests']} | {r['tps_direct']:.1f} | {r['tps_executor']:.1f} | {r['ratio']:.3f} | "
            f"{r['ttft_p50_direct']:.1f} / {r['ttft_p50_executor']:.1f} | {r['added_ttft_p50']:+.2f} | "
            f"{r['ttft_p90_direct']:.1f} / {r['ttft_p90_executor']:.1f} | "
            f"{r['lat_p50_direct']:.0f} / {r['lat_p50_executor']:.0f} | {goals} |"
        )
    cpu = res.get("cpu_s", {})
    if cpu:
        L += ["", f"CPU over the measured batches: llama-server {cpu['llama']:.1f} s, executor {cpu['executor']:.2f} s "
                  f"({res['executor_cpu_ms_per_request']:.2f} ms per request through it), nats-server {cpu['nats']:.2f} s. "
                  f"Direct requests retried on a connection llama-server had closed: {res['direct_reconnects']}."]  # fmt: skip
    L += ["", "Goals (issue #20): tok/s via the executor >= 0.97x direct; added TTFT p50 <= 1 ms."]
    for r in res["rows"]:
        L.append(f"- c={r['c']}: ratio {r['ratio']:.3f} {'PASS' if r['pass_tps'] else 'MISS'}; "
                 f"added TTFT p50 {r['added_ttft_p50']:+.2f} ms {'PASS' if r['pass_ttft'] else 'MISS'}")  # fmt: skip
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="c = 1 and 2, a few short requests")
    ap.add_argument("--slots", type=int, help="llama-server --parallel (default 8; smoke 2)")
    ap.add_argument("--ctx-per-slot", type=int, default=512, help="context per slot (prompt ~40 + max_tokens)")
    ap.add_argument("--threads", type=int, help="llama-server --threads (default: cores - 1, as the executor)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    res = run_in_tempdir("lloom-bench-local-", lambda procs, tmp: amain(a, procs, tmp))
    print(render(res, "scripts/bench_local_model.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
