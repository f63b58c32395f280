"""`lloom receipts verify|report`: check and sum usage receipts from a file or the JetStream stream.

    lloom receipts verify receipts.jsonl          # one signed receipt (JSON) per line
    lloom receipts verify --stream                # everything in LLOOM_RECEIPTS
    lloom receipts verify --stream --key NB... --key NC...   # and only these executors' keys
    lloom receipts verify --stream --trust keys.txt   # keys (and operators) of a keyring
    lloom receipts report --stream [--json]       # usage and cost per client, model and executor
    lloom receipts report --stream --by-key       # and per gateway API key (protocol/settlements.py)

`verify` checks every receipt's hash path and signature, its cost arithmetic,
whether its key is known, and each executor's chain (a start other than 1, gaps,
duplicates, broken links, key changes); it exits 1 when anything is wrong and
names each problem. Lines that are not receipts at all (truncated, garbage) are
problems too. The same receipt twice (identical bytes: a re-publish that raced its
original) counts once in `verify` and `report` alone; two different receipts with
one seq are a problem. Receipts an executor re-published because the stream had
lost them (a `Lloom-Healed-By` message) are reported as healed.

Which keys are known: those given with `--key`; else the keyring of `--trust FILE`
(or `LLOOM_TRUSTED_KEYS`), executor keys and the keys its operators endorsed; else
the keys live executors announce now, each for the executor id it holds in the
catalogue (asked over `--nats`). A receipt signed by any other key is a failure: a
stranger can sign a receipt naming any client. `--any-key` checks signatures only.
`report` applies the same checks and leaves out (and names, on stderr) every receipt
that fails them, so a forged receipt bills nobody. `--by-key` adds the cost per gateway
API key: each verified receipt is billed to the key a gateway's settlement names for it
(`LLOOM_SETTLEMENTS`, read over `--nats`), or to `(no key)`; a settlement without a
verified receipt bills nothing.
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

from protocol import settlements
from protocol import subjects as subj
from protocol.catalog import Catalog
from protocol.cli_common import GlobalOptions
from protocol.receipts import (
    ReceiptInvalid,
    SignedReceipt,
    check_chain,
    receipt_lines,
    signed_receipt_decoder,
    verify_receipt,
)
from protocol.trust import Trust, TrustError

STREAM = subj.RECEIPTS_STREAM
SUBJECT = subj.RECEIPTS_ALL


def add_parser(sub: argparse._SubParsersAction, opts: GlobalOptions) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("receipts", help="verify or sum usage receipts", parents=[opts.parent("nats", "trust")])
    rsub = r.add_subparsers(dest="receipts_command", required=True)
    verify = rsub.add_parser("verify", help="check signatures, keys, hashes and chains",
                             parents=[opts.parent("nats", "trust")])  # fmt: skip
    report = rsub.add_parser("report", help="sum usage and cost", parents=[opts.parent("nats", "json", "trust")])
    for p in (verify, report):
        p.add_argument("file", nargs="?", type=Path, help="a file of receipts, one JSON object per line")
        p.add_argument("--stream", action="store_true", help=f"read the JetStream stream {STREAM}")
        p.add_argument("--key", action="append", help="accept only receipts signed by this executor key")
        p.add_argument("--any-key", action="store_true", help="accept any key (check signatures only)")
    report.add_argument("--by-key", action="store_true",
                        help=f"also sum per gateway API key (reads the stream {settlements.STREAM})")  # fmt: skip


class Keys:
    """Whose receipts count: `problem()` names what is wrong with a receipt's key, or None."""

    def __init__(self, *, listed: list[str] | None, trust: Trust, bound: dict[str, str] | None, any_key: bool) -> None:
        self.listed = set(listed) if listed else None
        self.trust = trust
        self.bound = bound  # executor id -> key, from the live catalogue; None if it could not be asked
        self.any_key = any_key

    def problem(self, signed: SignedReceipt) -> str | None:
        r = signed.receipt
        if self.any_key:
            return None
        if self.listed is not None:
            return None if r.executor_key in self.listed else f"signed by {r.executor_key}, not one of the --key keys"
        if self.trust.closed:
            if self.trust.trusts(r.executor_key, signed.endorsement):
                return None
            return f"signed by {r.executor_key}, which the keyring does not trust"
        if self.bound is None:
            return (f"signed by {r.executor_key}, an unknown key (no keyring, and no catalogue to ask):"
                    " pass --trust FILE, or --any-key to check signatures only")  # fmt: skip
        holder = self.bound.get(r.executor_id)
        if holder == r.executor_key:
            return None
        if holder is None:
            return f"signed by {r.executor_key}, a key no live executor announces (pass --trust FILE to name it)"
        return f"signed by {r.executor_key}, but executor {r.executor_id} announces key {holder}: an impostor"


