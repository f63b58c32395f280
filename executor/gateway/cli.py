"""`lloom-gateway`: run the OpenAI-compatible HTTP gateway against a NATS bus.

    lloom-gateway --nats nats://127.0.0.1:4222 --listen 127.0.0.1:8640
    lloom-gateway --config executor.toml        # its [gateway] and [nats] sections

Prints its URL when it listens; SIGTERM or SIGINT stops accepting and lets open
requests and streams finish for `[gateway] drain_secs`, then it exits 0.
Exit codes: 0 stopped, 2 bad usage, config or no connection.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import msgspec

from executor.config import ConfigError, ExecutorConfig, load_config
from executor.gateway.server import GatewayServer, ListenError, parse_listen
from protocol.client import DEFAULT_URL, LloomClient

# Allocations between young-generation collections once serving (Python's default: 700).
GC_THRESHOLD = 20_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lloom-gateway", description="OpenAI-compatible HTTP gateway to a Lloom network")
    p.add_argument("--nats", help=f"NATS URL (default: [node] nats_url, $LLOOM_NATS_URL, else {DEFAULT_URL})")
    p.add_argument("--listen", help="host:port to listen on (default: [gateway] listen, 127.0.0.1:8640)")
    p.add_argument("--config", type=Path, help="config file (its [gateway], [nats] and [node] sections)")
    p.add_argument("--drain-secs", type=float, help="grace for open streams on SIGTERM")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    try:
        config, _ = load_config(args.config)
    except ConfigError as e:
        print(f"lloom-gateway: {e}", file=sys.stderr)
        return 2
    gw = config.gateway
    changes = {}
    if args.listen:
        changes["listen"] = args.listen
    if args.drain_secs is not None:
        changes["drain_secs"] = args.drain_secs
    if changes:
        gw = msgspec.structs.replace(gw, **changes)
    try:
        parse_listen(gw.listen)
    except ListenError as e:
        print(f"lloom-gateway: {e}", file=sys.stderr)
        return 2
    url = args.nats or config.node.nats_url or os.environ.get("LLOOM_NATS_URL") or DEFAULT_URL
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        client = await LloomClient.connect(url, timeout=gw.default_timeout_secs, client_id=gw.client_id,
                                           options=config.nats)  # fmt: skip
    except ConnectionError as e:
        print(f"lloom-gateway: {e}", file=sys.stderr)
        return 2
    try:
        server = GatewayServer(client, gw)
        try:
            await server.start()
        except OSError as e:
            print(f"lloom-gateway: cannot listen on {gw.listen}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"lloom-gateway: serving the OpenAI API at {server.url}/v1", flush=True)
        # What exists now (modules, the app, the connection) lives as long as the process: out of
        # the collector's sight. Each request leaves only short-lived objects, freed by reference
        # counting, so collections every 700 allocations (the default) were mostly wasted work.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 20)
        await stop.wait()
        print("lloom-gateway: stopping; draining open requests", file=sys.stderr, flush=True)
        await server.stop()
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - Windows
        runner = asyncio.run
    sys.exit(runner(run(args)))


if __name__ == "__main__":
    main()
