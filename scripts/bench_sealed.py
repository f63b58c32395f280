"""Benchmark: what sealed jobs cost the client and the executor (protocol/sealing.py).

    .venv/bin/python scripts/bench_sealed.py            # ~30 s
    .venv/bin/python scripts/bench_sealed.py --smoke    # seconds

Two measurements in one run, printed as a markdown table:

1. µs of CPU per job for the sealing work alone, with the classes the client and the
   executor use: the client makes an ephemeral key pair and box, seals the request and
   opens the reply; the executor makes the job's box from the client's key, opens the
   request and seals the reply (a unary job: one reply message).
2. Client and executor CPU per request, sealed vs unsealed, in the same run, interleaved
   batches, against a real `lloom-executor` (receipts on) on the fast OpenAI test backend
   and the embedded nats-server. Both modes route through the catalogue (a sealed job must),
   so the difference is the sealing. Client CPU is this process's `time.process_time()`;
   executor CPU is the executor process's utime+stime from /proc (10 ms ticks: use the full
   run, not --smoke, for that figure).

Traffic goes only to 127.0.0.1. Run it with the project's venv.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import start_executor  # noqa: E402
from bench_verify import MODEL, wait_served  # noqa: E402
from benchkit.harness import start_fast_backend  # noqa: E402
from benchkit.procs import Procs, cpu_seconds, run_ab_benchmark  # noqa: E402


def micro(request: bytes, reply: bytes, n: int) -> dict[str, float]:
    """µs per job of the sealing work on each side, over `n` jobs."""
    from protocol.sealing import ClientSeal, CurveKeyPair

    executor = CurveKeyPair.generate()
    sealed_reply = b""
    client_s = executor_s = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        seal = ClientSeal(executor.public_key)
        sealed_request = seal.box.seal(request)
        t1 = time.perf_counter()
        box = executor.box_for(seal.header)
        assert box.open(sealed_request) == request
        sealed_reply = box.seal(reply)
        t2 = time.perf_counter()
        assert seal.box.open(sealed_reply) == reply
        t3 = time.perf_counter()
        client_s += (t1 - t0) + (t3 - t2)
        executor_s += t2 - t1
    return {"client_us": client_s / n * 1e6, "executor_us": executor_s / n * 1e6}


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path) -> None:
    from executor.process.embedded_nats import EmbeddedNats
    from protocol.client import LloomClient
    from protocol.messages import ChatRequest, Message, Role, encoder
    from protocol.routing import Specific

    backend_url, _ = await start_fast_backend(procs)
    async with EmbeddedNats(jetstream=True, store_dir=str(tmp / "js")) as server:
        pid = start_executor(procs, tmp, 0, backend_url, server.url, None)
        await wait_served(server.url)
        request = ChatRequest(model=MODEL, messages=[Message(Role.USER, "Why is the sky blue?")], max_tokens=16)
        route = Specific(MODEL)
        async with await LloomClient.connect(server.url, timeout=10) as client:
            sample = await client.complete(request, sealed=True)  # also fills the catalogue
            figures = micro(encoder.encode(request), encoder.encode(sample), args.micro_n)
            cpu: dict[str, list[float]] = {"sealed": [], "unsealed": []}
            exe: dict[str, list[float]] = {"sealed": [], "unsealed": []}
            lat: dict[str, list[float]] = {"sealed": [], "unsealed": []}
            for _ in range(args.rounds):
                for name in ("unsealed", "sealed"):
                    cpu0, exe0 = time.process_time(), cpu_seconds(pid)
                    for _ in range(args.batch):
                        t0 = time.perf_counter()
                        await client.complete(request, route=route, sealed=name == "sealed")
                        lat[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name].append((time.process_time() - cpu0) / args.batch * 1e6)
                    exe[name].append((cpu_seconds(pid) - exe0) / args.batch * 1e6)
            assert client.reply_forgeries == {}, client.reply_forgeries
    c_on, c_off = statistics.median(cpu["sealed"]), statistics.median(cpu["unsealed"])
    e_on, e_off = statistics.median(exe["sealed"]), statistics.median(exe["unsealed"])
    print(f"| measure | value |\n|---|---|\n"
          f"| sealing work, client (key pair, seal request, open reply) | {figures['client_us']:.1f} µs |\n"
          f"| sealing work, executor (box from client key, open request, seal reply) | {figures['executor_us']:.1f} µs |\n"
          f"| client CPU per request, unsealed | {c_off:.0f} µs |\n"
          f"| client CPU per request, sealed | {c_on:.0f} µs |\n"
          f"| executor CPU per request, unsealed | {e_off:.0f} µs |\n"
          f"| executor CPU per request, sealed | {e_on:.0f} µs |\n"
          f"| latency p50 unsealed / sealed | {statistics.median(lat['unsealed']):.2f} / "
          f"{statistics.median(lat['sealed']):.2f} ms |\n"
          f"\n{args.rounds} rounds x {args.batch} sequential requests per mode, interleaved, both routed"
          f" through the catalogue; sealing work over {args.micro_n} jobs.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_ab_benchmark(amain, __doc__.split("\n\n")[0], "lloom-bench-sealed-", argv)


if __name__ == "__main__":
    sys.exit(main())
