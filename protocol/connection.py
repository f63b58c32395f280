"""Opening a NATS connection the way every long-lived Lloom peer needs it.

Two phases with different rules. Connecting: a few quick attempts, then a
`ConnectionError` that names the URL and the real cause (nats.py's defaults
would retry for ever with `max_reconnect_attempts=-1`, or log a traceback per
attempt through its default error callback). Connected: reconnect for ever, so
a node or client rides out a server restart instead of giving up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS

ErrorReporter = Callable[[Exception], Awaitable[None]]
Reconnected = Callable[[], Awaitable[None]]


async def connect_nats(
    servers: str | list[str],
    *,
    name: str,
    on_error: ErrorReporter | None = None,
    on_reconnected: Reconnected | None = None,
    initial_attempts: int = 3,
    connect_timeout: float = 5.0,
) -> NATS:
    """Connect, or raise `ConnectionError`; `on_error` hears asynchronous errors once connected,
    `on_reconnected` is awaited after each reconnect (subscriptions restored by then)."""
    if isinstance(servers, str):
        servers = [u.strip() for u in servers.split(",") if u.strip()]  # a cluster seed list
    failures: list[Exception] = []
    nc = NATS()

    async def error_cb(e: Exception) -> None:
        if nc.is_connected or nc.is_reconnecting:
            if on_error is not None:
                await on_error(e)
        else:
            failures.append(e)

    try:
        await nc.connect(
            servers,
            name=name,
            error_cb=error_cb,
            reconnected_cb=on_reconnected,
            max_reconnect_attempts=initial_attempts,
            reconnect_time_wait=0.5,
            connect_timeout=connect_timeout,
        )
    except (OSError, nats.errors.Error) as e:
        cause = failures[-1] if failures else e
        raise ConnectionError(f"cannot connect to NATS at {', '.join(servers)}: {cause or type(cause).__name__}") from e
    # From now on, never give up on the cluster: nats.py reads these per attempt.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 1.0
    return nc


async def close_nats(nc: NATS) -> None:
    """Drain (flush what is still to be said), or just close when draining is refused."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except (nats.errors.Error, OSError, RuntimeError):  # e.g. reconnecting: nothing can be delivered anyway
        try:
            await nc.close()
        except (nats.errors.Error, OSError, RuntimeError):
            # nats.py may fail writing to a socket that is already gone (server down at
            # shutdown); the connection is over either way, and the process must exit 0.
            pass


async def subscriptions_live(nc: NATS) -> None:
    """Return once the server knows every subscription made so far on `nc`.

    One `flush()` is not enough with nats-py 2.16: `subscribe()` queues its SUB for the
    flusher task, while `flush()` writes its PING straight to the socket, so the PONG can
    come back before the SUB was even sent. By the time that first PONG is read the
    flusher has written the queued SUBs, so a second PING is ordered after them.
    """
    await nc.flush()
    await nc.flush()