async def run(args: argparse.Namespace, nc: NATS | None) -> int:
    if (args.file is None) == (not args.stream):
        print("lloom: give a receipts file or --stream (one of them)", file=sys.stderr)
        return 2
    try:
        trust = Trust.from_file(args.trust) if args.trust else Trust()  # the option's default is $LLOOM_TRUSTED_KEYS
    except TrustError as e:
        print(f"lloom: {e}", file=sys.stderr)
        return 2
    bound = None
    if nc is not None and not (args.any_key or args.key or trust.closed):
        bound = await live_keys(nc)
    keys = Keys(listed=args.key, trust=trust, bound=bound, any_key=args.any_key)
    lines = _file_lines(args.file) if args.file else stream_lines(nc)  # type: ignore[arg-type]
    if args.receipts_command == "verify":
        return await _verify(lines, keys)
    settled = None
    if getattr(args, "by_key", False):
        if nc is None:
            print("lloom: --by-key reads the settlements stream: use it with --stream", file=sys.stderr)
            return 2
        try:
            settled = await settlements.read_all(nc)
        except nats.errors.Error as e:
            print(f"lloom: cannot read the stream {settlements.STREAM}: {e}", file=sys.stderr)
            return 2
    return await _report(lines, args.json, keys, settled)


async def live_keys(nc: NATS) -> dict[str, str] | None:
    """Each live executor's id and the key that holds it, from one catalogue query."""
    catalog = Catalog(nc)
    try:
        await catalog.refresh()
    except nats.errors.Error:
        return None
    return {e.executor_id: e.key for e in catalog.entries()}


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


def check(line: bytes, keys: Keys) -> tuple[SignedReceipt, bytes]:
    """The receipt on `line` and its leaf hash; `ReceiptInvalid` (or a decode error) saying what is wrong."""
    signed = signed_receipt_decoder.decode(line)
    leaf = verify_receipt(signed)
    problem = keys.problem(signed)
    if problem is not None:
        raise ReceiptInvalid(problem)
    return signed, leaf


def _describe(line: bytes) -> str:
    try:
        r = signed_receipt_decoder.decode(line).receipt
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "receipt"
    return f"receipt {r.executor_id}#{r.seq} (job {r.job_id}, client {r.client or '(unknown)'}, cost {r.cost})"


async def _verify(lines: AsyncIterator[Line], keys: Keys) -> int:
    good: list[tuple[SignedReceipt, bytes]] = []
    seen: set[tuple[str, int, bytes]] = set()
    healed: Counter[tuple[str, str]] = Counter()  # (re-published by, whose) -> receipts
    bad = repeats = 0
    async for where, line, healed_by in lines:
        try:
            signed, leaf = check(line, keys)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            bad += 1
            print(f"{where}: not a receipt (truncated or malformed): {e}")
            continue
        except ReceiptInvalid as e:
            bad += 1
            print(f"{where}: {_describe(line)}: {e}")
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


async def _report(lines: AsyncIterator[Line], as_json: bool, keys: Keys,
                  settled: dict[tuple[str, int], settlements.Settlement] | None = None) -> int:  # fmt: skip
    sums: dict[str, dict[str, list]] = {"client": defaultdict(_zero), "model": defaultdict(_zero), "executor": defaultdict(_zero)}
    if settled is not None:
        sums["key"] = defaultdict(_zero)
    seen: set[bytes] = set()
    excluded = 0
    async for where, line, _healed_by in lines:
        try:
            signed, leaf = check(line, keys)
        except (msgspec.DecodeError, msgspec.ValidationError):
            print(f"lloom: skipping {where}: not a receipt (run `lloom receipts verify`)", file=sys.stderr)
            continue
        except ReceiptInvalid as e:
            excluded += 1  # billed to nobody: a stranger can sign a receipt naming any client
            print(f"lloom: excluded {where}: {_describe(line)}: {e}", file=sys.stderr)
            continue
        if leaf in seen:
            continue  # the same receipt stored twice is billed once
        seen.add(leaf)
        r = signed.receipt
        axes = [("client", r.client or "(unknown)"), ("model", r.model), ("executor", r.executor_id)]
        if settled is not None:
            s = settled.get((r.executor_key, r.seq))
            axes.append(("key", f"{s.key_id} ({s.key_name})" if s is not None else "(no key)"))
        for axis, key in axes:
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
        if excluded:
            out["excluded"] = excluded  # type: ignore[assignment]
        sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
        return 0
    for axis, rows in sums.items():
        print(f"by {axis}:")
        print(f"  {'':30} {'jobs':>7} {'prompt':>10} {'completion':>11} {'cost USD':>14}")
        for key, (jobs, prompt, completion, cost) in sorted(rows.items()):
            print(f"  {key[:30]:30} {jobs:>7} {prompt:>10} {completion:>11} {cost:>14}")
    if excluded:
        print(f"excluded: {excluded} receipts that do not verify (listed on stderr)")
    return 0


def _zero() -> list:
    return [0, 0, 0, Decimal(0)]
