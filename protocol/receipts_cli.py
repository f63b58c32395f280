"""`lloom receipts verify|report`: check and sum usage receipts from a file or the JetStream stream.

    lloom receipts verify receipts.jsonl          # one signed receipt (JSON) per line
    lloom receipts verify --stream                # everything in LLOOM_RECEIPTS
    lloom receipts verify --stream --key NB... --key NC...   # and only these executors' keys
    lloom receipts report --stream [--json]       # usage and cost per client, model and executor

`verify` checks every receipt's hash path and signature, its cost arithmetic,
and each executor's chain (gaps, duplicates, broken links, key changes); it
exits 1 when anything is wrong and names each problem. Lines that are not
receipts at all (truncated, garbage) are problems too. The same receipt twice
(identical bytes: a re-publish that raced its original) counts once in `verify`
and `report` alone; two different receipts with one seq are a problem. Receipts
an executor re-published because the stream had lost them (a
`Lloom-Healed-By` message) are reported as healed.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
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
    leaf_hash,
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


Line = tuple[str, bytes, str | None]  # where, the receipt's bytes, who re-published it (healed)


async def _file_lines(path: Path) -> AsyncIterator[Line]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SystemExit(f"lloom: cannot read {path}: {e.strerror}") from e
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            yield f"{path}:{number}", line, None


async def stream_lines(nc: NATS) -> AsyncIterator[Line]:
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
            healed_by = (msg.headers or {}).get(subj.HDR_HEALED_BY)
            for i, line in enumerate(receipt_lines(msg.data), 1):
                yield f"{STREAM}#{msg.metadata.sequence.stream}:{i}", line, healed_by
            if msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def _verify(lines: AsyncIterator[Line], keys: list[str] | None) -> int:
    good: list[tuple[SignedReceipt, bytes]] = []
    seen: set[tuple[str, int, bytes]] = set()
    healed: Counter[tuple[str, str]] = Counter()  # (re-published by, whose) -> receipts
    bad = repeats = 0
    async for where, line, healed_by in lines:
        try:
            signed = signed_receipt_decoder.decode(line)
            leaf = verify_receipt(signed, trusted_keys=keys)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            bad += 1
            print(f"{where}: not a receipt (truncated or malformed): {e}")
            continue
        except ReceiptInvalid as e:
            bad += 1
            r = signed.receipt
            print(f"{where}: receipt {r.executor_id}#{r.seq} (job {r.job_id}): {e}")
            continue
        r = signed.receipt
        if (r.executor_key, r.seq, leaf) in seen:
            repeats += 1  # the very same receipt again: counted once
            continue
        seen.add((r.executor_key, r.seq, leaf))
        good.append((signed, leaf))
        if healed_by is not None:
            healed[(healed_by, r.executor_id)] += 1
    problems = check_chain(good)
    for problem in problems:
        print(f"chain: {problem}")
    for (by, whose), n in sorted(healed.items()):
        of = "" if by == whose else f" (receipts of {whose})"
        print(f"healed: {n} receipts re-published by {by}{of} after the stream had lost them")
    if repeats:
        print(f"{repeats} identical receipts stored twice, counted once")
    print(f"{len(good) + bad} receipts: {len(good)} valid, {bad} invalid; chain problems: {len(problems)}")
    return 1 if bad or problems else 0


async def _report(lines: AsyncIterator[Line], as_json: bool) -> int:
    sums: dict[str, dict[str, list]] = {"client": defaultdict(_zero), "model": defaultdict(_zero), "executor": defaultdict(_zero)}
    seen: set[bytes] = set()
    async for where, line, _healed_by in lines:
        try:
            r = signed_receipt_decoder.decode(line).receipt
        except (msgspec.DecodeError, msgspec.ValidationError):
            print(f"lloom: skipping {where}: not a receipt (run `lloom receipts verify`)", file=sys.stderr)
            continue
        leaf = leaf_hash(r)
        if leaf in seen:
            continue  # the same receipt stored twice is billed once
        seen.add(leaf)
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
