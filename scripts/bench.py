"""Benchmark: the executor path side by side with direct HTTP and LiteLLM's proxy.

    .venv/bin/python scripts/bench.py            # full run (~7 min), writes docs/benchmarks.md
    .venv/bin/python scripts/bench.py --quick    # under two minutes, for development
    .venv/bin/python scripts/bench.py --no-litellm --smoke --out /tmp/b.md   # seconds; what the test runs

Starts every process it needs (the fast backend, nats-server with JetStream, `lloom-executor`
processes (one more with receipts off, for the saturation A/B), LiteLLM's proxy from scripts/.bench-venv, created on first use),
drives them in interleaved round-robin batches from this process, reads CPU
time and RSS of each child from /proc, stops every child on exit, error or
Ctrl-C, keeps JetStream's store, the executors' receipt outboxes and keys in a temp dir
it removes at the end, and writes the markdown report, a JSON dump next to it and a CDF plot.
Run it with the project's venv (it imports `protocol`); traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import env, phases, report, telemetry_ab  # noqa: E402
from benchkit.harness import Progress, cpu_plan, start_fast_backend  # noqa: E402
from benchkit.procs import Procs, pin, run_all_stopped  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
# The receipts-off executor of the A/B serves its own model name, so it joins no queue group of the
# executor under test and is reached the same way (queue group by model, no direct addressing).
MODEL_NO_RECEIPTS = "bench-model-nr"
# Likewise the telemetry-on executor of the telemetry A/B (the executor under test has it off, the default).
MODEL_TELEMETRY = "bench-model-tel"

MODES = {
    "full": dict(rounds=5, c1_s=3.0, c1_cap=5000, sat_s=4.0, sat_cap=50000, half_s=3.0, half_cap=20000, stream_lens=[16, 256],
                 stream_c=8, stream_s=3.0, ttft_s=1.5, stream_rounds=3, scaling=[1, 2, 4], scale_s=5.0,
                 profile_s=8.0, warmup=300),
    "quick": dict(rounds=2, c1_s=1.0, c1_cap=3000, sat_s=1.5, sat_cap=20000, half_s=1.5, half_cap=10000, stream_lens=[16, 256],
                  stream_c=8, stream_s=1.2, ttft_s=0.75, stream_rounds=2, scaling=[1, 2, 4], scale_s=2.0,
                  profile_s=4.0, warmup=200),
    "smoke": dict(rounds=1, c1_s=0.3, c1_cap=40, sat_s=0.4, sat_cap=200, half_s=0.3, half_cap=60, stream_lens=[8],
                  stream_c=4, stream_s=0.3, ttft_s=0.2, stream_rounds=1, scaling=[1, 2], scale_s=0.3,
                  profile_s=0.0, warmup=20),
}  # fmt: skip


async def start_nats(procs: Procs, cpus: set[int] | None, tmp: Path) -> tuple[str, int]:
    """nats-server with JetStream (executors publish every receipt to it), as the embedded one runs it:
    file store in the run's temp dir, `sync_interval: always` (a PubAck means the receipt is on disk)."""
    from executor.process.embedded_nats import find_nats_server, free_port

    port = free_port()
    store = tmp / "jetstream"
    conf = tmp / "nats.conf"
    conf.write_text(f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n  sync_interval: always\n}}\n")
    # (the config file enables JetStream; adding -js -sd as well makes nats-server reject a duplicate store_dir)
    argv = [find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-c", str(conf)]
    proc = procs.start("nats-server", argv, cpus=cpus)
    url = f"nats://127.0.0.1:{port}"
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            pin(proc.pid, cpus)  # threads it started after the first pin
            return url, proc.pid
        except OSError:
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nats-server did not start\n{procs.log_tail('nats-server')}")


def start_executor(
    procs: Procs, tmp: Path, idx: int | str, backend_url: str, nats_url: str, cpus: set[int] | None,
    *, receipts: bool = True, model: str = MODEL, telemetry: str = "", name: str | None = None,
) -> int:  # fmt: skip
    """One `lloom-executor`; its receipts outbox and identity key live in the run's temp dir."""
    cfg = tmp / f"executor-{idx}.toml"
    cfg.write_text(
        f'[node]\nid = "bench-exec-{idx}"\nnats_url = "{nats_url}"\nidentity_file = "{tmp / f"executor-{idx}.nk"}"\n\n'
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{backend_url}"\nmodels = ["{model}"]\n\n'
        f'[receipts]\nenabled = {"true" if receipts else "false"}\noutbox_dir = "{outbox_dir(tmp, idx)}"\n\n'
        f'[telemetry]\n{telemetry}\n\n[logging]\nformat = "json"\n'
    )
    exe = Path(sys.executable).parent / "lloom-executor"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.runtime.cli"]
    name = name or ("executor-noreceipts" if not receipts else f"executor-{idx}")
    return procs.start(name, [*argv, "--config", str(cfg), "--nats", nats_url], cpus=cpus).pid


def start_gateway(procs: Procs, nats_url: str, cpus: set[int] | None) -> tuple[str, int]:
    """One `lloom-gateway` (the OpenAI-compatible HTTP gateway) in front of the same executor."""
    from executor.process.embedded_nats import free_port

    port = free_port()
    exe = Path(sys.executable).parent / "lloom-gateway"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "executor.gateway.cli"]
    pid = procs.start("gateway", [*argv, "--nats", nats_url, "--listen", f"127.0.0.1:{port}"], cpus=cpus).pid
    return f"http://127.0.0.1:{port}/v1", pid


