"""Benchmark: what reply verification costs the client (protocol/verify.py).

    .venv/bin/python scripts/bench_verify.py            # ~20 s
    .venv/bin/python scripts/bench_verify.py --smoke    # seconds

Two measurements in one run, printed as a markdown table:

1. µs of CPU per verification of a real reply (decoded already), three cases: a
   receipt whose batch root this client has not seen (one Ed25519 check), one whose
   root it has (receipts signed in the same batch share it), and the response-hash
   part alone.
2. Client CPU per request and latency, verification on vs off, in the same run,
   interleaved batches, against a real `lloom-executor` (receipts on) on the fast
   OpenAI test backend and the embedded nats-server. Client CPU is this process's
   `time.process_time()`: the executor, the backend and nats-server are other processes.

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
from benchkit.harness import start_fast_backend  # noqa: E402
from benchkit.procs import Procs, run_ab_benchmark  # noqa: E402

MODEL = "bench-model"


async def wait_served(url: str, deadline_s: float = 30.0) -> None:
    from protocol.client import LloomClient
    from protocol.errors import NoExecutors
    from protocol.messages import ChatRequest, Message, Role

    request = ChatRequest(model=MODEL, messages=[Message(Role.USER, "hi")], max_tokens=4)
    end = time.monotonic() + deadline_s
    async with await LloomClient.connect(url, timeout=5) as client:
        while True:
            try:
                await client.complete(request)
                return
            except NoExecutors:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.1)  # the executor is still starting: nothing to wait on but time


def micro(reply, job_id: str, payload: bytes, n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """µs per verification of one real reply, with and without the root already checked."""
    from protocol.trust import Trust
    from protocol.verify import ReplyVerifier, sha256_hex

    content = reply.content.encode()
    request_sha = sha256_hex(payload)

    def once(verifier: ReplyVerifier) -> None:
        receipt = verifier.check_identity(reply.receipt, executor_id=reply.executor_id, job_id=job_id, client=None,
                                          request_sha256=sha256_hex(payload))  # fmt: skip
        verifier.check_response(receipt, content)

    out = {}
    start = time.perf_counter()
    for _ in range(n):
        once(ReplyVerifier(Trust()))  # a fresh verifier: the root is new to it
    out["uncached_us"] = (time.perf_counter() - start) / n * 1e6
    verifier = ReplyVerifier(Trust())
    once(verifier)
    start = time.perf_counter()
    for _ in range(n):
        once(verifier)
    out["cached_root_us"] = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(n):
        sha256_hex(payload) == request_sha and reply.receipt.receipt.response_sha256 == sha256_hex(content)  # noqa: B015
    out["hashes_only_us"] = (time.perf_counter() - start) / n * 1e6
    return out


async def amain(args: argparse.Namespace, procs: Procs, tmp: Path) -> None:
    from executor.process.embedded_nats import EmbeddedNats
    from protocol.client import LloomClient
    from protocol.messages import ChatRequest, Message, Role, encoder
    from protocol.trust import Trust

    backend_url, _ = await start_fast_backend(procs)
    async with EmbeddedNats(jetstream=True, store_dir=str(tmp / "js")) as server:
        start_executor(procs, tmp, 0, backend_url, server.url, None)
        await wait_served(server.url)
        request = ChatRequest(model=MODEL, messages=[Message(Role.USER, "Why is the sky blue?")], max_tokens=16)
        verified = await LloomClient.connect(server.url, timeout=10, trust=Trust())
        unverified = await LloomClient.connect(server.url, timeout=10, trust=Trust(verify=False))
        try:
            sample = await unverified.complete(request)  # a real reply to verify offline
            payload = encoder.encode(request)
            figures = micro(sample, sample.job_id, payload, args.micro_n)
            cpu: dict[str, list[float]] = {"on": [], "off": []}
            lat: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(args.rounds):
                for name, client in (("on", verified), ("off", unverified)):
                    cpu0 = time.process_time()
                    for _ in range(args.batch):
                        t0 = time.perf_counter()
                        await client.complete(request)
                        lat[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name].append((time.process_time() - cpu0) / args.batch * 1e6)
            assert verified.reply_forgeries == {}, verified.reply_forgeries
        finally:
            await verified.close()
            await unverified.close()
    on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    print(f"| measure | value |\n|---|---|\n"
          f"| verification, new batch root (one Ed25519 check) | {figures['uncached_us']:.1f} µs |\n"
          f"| verification, batch root already checked | {figures['cached_root_us']:.1f} µs |\n"
          f"| of which the two SHA-256 hashes | {figures['hashes_only_us']:.1f} µs |\n"
          f"| client CPU per request, verification off | {off:.0f} µs |\n"
          f"| client CPU per request, verification on | {on:.0f} µs |\n"
          f"| ratio on / off | {on / off:.3f} |\n"
          f"| latency p50 off / on | {statistics.median(lat['off']):.2f} / {statistics.median(lat['on']):.2f} ms |\n"
          f"\n{args.rounds} rounds x {args.batch} sequential requests per mode, interleaved;"
          f" micro figures over {args.micro_n} runs.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_ab_benchmark(amain, __doc__.split("\n\n")[0], "lloom-bench-verify-", argv)


if __name__ == "__main__":
    sys.exit(main())
