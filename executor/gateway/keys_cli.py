"""`lloom-gateway keys create|list|revoke`: manage the gateways' API keys in the NATS KV bucket.

    lloom-gateway keys create --name alice --budget 5.00 --rpm 60   # prints the key once
    lloom-gateway keys list [--json]                                 # ids, names, limits, spend; never hashes
    lloom-gateway keys revoke 3f9a0c1b2d4e                           # refused from the next request on

Run it as a user allowed to write the keys bucket (the `gateway` or `admin` role of
compose/nats/secure.conf). The key itself is printed once and stored nowhere: only its
SHA-256 is. Exit codes: 0 done, 1 no such key, 2 bad usage or no connection.
"""

from __future__ import annotations

import argparse
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import msgspec

from executor.config import ConfigError, load_config
from executor.gateway.keystore import KeyRecord, KeyStore, KeyStoreError, UnknownKey
from protocol.client import DEFAULT_URL
from protocol.connection import connect_nats, redact_url


def _usd(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of USD (e.g. 5 or 0.25)") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError("a budget is a finite amount >= 0 USD")
    return value


def _rpm(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("--rpm is a whole number of requests per minute, >= 1")
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lloom-gateway keys", description="the gateways' API keys")
    p.add_argument("--nats", help=f"NATS URL (default: [node] nats_url, $LLOOM_NATS_URL, else {DEFAULT_URL})")
    p.add_argument("--config", type=Path, help="config file (its [nats] credentials and [node] nats_url)")
    sub = p.add_subparsers(dest="keys_command", required=True)
    c = sub.add_parser("create", help="make a key and print it (once)")
    c.add_argument("--name", required=True, help="who or what the key is for (shown in lists and reports)")
    c.add_argument("--budget", type=_usd, help="USD the key may spend in all (default: unlimited)")
    c.add_argument("--rpm", type=_rpm, help="requests per minute, per gateway (default: unlimited)")
    ls = sub.add_parser("list", help="every key: id, name, limits, spend (never a key or its hash)")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="refuse a key from its next request on")
    r.add_argument("id", help="the key's id (from `keys list`)")
    return p.parse_args(argv)


class KeyRow(msgspec.Struct, kw_only=True):
    id: str
    name: str
    created_ms: int
    revoked: bool
    rpm: int | None
    budget: Decimal | None
    spend: Decimal
    held: Decimal


def _row(r: KeyRecord, now_ms: int) -> KeyRow:
    return KeyRow(id=r.id, name=r.name, created_ms=r.created_ms, revoked=r.revoked, rpm=r.rpm, budget=r.budget,
                  spend=r.spend, held=r.held(now_ms))  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    try:
        config, _ = load_config(args.config)
    except ConfigError as e:
        print(f"lloom-gateway keys: {e}", file=sys.stderr)
        return 2
    url = args.nats or config.node.nats_url or os.environ.get("LLOOM_NATS_URL") or DEFAULT_URL
    try:
        nc = await connect_nats(url, name="lloom-gateway-keys", options=config.nats)
    except (ConnectionError, OSError) as e:
        print(f"lloom-gateway keys: cannot connect to {redact_url(url)}: {e}", file=sys.stderr)
        return 2
    store = KeyStore(nc)
    try:
        if args.keys_command == "create":
            record, key = await store.create(args.name, rpm=args.rpm, budget=args.budget)
            print(f"created key {record.id} ({record.name}); it is shown this once, keep it now:")
            print(key)
        elif args.keys_command == "list":
            now = store.now_ms()
            rows = [_row(r, now) for r in await store.list()]
            if args.json:
                sys.stdout.write(msgspec.json.encode(rows).decode() + "\n")
            else:
                print(f"{'id':12}  {'name':20} {'state':8} {'rpm':>6} {'budget USD':>12} {'spent USD':>12} {'held USD':>10}")
                for row in rows:
                    print(f"{row.id:12}  {row.name[:20]:20} {'revoked' if row.revoked else 'active':8}"
                          f" {row.rpm if row.rpm else '-':>6} {row.budget if row.budget is not None else '-':>12}"
                          f" {row.spend:>12} {row.held:>10}")  # fmt: skip
        else:
            record = await store.revoke(args.id)
            print(f"revoked key {record.id} ({record.name})")
    except UnknownKey as e:
        print(f"lloom-gateway keys: {e}", file=sys.stderr)
        return 1
    except KeyStoreError as e:
        print(f"lloom-gateway keys: {e}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    return 0
