"""`lloom-gateway`: run the OpenAI-compatible HTTP gateway against a NATS bus.

    lloom-gateway --nats nats://127.0.0.1:4222 --listen 127.0.0.1:8640
    lloom-gateway --config executor.toml        # its [gateway], [nats] and [telemetry] sections
    lloom-gateway keys create|list|revoke       # API keys (executor/gateway/keys_cli.py)

Prints its URL when it listens; SIGTERM or SIGINT stops accepting and lets open
requests and streams finish for `[gateway] drain_secs`, then it exits 0.
`[telemetry]` gives it metrics (a Prometheus endpoint, OTLP) and spans like an executor's
(executor/gateway/telemetry.py, docs/observability.md); its service.name is `lloom-gateway`
unless `service_name` says otherwise.
Exit codes: 0 stopped, 2 bad usage, config, metrics port taken or no connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import msgspec
import structlog

from executor.config import ConfigError, load_config
from executor.gateway import keys_cli
from executor.gateway.keystore import KeyStoreError, RedactKeys
from executor.gateway.seams import seams_for
from executor.gateway.server import GatewayServer, ListenError, parse_listen
from executor.process.heap import settle_heap
from protocol.client import DEFAULT_URL, LloomClient

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lloom-gateway", description="OpenAI-compatible HTTP gateway to a Lloom network",
                                epilog="API keys: lloom-gateway keys create|list|revoke (lloom-gateway keys --help)")
    p.add_argument("--nats", help=f"NATS URL (default: [node] nats_url, $LLOOM_NATS_URL, else {DEFAULT_URL})")
    p.add_argument("--listen", help="host:port to listen on (default: [gateway] listen, 127.0.0.1:8640)")
    p.add_argument("--config", type=Path, help="config file (its [gateway], [nats], [node] and [telemetry] sections)")
    p.add_argument("--drain-secs", type=float, help="grace for open streams on SIGTERM")
    p.add_argument("--api-keys", action="store_true", default=None,
                   help="require API keys ([gateway] api_keys; `lloom-gateway keys create` makes them)")  # fmt: skip
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
    if args.api_keys:
        changes["api_keys"] = True
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
    telemetry = None
    try:
        observer = None
        if config.telemetry.enabled:  # the OpenTelemetry SDK is imported only then
            from executor.gateway.telemetry import GatewayTelemetry

            telemetry = GatewayTelemetry.standalone(config.telemetry, gw.client_id or "gateway")
            await telemetry.start()
            observer = telemetry.observer
            if telemetry.endpoint is not None:
                endpoint = telemetry.endpoint
                print(f"lloom-gateway: metrics at http://{endpoint.host}:{endpoint.port}/metrics", file=sys.stderr)
        try:
            admission, routes = await seams_for(client, gw)
        except KeyStoreError as e:
            print(f"lloom-gateway: API keys are on ([gateway] api_keys) but {e}", file=sys.stderr)
            return 2
        server = GatewayServer(client, gw, admission=admission, extra_routes=routes, observer=observer)
        try:
            await server.start()
        except OSError as e:
            print(f"lloom-gateway: cannot listen on {gw.listen}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"lloom-gateway: serving the OpenAI API at {server.url}/v1", flush=True)
        # What exists now (modules, the app, the connection) lives as long as the process: out of
        # the collector's sight; each request's short-lived objects are freed by reference counting.
        settle_heap()
        if gw.status_page:
            print(f"lloom-gateway: live status page at {server.url}/", file=sys.stderr, flush=True)
        await stop.wait()
        print("lloom-gateway: stopping; draining open requests", file=sys.stderr, flush=True)
        await server.stop()
    except ConfigError as e:
        print(f"lloom-gateway: {e}", file=sys.stderr)
        return 2
    finally:
        if telemetry is not None:  # after the drain: the last requests are in the final export
            await telemetry.aclose()
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        sys.exit(asyncio.run(keys_cli.run(keys_cli.parse_args(argv[1:]))))
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactKeys())
    # The telemetry parts it shares with the executor log through structlog: to stderr, at this level
    # (stdout carries only the URL line).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, args.log_level.upper())),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # fmt: skip
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - Windows
        runner = asyncio.run
    sys.exit(runner(run(args)))


if __name__ == "__main__":
    main()
