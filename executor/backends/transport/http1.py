"""The default transport: a bounded keep-alive pool of lean HTTP/1.1 connections to one origin.

`Http1Pool` owns the connections (`http1_connection.Connection`) to one
`scheme://host:port`: it hands out warm ones LIFO, opens new ones up to
`max_connections`, and makes further callers wait at most `Timeouts.acquire`
for one to come back before failing with `PoolTimeout`. Its public surface is
`acquire`, `release` (back to the pool, if still reusable) and `discard`
(abort and forget).

`Http1Transport` implements `base.Transport` over that pool. `_send` is the one
place a request is sent: it retries once, on a fresh connection, when a reused
one turns out to have been closed cleanly by the server before it answered (the
keep-alive race). A reset is not retried: the server may have been running the
request. Whole responses and streams both go through it.

The hot path allocates what the exchange needs and nothing more: endpoints are
pre-encoded request heads (bytes), and a whole response costs one framed
request, one head future, one timer and the `Response`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from urllib.parse import urlsplit

from executor.backends.transport.base import (
    TRACE_HEADERS,
    ConnectFailed,
    ConnectionDropped,
    PoolTimeout,
    Response,
    Timeouts,
    split_lines,
)
from executor.backends.transport.http1_connection import Connection


class Http1Pool:
    """Keep-alive connections to one origin (`scheme://host:port`)."""

    def __init__(self, base_url: str, *, max_connections: int = 100) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.path_prefix = url.path.rstrip("/")
        default_port = self.port == (443 if url.scheme == "https" else 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self.max_connections = max_connections
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    def encode_head(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        """The request line and fixed headers, built once per endpoint; Content-Length is added per call."""
        lines = [f"{method} {self.path_prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def acquire(self, timeouts: Timeouts) -> Connection:
        """A connection for one exchange: an idle one, a new one, or the next one released
        within `timeouts.acquire` (else `PoolTimeout`)."""
        deadline: float | None = None
        while True:
            if self._closed:
                raise ConnectFailed("the backend client is closed")
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    conn.reused = True
                    return conn
                self._open -= 1
            if self._open < self.max_connections:
                self._open += 1
                try:
                    return await self._connect(timeouts.connect)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            # Every connection is busy. The deadline spans all the wake-ups this caller
            # may lose to others, so it is fixed on the first wait.
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeouts.acquire
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as e:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were woken as we left: pass the turn on
                if isinstance(e, TimeoutError):
                    raise PoolTimeout(
                        f"no free connection to {self.host_header} within {timeouts.acquire:g}s:"
                        f" all {self.max_connections} stayed busy (the pool is exhausted)",
                        max_connections=self.max_connections,
                        waited_s=timeouts.acquire,
                    ) from None
                raise

    def release(self, conn: Connection) -> None:
        """Give back a connection after its exchange; kept for reuse only if it can be reused."""
        if conn.closed or not conn.keep_alive or not conn.finished or self._closed:
            self.discard(conn)
            return
        self._idle.append(conn)
        self._wake_one()

    def discard(self, conn: Connection) -> None:
        """Drop a connection (failed, cancelled or left early) and free its place."""
        conn.abort()
        self._open -= 1
        self._wake_one()

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()

    async def _connect(self, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as e:
            raise ConnectFailed(f"connecting to {self.host_header} timed out after {timeout:g}s") from e
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.host_header}: {e.strerror or e}") from e
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class Http1Transport:
    """`base.Transport` over an `Http1Pool`, which it owns and closes in `aclose()`."""

    name = "http1"

    def __init__(self, base_url: str, *, max_connections: int = 100) -> None:
        self.pool = Http1Pool(base_url, max_connections=max_connections)

    def endpoint(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        return self.pool.encode_head(method, path, headers)

    async def request(self, endpoint: bytes, body: bytes, timeouts: Timeouts) -> Response:
        conn, response = await self._send(_frame(endpoint, body), timeouts, streamed=False)
        try:
            response.body = await conn.read_all()
        except BaseException:
            self.pool.discard(conn)
            raise
        self.pool.release(conn)
        return response

    def stream(self, endpoint: bytes, body: bytes, timeouts: Timeouts) -> Http1Stream:
        return Http1Stream(self, _frame(endpoint, body), timeouts)

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def _send(self, request: bytes, timeouts: Timeouts, *, streamed: bool) -> tuple[Connection, Response]:
        """Send `request` and wait for the response head; the one place the keep-alive race is retried."""
        total, idle = (None, timeouts.idle_read) if streamed else (timeouts.total, None)
        for attempt in (0, 1):
            conn = await self.pool.acquire(timeouts)
            try:
                return conn, await conn.start(request, total_s=total, idle_s=idle)
            except ConnectionDropped as e:
                self.pool.discard(conn)
                if attempt == 0 and conn.reused and e.safe_to_retry:
                    continue  # the server had closed this idle connection: a fresh one is safe
                raise
            except BaseException:
                self.pool.discard(conn)
                raise
        raise AssertionError("unreachable")


class Http1Stream:
    """`async with transport.stream(...) as response:` a response read while it arrives.

    Leaving the block before the body ended, with an error or by cancellation,
    aborts the connection; a finished body gives it back to the pool."""

    __slots__ = ("_transport", "_request", "_timeouts", "_conn", "status", "headers")

    def __init__(self, transport: Http1Transport, request: bytes, timeouts: Timeouts) -> None:
        self._transport = transport
        self._request = request
        self._timeouts = timeouts
        self._conn: Connection | None = None
        self.status = 0
        self.headers: Mapping[str, str] = {}

    async def __aenter__(self) -> Http1Stream:
        self._conn, response = await self._transport._send(self._request, self._timeouts, streamed=True)
        self.status, self.headers = response.status, response.headers
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if et is None and conn.finished:
            self._transport.pool.release(conn)
        else:
            # Closing the socket is what tells the backend to stop generating.
            self._transport.pool.discard(conn)

    async def read_all(self) -> bytes:
        assert self._conn is not None, "read inside the `async with` block"
        return await self._conn.read_all()

    def lines(self) -> AsyncIterator[bytes]:
        assert self._conn is not None, "read inside the `async with` block"
        return split_lines(self._conn.chunks())


def _frame(head: bytes, body: bytes) -> bytes:
    extra = TRACE_HEADERS.get()
    if extra:
        head += "".join(f"{k}: {v}\r\n" for k, v in extra.items()).encode("latin-1")
    return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
