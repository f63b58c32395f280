"""Benchmark: receipts after an outage — how fast a full outbox drains into JetStream, and restart load time.

    .venv/bin/python scripts/bench_receipts.py            # 20,000 receipts
    .venv/bin/python scripts/bench_receipts.py --quick    # 2,000 receipts
    .venv/bin/python scripts/bench_receipts.py --json /tmp/r.json

1. Outage: a `ReceiptIssuer` over an `Outbox` in a temp dir issues N real signed receipts
   (`usage()` with a backend report, checked by the local token counter as in the
   executor; `issue()` signs per event-loop turn, `--batch` receipts per turn, and
   appends to the outbox). No network; timed per receipt as a by-product.
2. Restart: a new `Outbox` over the same directory (all N pending): load time.
3. Recovery: a JetStream nats-server (`EmbeddedNats`, `sync_interval: always`, file store in
   the temp dir) and a `ReceiptPublisher` over the reloaded outbox; receipts/s until the
   outbox is empty, with this process's and nats-server's CPU, and how much of the time went
   to `Outbox.acked` and `Outbox.sync` (wrapped with a timer here, not changed).
4. Restart after the flush (all N acknowledged): load time again.

Everything lives in a temp dir that is removed at the end; only 127.0.0.1 traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import env  # noqa: E402
from benchkit.procs import cpu_seconds, self_cpu_seconds  # noqa: E402

from executor.config import TokensConfig  # noqa: E402
from executor.process.embedded_nats import EmbeddedNats  # noqa: E402
from executor.receipts.outbox import Outbox  # noqa: E402
from executor.receipts.publisher import STREAM, ReceiptPublisher  # noqa: E402
from executor.receipts.issuer import ReceiptIssuer  # noqa: E402
from executor.tokens import TokenCounter  # noqa: E402
from protocol.announcements import Pricing  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import ChatRequest, Message, Role, Usage  # noqa: E402

MODEL = "qwen2.5:7b"
PRICING = Pricing(input=Decimal("0.15"), output=Decimal("0.60"))


def timed(fn, acc: list[float]):  # type: ignore[no-untyped-def]
    def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[0] += time.perf_counter() - t0

    return wrapper


async def issue_all(directory: Path, n: int, batch: int) -> dict:
    identity = Identity.generate()
    outbox = Outbox(directory)
    counter = TokenCounter(TokensConfig())
    issuer = ReceiptIssuer(identity, "bench-receipts", outbox, pricing=lambda _m: PRICING, counter=counter)
    request = ChatRequest(model=MODEL, messages=[Message(role=Role.USER, content="Say hello, and tell me about the weather.")])
    payload = b'{"model":"qwen2.5:7b","messages":[{"role":"user","content":"Say hello, and tell me about the weather."}]}'
    text = "Hello! I cannot see the weather from here, but I hope it is sunny where you are."
    reported = Usage(prompt_tokens=17, completion_tokens=19, total_tokens=36)
    counter.method_for(MODEL)  # the tokenizer is built once per model, before the first job (as the daemon does)

    async def one(i: int) -> None:
        job_id = f"job-{i:08d}"
        usage = issuer.usage(job_id, request, reported, text, 0)
        await issuer.issue(
            job_id=job_id, client="acme", model=MODEL, backend="ollama", outcome="completed", finish_reason="stop",
            usage=usage, started_at_ms=time.time_ns() // 1_000_000, ttft_ms=95, request=payload, response_text=text,
        )  # fmt: skip

    cpu0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, n, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    outbox.close()
    return {
        "n": n, "batch": batch, "wall_s": wall, "cpu_us_per_receipt": cpu * 1e6 / n, "receipts_per_s": n / wall,
        "signatures": issuer.signer.batches, "counted_by_local": counter.method_for(MODEL),
        "file_bytes": (directory / "receipts.jsonl").stat().st_size,
    }  # fmt: skip


def load(directory: Path) -> tuple[Outbox, float]:
    t0 = time.perf_counter()
    outbox = Outbox(directory)
    return outbox, time.perf_counter() - t0


async def flush(outbox: Outbox, store: Path) -> dict:
    n = outbox.waiting
    mark, sync = [0.0], [0.0]
    outbox.acked = timed(outbox.acked, mark)  # type: ignore[method-assign]
    outbox.sync = timed(outbox.sync, sync)  # type: ignore[method-assign]
    import nats

    async with EmbeddedNats(jetstream=True, store_dir=str(store)) as server:
        assert server.pid is not None
        nc = await nats.connect(server.url)
        try:
            publisher = ReceiptPublisher(nc, outbox)
            await publisher._ensure_stream()  # the stream exists before the clock starts
            srv0, cpu0, t0 = cpu_seconds(server.pid), self_cpu_seconds(), time.perf_counter()
            await publisher.start()
            while outbox.waiting:
                await asyncio.sleep(0.005)
            wall = time.perf_counter() - t0
            cpu, srv = self_cpu_seconds() - cpu0, cpu_seconds(server.pid) - srv0
            await publisher.stop()
            stored = (await nc.jetstream().stream_info(STREAM)).state.messages
        finally:
            await nc.close()
    return {
        "n": n, "wall_s": wall, "receipts_per_s": n / wall, "publisher_cpu_us_per_receipt": cpu * 1e6 / n,
        "nats_cpu_us_per_receipt": srv * 1e6 / n, "mark_acked_s": mark[0], "sync_s": sync[0],
        "published": publisher.published, "messages": stored, "acked_mark": outbox.acked_seq,
    }  # fmt: skip


async def amain(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="lloom-bench-receipts-") as tmp_s:
        tmp = Path(tmp_s)
        directory = tmp / "outbox"
        res: dict = {"machine": env.machine()}
        res["issue"] = await issue_all(directory, args.n, args.batch)
        print(f"issued {args.n:,} receipts: {res['issue']['cpu_us_per_receipt']:.1f} µs CPU each "
              f"({res['issue']['receipts_per_s']:,.0f}/s, {res['issue']['batch']} per signature)", flush=True)  # fmt: skip
        outbox, res["load_pending_s"] = load(directory)
        print(f"restart with {outbox.waiting:,} pending: Outbox() took {res['load_pending_s'] * 1e3:.0f} ms", flush=True)
        res["flush"] = await flush(outbox, tmp / "jetstream")
        f = res["flush"]
        print(f"flush: {f['receipts_per_s']:,.0f} receipts/s ({f['wall_s']:.2f} s for {f['n']:,}); "
              f"publisher CPU {f['publisher_cpu_us_per_receipt']:.0f} µs, nats-server {f['nats_cpu_us_per_receipt']:.0f} µs "
              f"per receipt; acked {f['mark_acked_s']:.2f} s, sync {f['sync_s']:.3f} s; "
              f"{f['published']:,} stored in {f['messages']:,} messages, acked mark {f['acked_mark']:,}", flush=True)  # fmt: skip
        outbox.close()
        outbox, res["load_acked_s"] = load(directory)
        res["load_acked_pending"] = outbox.waiting
        print(f"restart after the flush ({outbox.waiting} pending): Outbox() took {res['load_acked_s'] * 1e3:.0f} ms")
        outbox.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Outbox flush rate after an outage, and restart load time.")
    ap.add_argument("--quick", action="store_true", help="2,000 receipts instead of 20,000")
    ap.add_argument("-n", type=int, default=None, help="receipts in the outbox")
    ap.add_argument("--batch", type=int, default=32, help="receipts issued per event-loop turn (one signature)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    args.n = args.n or (2000 if args.quick else 20000)
    try:
        import uvloop

        res = uvloop.run(amain(args))
    except ImportError:
        res = asyncio.run(amain(args))
    res["pid"] = os.getpid()
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
