"""What the durable queue costs: `submit` + `result` against a plain `complete`, same executor, same run.

    .venv/bin/python scripts/bench_queue.py            # about 40 s
    .venv/bin/python scripts/bench_queue.py --quick    # seconds; checks the harness

One nats-server with JetStream (file store, `sync_interval: always`, as the
embedded server runs it), the benchmark backend, and one `lloom-executor` with
`[executors.queue] consume_all = true` and receipts off (so what differs is the
queue). Closed loops at concurrency 1 and 32, the two paths interleaved in
rotating order, two rounds each: `complete()` (core NATS request/reply) and
`submit()` then `result()` (the job stored in LLOOM_JOBS, pulled by the
executor, its result stored in LLOOM_RESULTS and watched by the client).
Results: docs/queue.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import env  # noqa: E402
from benchkit.harness import start_fast_backend  # noqa: E402
from benchkit.phases import pct  # noqa: E402
from benchkit.procs import Procs, run_in_tempdir  # noqa: E402

from executor.process.embedded_nats import EmbeddedNats  # noqa: E402
from protocol.client import LloomClient  # noqa: E402
from protocol.trust import Trust  # noqa: E402
from protocol.messages import ChatRequest, Message, Role  # noqa: E402

MODEL = "bench-model"


def start_executor(procs: Procs, tmp: Path, backend_url: str, nats_url: str) -> None:
    cfg = tmp / "executor.toml"
    cfg.write_text(
        f'[node]\nid = "bench-queue"\nmax_concurrent_jobs = 256\n\n'
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{backend_url}"\nmodels = ["{MODEL}"]\n\n'
        '[receipts]\nenabled = false\n\n[cache]\nenabled = false\n\n'
        "[executors.queue]\nconsume_all = true\n\n"
        '[logging]\nformat = "json"\n'
    )
    exe = Path(sys.executable).parent / "lloom-executor"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.runtime.cli"]
    procs.start("executor", [*argv, "--config", str(cfg), "--nats", nats_url])


async def one_direct(client: LloomClient, request: ChatRequest) -> None:
    await client.complete(request)


async def one_queued(client: LloomClient, request: ChatRequest) -> None:
    await client.result(await client.submit(request), timeout=60)


PATHS = {"complete": one_direct, "submit+result": one_queued}


async def closed_loop(client: LloomClient, path: str, concurrency: int, seconds: float) -> list[float]:
    request = ChatRequest(model=MODEL, messages=[Message(Role.USER, "Say hello, and tell me about the weather.")])
    run = PATHS[path]
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await run(client, request)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict:
    async with EmbeddedNats(jetstream=True, store_dir=str(tmp / "js")) as nats:
        start_executor(procs, tmp, (await start_fast_backend(procs))[0], nats.url)
        # Its executors issue no receipts (what differs must be the feature measured): nothing to verify.
        async with await LloomClient.connect(nats.url, timeout=60, trust=Trust(verify=False)) as client:
            for _ in range(300):
                try:
                    await client.complete(ChatRequest(model=MODEL, messages=[Message(Role.USER, "hi")]), timeout=2)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            await one_queued(client, ChatRequest(model=MODEL, messages=[Message(Role.USER, "warm up")]))
            out: dict = {"machine": env.machine(), "concurrency": {}}
            for c in args.concurrency:
                acc: dict[str, dict] = {p: {"lat": [], "seconds": 0.0} for p in PATHS}
                order = list(PATHS)
                for rnd in range(args.rounds):
                    for path in order[rnd % 2:] + order[: rnd % 2]:
                        t0 = time.perf_counter()
                        acc[path]["lat"] += await closed_loop(client, path, c, args.seconds)
                        acc[path]["seconds"] += time.perf_counter() - t0
                row = {p: {"jobs_per_s": len(a["lat"]) / a["seconds"], "p50_ms": pct(a["lat"], 0.5) * 1e3,
                           "p99_ms": pct(a["lat"], 0.99) * 1e3, "jobs": len(a["lat"])} for p, a in acc.items()}  # fmt: skip
                out["concurrency"][str(c)] = row
                d, q = row["complete"], row["submit+result"]
                print(f"c={c:>3}: complete {d['jobs_per_s']:7.0f} jobs/s p50 {d['p50_ms']:6.2f} ms | "
                      f"submit+result {q['jobs_per_s']:7.0f} jobs/s p50 {q['p50_ms']:6.2f} ms", flush=True)  # fmt: skip
            return out


def render(res: dict) -> str:
    L = ["| concurrency | path | jobs/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for c, row in res["concurrency"].items():
        for path, r in row.items():
            L.append(f"| {c} | {path} | {r['jobs_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds: checks the harness")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    args.rounds = 1 if args.quick else 2
    args.seconds = 0.5 if args.quick else 5.0
    args.concurrency = [1, 8] if args.quick else [1, 32]
    res = run_in_tempdir("lloom-bench-queue-", lambda procs, tmp: amain(args, procs, tmp))
    print(render(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
