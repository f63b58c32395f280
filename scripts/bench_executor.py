"""The executor's own cost, narrowly: LloomClient -> NATS -> lloom-executor -> backend, receipts on and off.

    .venv/bin/python scripts/bench_executor.py                       # this checkout's executor
    .venv/bin/python scripts/bench_executor.py --baseline main       # and main's executor, same run, A/B
    .venv/bin/python scripts/bench_executor.py --ref B --baseline A  # one commit's lever: A vs B
    .venv/bin/python scripts/bench_executor.py --profile 8           # and py-spy at c=32 for 8 s

What scripts/bench.py measures for the `executor` path (added latency at c=1 over direct with every
process on one core, CPU per request of the executor and nats-server at c=32, receipts on and off)
without its other phases, so each lever of issue #20 is judged in a minute or two. With `--baseline
REF` a second pair of executors runs the code of git ref REF (exported to a temp dir) against the
same nats-server and backend, each executor serving its own model name, and the paths alternate in
rounds so the machine's noise hits them alike. After each batch of a receipts-on path the harness
waits until JetStream holds that executor's last receipt, so publishing is charged to the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import outbox_settler, start_nats, wait_executor  # noqa: E402
from bench_gateway import export  # noqa: E402
from benchkit import phases  # noqa: E402
from benchkit.harness import Progress, cpu_plan, start_fast_backend  # noqa: E402
from benchkit.paths import ExecutorPath, HttpPath, closed_loop  # noqa: E402
from benchkit.procs import Procs, pin, run_in_temp_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def start_executor(procs: Procs, tmp: Path, name: str, backend_url: str, nats_url: str, cpus: set[int] | None,
                   *, receipts: bool, code: Path | None, receipts_toml: str = "", cprofile: Path | None = None,
                   python: str = sys.executable) -> int:  # fmt: skip
    cfg = tmp / f"{name}.toml"
    cfg.write_text(
        f'[node]\nid = "bench-exec-{name}"\nnats_url = "{nats_url}"\nidentity_file = "{tmp / f"{name}.nk"}"\n\n'
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{backend_url}"\nmodels = ["model-{name}"]\n\n'
        f'[receipts]\nenabled = {"true" if receipts else "false"}\noutbox_dir = "{tmp / f"outbox-{name}"}"\n{receipts_toml}\n\n'
        '[logging]\nformat = "json"\n'
    )
    tree = code or ROOT
    module = "executor.runtime.cli" if (tree / "executor" / "runtime" / "cli.py").exists() else "executor.cli"  # older layout
    prof = ["-m", "cProfile", "-o", str(cprofile)] if cprofile else []
    argv = [python, *prof, "-m", module, "--config", str(cfg), "--nats", nats_url]
    env = {"PYTHONPATH": str(code)} if code is not None else None
    return procs.start(name, argv, cpus=cpus, env=env, cwd=code).pid


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path, log: Progress) -> dict:
    relay_cpus, gen_cpus = cpu_plan()
    backend_url, backend_pid = await start_fast_backend(procs, gen_cpus)
    nats_url, nats_pid = await start_nats(procs, gen_cpus, tmp)
    pids = {"backend": backend_pid, "nats-server": nats_pid}
    trees = {"cand": export(args.ref, tmp / "candidate") if args.ref else None}
    if args.baseline:
        trees["base"] = export(args.baseline, tmp / "baseline")
    paths: dict[str, object] = {"direct": HttpPath("direct", backend_url)}
    executors = []
    for tag, code in trees.items():
        for receipts in (True, False) if not args.receipts_only else (True,):
            name = f"{tag}-{'on' if receipts else 'off'}"
            pids[name] = start_executor(procs, tmp, name, backend_url, nats_url, relay_cpus, receipts=receipts, code=code,
                                         receipts_toml=args.receipts_toml if tag == "cand" else "",
                                         cprofile=args.cprofile / f"{name}.prof" if args.cprofile else None,
                                         python=(args.cand_python if tag == "cand" else args.base_python) or sys.executable)  # fmt: skip
            path = ExecutorPath(nats_url, name=name, model=f"model-{name}", verify=receipts)
            if receipts:
                path.settle = outbox_settler(tmp / f"outbox-{name}", path, f"bench-exec-{name}")
            paths[name] = path
            executors.append(name)
    if gen_cpus:
        pin(os.getpid(), gen_cpus)
    for path in paths.values():
        await path.open()
    try:
        for name in executors:
            await wait_executor(paths[name].client, name, model=f"model-{name}")
        log(f"serving: {', '.join(paths)}")
        runner = phases.Runner(paths, pids, {}, log, cpus=(relay_cpus, gen_cpus))
        await runner.rounds("warm-up", lambda n, p: closed_loop(p, 8, 1.0, 500), 1)
        # c=1 with every process on the harness core, as bench.py's goals use it.
        if gen_cpus:
            for name in executors:
                pin(pids[name], gen_cpus)
        try:
            c1 = await runner.rounds("c=1", lambda n, p: closed_loop(p, 1, args.seconds if not args.c32_only else 0.2, 5000),
                                     args.rounds if not args.c32_only else 1)  # fmt: skip
        finally:
            if relay_cpus:
                for name in executors:
                    pin(pids[name], relay_cpus)
        c32 = await runner.rounds("c=32", lambda n, p: closed_loop(p, 32, args.seconds if not args.c1_only else 0.2, 50000)
                                  if n != "direct" else None, args.rounds if not args.c1_only else 1)  # fmt: skip
        res = {"c1": c1, "c32": c32}
        if args.stream:
            n = args.stream
            res["stream_ttft"] = await runner.rounds(f"stream {n} c=1", lambda name, p: closed_loop(p, 1, args.seconds, 2000, n)
                                                     if name != "direct" else None, args.rounds)  # fmt: skip
            res["stream"] = await runner.rounds(f"stream {n} c=8", lambda name, p: closed_loop(p, 8, args.seconds, 20000, n)
                                                if name != "direct" else None, args.rounds)  # fmt: skip
        if args.syscalls:
            res["syscalls"] = {}
            for name in executors:
                res["syscalls"][name] = await count_syscalls(pids[name], paths[name], args.syscalls, args.profile_concurrency)
        if args.perf:
            res["perf"] = {}
            for name in executors:
                res["perf"][name] = await perf_profile(pids[name], paths[name], args.perf, args.profile_concurrency, tmp)
        if args.profile:
            res["profile"] = {}
            for name in executors:
                if name in args.profile_paths or not args.profile_paths:
                    runner.pids["executor"] = pids[name]
                    runner.paths["executor"] = paths[name]
                    res["profile"][name] = await phases.profile_executor(runner, pids[name], args.profile, tmp, log,
                                                                         args.profile_concurrency)  # fmt: skip
                    if args.keep_profiles:  # py-spy's collapsed stacks, with line numbers, for a closer look
                        args.keep_profiles.mkdir(parents=True, exist_ok=True)
                        (tmp / "executor.collapsed").replace(args.keep_profiles / f"{name}.collapsed")
                    del runner.pids["executor"], runner.paths["executor"]
    finally:
        for path in paths.values():
            await path.close()
    if args.cprofile:  # cProfile writes its stats as the process exits: stop the executors, patiently
        for name in executors:
            os.kill(pids[name], 15)
        end = time.monotonic() + 60
        while time.monotonic() < end and not all((args.cprofile / f"{n}.prof").exists() for n in executors):
            await asyncio.sleep(0.2)
    return res


async def count_syscalls(pid: int, path: ExecutorPath, seconds: float, concurrency: int) -> str:
    """`strace -c -f` on one executor while it serves `concurrency` callers: system calls per request."""
    proc = await asyncio.create_subprocess_exec("strace", "-c", "-f", "-p", str(pid), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    await asyncio.sleep(0.5)  # attached (strace prints nothing until it detaches)
    batch = await closed_loop(path, concurrency, seconds, 10**6)
    proc.send_signal(2)
    err = (await proc.communicate())[1].decode(errors="replace")
    return f"{batch.ok} requests\n{err}"


async def perf_profile(pid: int, path: ExecutorPath, seconds: float, concurrency: int, tmp: Path) -> str:
    """`perf record` on one executor (C and kernel frames too, which py-spy cannot see), by shared object and symbol."""
    data = tmp / f"perf-{pid}.data"
    proc = await asyncio.create_subprocess_exec("perf", "record", "-e", "cpu-clock", "-F", "4000", "-p", str(pid),
                                                "-o", str(data), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    await asyncio.sleep(0.5)
    batch = await closed_loop(path, concurrency, seconds, 10**6)
    proc.send_signal(2)
    await proc.wait()
    text = [f"{batch.ok} requests"]
    for sort, limit in (("dso", "0.5"), ("dso,sym", "0.7")):
        rep = await asyncio.create_subprocess_exec("perf", "report", "-i", str(data), "--stdio", "--sort", sort,
                                                   "--percent-limit", limit, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
        out = (await rep.communicate())[0].decode(errors="replace")
        text += [x for x in out.splitlines() if x and (not x.startswith("#") or x.startswith("# Samples"))]
    return "\n".join(text)


def render(res: dict) -> list[str]:
    c1, c32 = res["c1"], res["c32"]
    d = c1["direct"]
    columns = ["path", "p50 ms c=1", "p99 ms c=1", "added p50", "added p99", "executor µs c=1", "client µs c=1",
               "nats µs c=1", "req/s c=32", "executor µs c=32", "nats µs c=32", "p99 ms c=32"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, s in c1.items():
        if name == "direct":
            client = s["cpu_us"].get("generator", 0)
            lines.append(f"| direct | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | | | | {client:.1f} | | | | | |")
            continue
        sat = c32[name]
        lines.append(
            f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['p50_ms'] - d['p50_ms']:.3f} |"
            f" {s['p99_ms'] - d['p99_ms']:.3f} | {s['cpu_us'].get(name, 0):.1f} | {s['cpu_us'].get('generator', 0):.1f} |"
            f" {s['cpu_us'].get('nats-server', 0):.1f} | {sat['rps']:,.0f} |"
            f" {sat['cpu_us'].get(name, 0):.1f} | {sat['cpu_us'].get('nats-server', 0):.1f} | {sat['p99_ms']:.2f} |"
        )
    if "stream" in res:
        lines += ["", "| path | TTFT p50 ms c=1 | chunks/s c=8 | executor µs/chunk c=8 |", "|---|---|---|---|"]
        for name, s in res["stream"].items():
            chunks = s.get("chunks", 0) or 1
            per_chunk = s["cpu_us"].get(name, 0) * s["n"] / chunks
            lines.append(f"| {name} | {res['stream_ttft'][name].get('ttft_p50_ms', 0):.3f} | {s.get('chunks_per_s', 0):,.0f} |"
                         f" {per_chunk:.2f} |")  # fmt: skip
    for tag in ("cand", "base"):
        on, off = c32.get(f"{tag}-on"), c32.get(f"{tag}-off")
        if on and off:
            cost = on["cpu_us"][f"{tag}-on"] - off["cpu_us"][f"{tag}-off"]
            lines.append(f"\n{tag}: receipt cost at c=32 {cost:.1f} µs of executor CPU per job")
    for name, text in res.get("perf", {}).items():
        lines.append(f"\nperf of {name}: {text}")
    for name, text in res.get("syscalls", {}).items():
        lines.append(f"\nsystem calls of {name}: {text}")
    for name, prof in res.get("profile", {}).items():
        lines.append(f"\nprofile of {name}: {prof.get('status')}")
        for row in prof.get("layers", []):
            lines.append(f"  {row[0]:<32} {row[2]:5.1f}%")
        lines.append("  self:")
        for row in prof.get("self", [])[:25]:
            lines.append(f"  {row[2]:5.1f}%  {row[0]}")
        lines.append("  inclusive:")
        for row in prof.get("inclusive", [])[:25]:
            lines.append(f"  {row[2]:5.1f}%  {row[0]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", metavar="REF", help="also run the executor of git ref REF (e.g. main), same run")
    ap.add_argument("--ref", help="run the candidate executor from git ref REF instead of this checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5, help="per batch")
    ap.add_argument("--receipts-only", action="store_true", help="skip the receipts-off executors")
    ap.add_argument("--profile", type=float, default=0.0, metavar="S", help="py-spy each executor for S seconds at c=32")
    ap.add_argument("--profile-path", dest="profile_paths", action="append", default=[], metavar="NAME",
                    help="profile only this path (e.g. cand-off); repeatable; default every executor")
    ap.add_argument("--profile-concurrency", type=int, default=32, metavar="C", help="concurrency while profiling")
    ap.add_argument("--syscalls", type=float, default=0.0, metavar="S", help="strace -c each executor for S seconds")
    ap.add_argument("--perf", type=float, default=0.0, metavar="S", help="perf record each executor for S seconds")
    ap.add_argument("--receipts-toml", default="", metavar="TOML",
                    help="extra [receipts] lines for the candidate executors, e.g. 'sync_interval_secs = 2.0'")
    ap.add_argument("--cprofile", type=Path, metavar="DIR", help="run the executors under cProfile, stats in DIR")
    ap.add_argument("--c32-only", action="store_true", help="c=1 only briefly (for --cprofile at saturation)")
    ap.add_argument("--c1-only", action="store_true", help="c=32 only briefly (for --cprofile at concurrency 1)")
    ap.add_argument("--cand-python", metavar="PATH", help="interpreter of the candidate executors (default: this one)")
    ap.add_argument("--base-python", metavar="PATH", help="interpreter of the baseline executors (default: this one)")
    ap.add_argument("--stream", type=int, default=0, metavar="N", help="also streams of N chunks: TTFT at c=1, chunks/s at c=8")
    ap.add_argument("--keep-profiles", type=Path, metavar="DIR", help="keep py-spy's collapsed stacks in DIR")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.cprofile:
        args.cprofile.mkdir(parents=True, exist_ok=True)
    log = Progress(args.quiet)
    res = run_in_temp_dir("lloom-bench-ex-", lambda procs, tmp: amain(args, procs, tmp, log))
    print("\n".join(render(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
