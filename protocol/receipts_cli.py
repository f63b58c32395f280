"""`lloom receipts verify|report`: check and sum usage receipts from a file or the JetStream stream.

    lloom receipts verify receipts.jsonl          # one signed receipt (JSON) per line
    lloom receipts verify --stream                # everything in LLOOM_RECEIPTS
    lloom receipts verify --stream --key NB... --key NC...   # and only these executors' keys
    lloom receipts report --stream [--json]       # usage and cost per client, model and executor

`verify` checks every receipt's hash path and signature, its cost arithmetic,
and each executor's chain (gaps, duplicates, broken links, key changes); it
exits 1 when anything is wrong and names each problem. Lines that are not
receipts at all (truncated, garbage) are problems too.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from protocol import subjects as subj
from protocol.cli_common import GlobalOptions
from protocol.receipts import (
    ReceiptInvalid,
    SignedReceipt,
    check_chain,
    receipt_lines,
    signed_receipt_decoder,
    verify_receipt,
)

STREAM = subj.RECEIPTS_STREAM
SUBJECT = subj.RECEIPTS_ALL


def add_parser(sub: argparse._SubParsersAction, opts: GlobalOptions) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("receipts", help="verify or sum usage receipts", parents=[opts.parent("nats")])
    rsub = r.add_subparsers(dest="receipts_command", required=True)
    verify = rsub.add_parser("verify", help="check signatures, hashes and chains", parents=[opts.parent("nats")])
    verify.add_argument("--key", action="append", help="accept only receipts signed by this executor key")
    report = rsub.add_parser("report", help="sum usage and cost", parents=[opts.parent("nats", "json")])
    for p in (verify, report):
        p.add_argument("file", nargs="?", type=Path, help="a file of receipts, one JSON object per line")
        p.add_argument("--stream", action="store_true", help=f"read the JetStream stream {STREAM}")


async def run(args: argparse.Namespace, nc: NATS | None) -> int:
    if (args.file is None) == (not args.stream):
        print("lloom: give a receipts file or --stream (one of them)", file=sys.stderr)
        return 2
    lines = _file_lines(args.file) if args.file else stream_lines(nc)  # type: ignore[arg-type]
    if args.receipts_command == "verify":
        return await _verify(lines, args.key)
    return await _report(lines, args.json)


async def _file_lines(path: Path) -> AsyncIterator[tuple[str, bytes]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SystemExit(f"lloom: cannot read {path}: {e.strerror}") from e
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            yield f"{path}:{number}", line


async def stream_lines(nc: NATS) -> AsyncIterator[tuple[str, bytes]]:
    js = nc.jetstream()
    try:
        info = await js.stream_info(STREAM)
    except nats.errors.Error as e:
        raise SystemExit(f"lloom: cannot read the stream {STREAM}: {e}") from e
    if info.state.messages == 0:
        return
    sub = await js.subscribe(SUBJECT, ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            for i, line in enumerate(receipt_lines(msg.data), 1):
                yield f"{STREAM}#{msg.metadata.sequence.stream}:{i}", line
            if msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def _verify(lines: AsyncIterator[tuple[str, bytes]], keys: list[str] | None) -> int:
    good: list[tuple[SignedReceipt, bytes]] = []
    bad = 0
    async for where, line in lines:
        try:
            signed = signed_receipt_decoder.decode(line)
            good.append((signed, verify_receipt(signed, trusted_keys=keys)))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            bad += 1
            print(f"{where}: not a receipt (truncated or malformed): {e}")
        except ReceiptInvalid as e:
            bad += 1
            r = signed.receipt
            print(f"{where}: receipt {r.executor_id}#{r.seq} (job {r.job_id}): {e}")
    problems = check_chain(good)
    for problem in problems:
        print(f"chain: {problem}")
    print(f"{len(good) + bad} receipts: {len(good)} valid, {bad} invalid; chain problems: {len(problems)}")
    return 1 if bad or problems else 0


async def _report(lines: AsyncIterator[tuple[str, bytes]], as_json: bool) -> int:
    sums: dict[str, dict[str, list]] = {"client": defaultdict(_zero), "model": defaultdict(_zero), "executor": defaultdict(_zero)}
    async for where, line in lines:
        try:
            r = signed_receipt_decoder.decode(line).receipt
        except (msgspec.DecodeError, msgspec.ValidationError):
            print(f"lloom: skipping {where}: not a receipt (run `lloom receipts verify`)", file=sys.stderr)
            continue
        for axis, key in (("client", r.client or "(unknown)"), ("model", r.model), ("executor", r.executor_id)):
            row = sums[axis][key]
            row[0] += 1
            row[1] += r.usage.prompt_tokens
            row[2] += r.usage.completion_tokens
            row[3] += r.cost
    if as_json:
        out = {
            axis: {k: {"jobs": v[0], "prompt_tokens": v[1], "completion_tokens": v[2], "cost_usd": str(v[3])}
                   for k, v in sorted(rows.items())}
            for axis, rows in sums.items()
        }  # fmt: skip
        sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
        return 0
    for axis, rows in sums.items():
        print(f"by {axis}:")
        print(f"  {'':30} {'jobs':>7} {'prompt':>10} {'completion':>11} {'cost USD':>14}")
        for key, (jobs, prompt, completion, cost) in sorted(rows.items()):
            print(f"  {key[:30]:30} {jobs:>7} {prompt:>10} {completion:>11} {cost:>14}")
    return 0


def _zero() -> list:
    return [0, 0, 0, Decimal(0)]
