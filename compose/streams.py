"""Create a cluster's replicated streams once it has formed: the `streams` service of docker-compose.yml.

    python -m compose.streams --nats nats://127.0.0.1:4222 --replicas 3

Owns nothing but its command line: the streams themselves (`LLOOM_RECEIPTS`, the durable job queue
`LLOOM_JOBS` and its results bucket `LLOOM_RESULTS`) are made by compose/cluster.py's functions,
as the local-process launcher makes them. It connects as the user in `LLOOM_NATS_USER` with the
password in `LLOOM_NATS_PASSWORD` (the admin of compose/nats/secure.conf: executors may not choose
a stream's replicas), retries until the JetStream meta group has a leader and the peers to place
R3, and exits 0 when every stream exists (also when they did already: a restart changes nothing).
Executors start after it, so they find the R3 streams instead of creating R1 ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from compose.cluster import create_queue, create_receipts_stream
from protocol.connection import NatsConnectOptions


async def create_streams(url: str, replicas: int, options: NatsConnectOptions) -> None:
    await create_receipts_stream(url, replicas=replicas, options=options)
    await create_queue(url, replicas=replicas, options=options)


def main() -> int:
    p = argparse.ArgumentParser(description="Create the Lloom streams, replicated, on a running cluster.")
    p.add_argument("--nats", required=True, metavar="URLS", help="comma-separated server URLs")
    p.add_argument("--replicas", type=int, default=3, choices=range(1, 6), metavar="N")
    args = p.parse_args()
    user = os.environ.get("LLOOM_NATS_USER") or None
    options = NatsConnectOptions(user=user, password=os.environ.get("LLOOM_NATS_PASSWORD") if user else None)
    try:
        asyncio.run(create_streams(args.nats, args.replicas, options))
    except (RuntimeError, ConnectionError, TimeoutError) as e:
        print(f"streams: {e or 'timed out'}", file=sys.stderr)
        return 1
    print(f"streams: LLOOM_RECEIPTS, LLOOM_JOBS and LLOOM_RESULTS exist with {args.replicas} replicas", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