async def wait_http(url: str, deadline_s: float = 30.0) -> None:
    """Until `url` answers a chat completion with 200 (the gateway reaches the executor)."""
    import aiohttp

    body = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}]}
    end = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.post(f"{url}/chat/completions", json=body) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"the gateway at {url} did not answer within {deadline_s:g}s")
            await asyncio.sleep(0.1)


def outbox_dir(tmp: Path, idx: int | str) -> Path:
    return tmp / f"outbox-{idx}"


def outbox_state(directory: Path) -> tuple[int, int]:
    """(last seq written, acked seq) of an executor's outbox, read from its files without parsing them all."""
    last = 0
    try:
        with open(directory / "receipts.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            lines = [ln for ln in f.read().split(b"\n") if ln.strip()]
        for line in reversed(lines):
            try:
                last = json.loads(line)["receipt"]["seq"]
                break
            except (ValueError, KeyError):
                continue  # a line cut by the seek, or being written
    except FileNotFoundError:
        pass
    if not last:  # compacted (rotated away once all was acknowledged): the chain file keeps its position
        try:
            last = int((directory / "chain").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            pass
    try:
        acked = int((directory / "acked").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        acked = 0
    return last, acked


def outbox_settler(directory: Path, path, executor_id: str, lags: list[float] | None = None):  # type: ignore[no-untyped-def]
    """Waits until JetStream holds every receipt the executor wrote, so that a batch's CPU includes
    publishing its receipts (the publisher works behind the replies).

    The outbox's `acked` mark is written only every sync interval, so it lags; the stream does not.
    An executor's batches are stored in order under its own subject, so once the last message on
    that subject ends with the last receipt written, all of them are in, whoever else publishes."""
    import nats.js.errors

    from protocol.receipts import receipt_lines
    from protocol.subjects import receipts_subject

    subject = receipts_subject(executor_id)

    async def settle() -> None:
        t0 = time.perf_counter()
        js = path.client._nc.jetstream()
        last = outbox_state(directory)[0]
        while time.perf_counter() - t0 < 60:
            try:
                msg = await js.get_last_msg("LLOOM_RECEIPTS", subject)
                if json.loads(receipt_lines(msg.data)[-1])["receipt"]["seq"] >= last:
                    break
            except nats.js.errors.NotFoundError:  # nothing stored yet
                pass
            await asyncio.sleep(0.005)
        if lags is not None:
            lags.append(time.perf_counter() - t0)

    return settle


async def wait_executor(client, idx: int | str, deadline_s: float = 30.0, model: str = MODEL) -> None:  # type: ignore[no-untyped-def]
    from protocol.messages import ChatRequest, Message, Role

    req = ChatRequest(model=model, messages=[Message(role=Role.USER, content="ping")])
    end = time.monotonic() + deadline_s
    while True:
        try:
            await client.complete(req, executor=f"bench-exec-{idx}", timeout=2.0)
            return
        except Exception:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def start_litellm(procs: Procs, tmp: Path, backend_url: str, cpus: set[int] | None, log: Progress) -> tuple[str, int]:
    exe = env.bench_tool("litellm")
    if exe is None:
        raise RuntimeError("litellm is not installed in the bench venv")
    from executor.process.embedded_nats import free_port

    cfg = tmp / "litellm.yaml"
    env.litellm_config(cfg, backend_url)
    port = free_port()
    proc = procs.start(
        "litellm", [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        cpus=cpus, env=env.LITELLM_ENV,
    )  # fmt: skip
    log(f"waiting for LiteLLM's proxy on port {port} (its import takes a while)")
    try:
        await env.wait_http_ready(f"http://127.0.0.1:{port}/health/readiness", 180, proc)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{procs.log_tail('litellm')}") from e
    pin(proc.pid, cpus)
    return f"http://127.0.0.1:{port}/v1", proc.pid


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path, log: Progress) -> dict:
    p = MODES[args.mode]
    relay_cpus, gen_cpus = cpu_plan()
    res: dict = {"mode": args.mode, "machine": env.machine(), "params": p, "litellm_status": "measured"}
    res["pinning"] = {"relay": sorted(relay_cpus or []), "harness": sorted(gen_cpus or [])}
    backend_url, backend_pid = await start_fast_backend(procs, gen_cpus)
    nats_url, nats_pid = await start_nats(procs, gen_cpus, tmp)
    log(f"backend at {backend_url}, nats-server at {nats_url}")
    pids = {"backend": backend_pid, "nats-server": nats_pid}
    pids["executor"] = start_executor(procs, tmp, 1, backend_url, nats_url, relay_cpus)
    tel_path, metrics_url = await start_telemetry_ab(procs, tmp, backend_url, nats_url, pids, relay_cpus)
    # The A/B of the saturation phase: the same executor with `[receipts] enabled = false`.
    pids["executor-noreceipts"] = start_executor(
        procs, tmp, "nr", backend_url, nats_url, relay_cpus, receipts=False, model=MODEL_NO_RECEIPTS
    )
    gateway_url, pids["gateway"] = start_gateway(procs, nats_url, relay_cpus)
    litellm_task = None
    if args.no_litellm:
        res["litellm_status"] = "skipped (--no-litellm)"
    else:
        why = env.ensure_bench_venv(log)
        if why:
            res["litellm_status"] = f"not measured: {why}"
        else:
            litellm_task = asyncio.create_task(start_litellm(procs, tmp, backend_url, relay_cpus, log))
    if gen_cpus:
        pin(os.getpid(), gen_cpus)
    paths = phases.make_paths(backend_url, nats_url)
    paths["gateway"] = phases.make_gateway_path(gateway_url)
    lags: list[float] = []
    paths["executor"].settle = outbox_settler(outbox_dir(tmp, 1), paths["executor"], "bench-exec-1", lags)
    ab = {"executor-noreceipts": phases.ExecutorPath(nats_url, name="executor-noreceipts", model=MODEL_NO_RECEIPTS,
                                                      verify=False)}
    for path in [*paths.values(), *ab.values()]:
        await path.open()
    try:
        await wait_executor(paths["executor"].client, 1)
        await wait_executor(ab["executor-noreceipts"].client, "nr", model=MODEL_NO_RECEIPTS)
        log("executor 1 (receipts on) and executor nr (receipts off) are serving")
        await wait_http(gateway_url)
        log(f"the gateway at {gateway_url} is serving")
        if litellm_task is not None:
            try:
                litellm_url, pids["litellm"] = await litellm_task
                paths["litellm"] = phases.make_litellm_path(litellm_url)
                await paths["litellm"].open()
                log("LiteLLM proxy is ready")
            except Exception as e:
                res["litellm_status"] = f"not measured: the proxy did not start: {str(e)[:600]}"
                log(res["litellm_status"])
        res["paths"] = list(paths)
        res["versions"] = versions(res)
        # The generator makes many short-lived objects; collector pauses would show up as
        # relay latency. Freeze what exists and collect rarely (the executor keeps its own GC).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        runner = phases.Runner(paths, pids, p, log, cpus=(relay_cpus, gen_cpus), ab_paths=ab)
        await runner.run_all(res)
        res["receipts_ab"]["publisher_lag_s"] = {"max": max(lags, default=0.0), "mean": sum(lags) / max(1, len(lags))}
        await tel_path.open()
        try:
            res["telemetry_ab"] = await run_telemetry_ab((pids, (relay_cpus, gen_cpus)), paths["executor"], tel_path,
                                                         metrics_url, p, log)  # fmt: skip
        finally:
            await tel_path.close()
        if p["profile_s"] > 0:
            res["profile"] = await phases.profile_executor(runner, pids["executor"], p["profile_s"], tmp, log)
            # And one caller at a time: where a lone request's CPU goes (wake-ups more than work).
            res["profile_c1"] = await phases.profile_executor(runner, pids["executor"], p["profile_s"], tmp, log,
                                                              concurrency=1)  # fmt: skip
        res["scaling"] = await phases.scaling(
            runner, p, lambda i: start_executor(procs, tmp, i, backend_url, nats_url, relay_cpus),
            lambda i: wait_executor(paths["executor"].client, i),
        )
        res["receipts_ab"]["stream"] = await receipts_stream_check(nats_url, tmp, max(p["scaling"]))
    finally:
        for path in [*paths.values(), *ab.values()]:
            await path.close()
    return res


async def start_telemetry_ab(procs: Procs, tmp: Path, backend_url: str, nats_url: str, pids: dict,
                             relay_cpus: set[int] | None) -> tuple[phases.ExecutorPath, str]:  # fmt: skip
    """The telemetry-on twin of executor 1 (`[telemetry] prometheus_listen`): its path and metrics URL."""
    from executor.process.embedded_nats import free_port

    listen = f"127.0.0.1:{free_port()}"
    pids[telemetry_ab.ON] = start_executor(procs, tmp, "tel", backend_url, nats_url, relay_cpus, model=MODEL_TELEMETRY,
                                           telemetry=f'prometheus_listen = "{listen}"', name=telemetry_ab.ON)  # fmt: skip
    path = phases.ExecutorPath(nats_url, name=telemetry_ab.ON, model=MODEL_TELEMETRY)
    path.settle = outbox_settler(outbox_dir(tmp, "tel"), path, "bench-exec-tel")
    return path, f"http://{listen}/metrics"


async def run_telemetry_ab(runner_args: tuple, off: phases.ExecutorPath, on: phases.ExecutorPath, metrics_url: str,
                           p: dict, log: Progress) -> dict:  # fmt: skip
    """Warm the telemetry-on path up, then both paths, interleaved (benchkit/telemetry_ab.py)."""
    await wait_executor(on.client, "tel", model=MODEL_TELEMETRY)
    await phases.closed_loop(on, 4, 30.0, p["warmup"])
    pids, cpus = runner_args
    runner = phases.Runner({telemetry_ab.OFF: off, telemetry_ab.ON: on}, pids, p, log, cpus=cpus)
    return await telemetry_ab.run(runner, p, metrics_url, log)


async def telemetry_only(args: argparse.Namespace, procs: Procs, tmp: Path, log: Progress) -> dict:
    """`--telemetry-ab`: only the two executors of the telemetry A/B, and only that phase."""
    p = MODES[args.mode]
    relay_cpus, gen_cpus = cpu_plan()
    backend_url, backend_pid = await start_fast_backend(procs, gen_cpus)
    nats_url, nats_pid = await start_nats(procs, gen_cpus, tmp)
    pids = {"backend": backend_pid, "nats-server": nats_pid}
    pids["executor"] = start_executor(procs, tmp, 1, backend_url, nats_url, relay_cpus)
    on, metrics_url = await start_telemetry_ab(procs, tmp, backend_url, nats_url, pids, relay_cpus)
    if gen_cpus:
        pin(os.getpid(), gen_cpus)
    off = phases.ExecutorPath(nats_url)
    off.settle = outbox_settler(outbox_dir(tmp, 1), off, "bench-exec-1")
    await off.open()
    await on.open()
    try:
        await wait_executor(off.client, 1)
        await phases.closed_loop(off, 4, 30.0, p["warmup"])
        return {"mode": args.mode, "machine": env.machine(),
                "telemetry_ab": await run_telemetry_ab((pids, (relay_cpus, gen_cpus)), off, on, metrics_url, p, log)}
    finally:
        await off.close()
        await on.close()


async def receipts_stream_check(nats_url: str, tmp: Path, n_executors: int) -> dict:
    """After the run: JetStream holds every receipt the executors wrote, each once."""
    import nats

    from protocol.receipts_cli import stream_lines

    # The executors of the scaling phase, and the telemetry A/B's telemetry-on one.
    states = {i: outbox_state(outbox_dir(tmp, i)) for i in [*range(1, max(1, n_executors) + 1), "tel"]}
    nc = await nats.connect(nats_url)
    try:
        written = sum(last for last, _ in states.values())
        deadline = time.monotonic() + 30
        while True:  # the last batches may still be on their way
            seen: set[tuple[str, int]] = set()
            stored = duplicates = 0
            messages: set[str] = set()
            try:
                async for where, line, _healed_by in stream_lines(nc):
                    r = json.loads(line)["receipt"]
                    key = (r["executor_key"], r["seq"])
                    duplicates += key in seen
                    seen.add(key)
                    stored += 1
                    messages.add(where.partition(":")[0])
            except Exception as e:  # reported, not fatal: the figures above stand on their own
                return {"written": written, "stored": f"unavailable: {type(e).__name__}: {e}"}
            if stored >= written or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    acked = sum(a for _, a in states.values())
    return {"written": written, "acked_marks": acked, "stored": stored, "duplicates": duplicates,
            "messages": len(messages), "outboxes": len(states)}


def versions(res: dict) -> dict[str, str]:
    import importlib.metadata as md

    from executor.process.embedded_nats import find_nats_server

    out = {"python": sys.version.split()[0]}
    try:  # read-only: which code was measured
        out["lloom commit"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        out["lloom commit"] = "unknown"
    for dist in ("lloom", "nats-py", "aiohttp", "msgspec", "uvloop"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["nats-server"] = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True).stdout.strip().removeprefix("nats-server: ")
    except OSError:
        out["nats-server"] = "unknown"
    if env.BENCH_PY.exists():
        for dist in ("litellm", "matplotlib", "py-spy"):
            out[dist] = env.package_version(str(env.BENCH_PY), dist)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark the executor path against direct HTTP and LiteLLM's proxy.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick", help="under two minutes")
    g.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="seconds; checks the harness only")
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM path (and the bench venv)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown report to write")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--telemetry-ab", action="store_true",
                    help="only the telemetry A/B ([telemetry] off vs on, c=1 and c=32); its table goes to --out")
    args = ap.parse_args(argv)
    args.mode = args.mode or "full"
    log = Progress(args.quiet)
    with tempfile.TemporaryDirectory(prefix="lloom-bench-") as tmp_s:
        tmp = Path(tmp_s)
        procs = Procs(tmp)
        if args.telemetry_ab:
            res = run_all_stopped(telemetry_only(args, procs, tmp, log), procs, uvloop_loop=True)
            lines = telemetry_ab.render(res["telemetry_ab"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
            print("\n".join(lines))
            return 0
        res = run_all_stopped(amain(args, procs, tmp, log), procs, uvloop_loop=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report.write(res, args.out, log)
    for line in report.goal_lines(res):
        print(line)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
