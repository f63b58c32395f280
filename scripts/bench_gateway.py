"""The gateway's own cost, narrowly: direct HTTP vs HTTP -> lloom-gateway -> NATS -> executor -> backend.

    .venv/bin/python scripts/bench_gateway.py                      # this checkout's gateway
    .venv/bin/python scripts/bench_gateway.py --baseline main      # and main's gateway, same run, A/B
    .venv/bin/python scripts/bench_gateway.py --ref B --baseline A # one commit's lever: A vs B

What scripts/bench.py measures for the `gateway` path (added latency at c=1 over direct,
CPU per request of gateway, executor and nats-server at c=32), without its other phases,
so each change to the gateway's request path can be judged in a minute. With `--baseline
REF` a second gateway runs the code of git ref REF (exported to a temp dir) in front of the
same executor, and the paths alternate in rounds, so the machine's noise hits both alike.
Processes are pinned as in bench.py (the process under test on one core, the rest on the other).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import MODEL, start_executor, start_nats, wait_executor, wait_http  # noqa: E402
from benchkit import phases  # noqa: E402
from benchkit.harness import Progress, cpu_plan, start_fast_backend  # noqa: E402
from benchkit.paths import ExecutorPath, HttpPath, closed_loop  # noqa: E402
from benchkit.procs import Procs, pin, run_in_temp_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def start_gateway(procs: Procs, name: str, nats_url: str, cpus: set[int] | None, code: Path | None) -> tuple[str, int]:
    from executor.process.embedded_nats import free_port

    port = free_port()
    argv = [sys.executable, "-m", "executor.gateway.cli", "--nats", nats_url, "--listen", f"127.0.0.1:{port}"]
    env = {"PYTHONPATH": str(code)} if code is not None else None
    proc = procs.start(name, argv, cpus=cpus, env=env, cwd=code)
    return f"http://127.0.0.1:{port}/v1", proc.pid


def export(ref: str, into: Path) -> Path:
    """The tree of git ref `ref`, written to `into` (no checkout touched)."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path, log: Progress) -> dict:
    relay_cpus, gen_cpus = cpu_plan()
    backend_url, backend_pid = await start_fast_backend(procs, gen_cpus)
    nats_url, nats_pid = await start_nats(procs, gen_cpus, tmp)
    pids = {"backend": backend_pid, "nats-server": nats_pid}
    pids["executor"] = start_executor(procs, tmp, 1, backend_url, nats_url, relay_cpus)
    code = export(args.ref, tmp / "candidate") if args.ref else None
    gateways = {"gateway": start_gateway(procs, "gateway", nats_url, relay_cpus, code)}
    if args.baseline:
        base = export(args.baseline, tmp / "baseline")
        gateways["baseline"] = start_gateway(procs, "gateway-baseline", nats_url, relay_cpus, base)
    if gen_cpus:
        pin(os.getpid(), gen_cpus)
    paths = {"direct": HttpPath("direct", backend_url)}
    for name, (url, pid) in gateways.items():
        paths[name] = HttpPath(name, url)
        pids[name] = pid
    probe = ExecutorPath(nats_url)
    for path in [*paths.values(), probe]:
        await path.open()
    try:
        await wait_executor(probe.client, 1, model=MODEL)
        for url, _ in gateways.values():
            await wait_http(url)
        log(f"serving: {', '.join(paths)}")
        runner = phases.Runner(paths, pids, {}, log, cpus=(relay_cpus, gen_cpus))
        await runner.rounds("warm-up", lambda n, p: closed_loop(p, 8, 1.0, 300), 1)
        res = {
            "c1": await runner.rounds("c=1", lambda n, p: closed_loop(p, 1, args.seconds, 5000), args.rounds),
            "c32": await runner.rounds("c=32", lambda n, p: closed_loop(p, 32, args.seconds, 50000)
                                       if n != "direct" else None, args.rounds),  # fmt: skip
        }
    finally:
        for path in [*paths.values(), probe]:
            await path.close()
    return res


def render(res: dict) -> list[str]:
    c1, c32 = res["c1"], res["c32"]
    d = c1["direct"]
    lines = ["| path | p50 ms | p99 ms | added p50 | added p99 | req/s c=32 | gateway µs | executor µs | nats µs |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in c1.items():
        if name == "direct":
            lines.append(f"| direct | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | | | | | | |")
            continue
        sat = c32[name]
        cpu = sat["cpu_us"]
        lines.append(
            f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['p50_ms'] - d['p50_ms']:.3f} |"
            f" {s['p99_ms'] - d['p99_ms']:.3f} | {sat['rps']:,.0f} | {cpu.get(name, 0):.1f} |"
            f" {cpu.get('executor', 0):.1f} | {cpu.get('nats-server', 0):.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", metavar="REF", help="also run the gateway of git ref REF (e.g. main), same run")
    ap.add_argument("--ref", help="run the `gateway` path from git ref REF instead of this checkout")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=1.5, help="per batch")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = Progress(args.quiet)
    res = run_in_temp_dir("lloom-bench-gw-", lambda procs, tmp: amain(args, procs, tmp, log))
    print("\n".join(render(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
