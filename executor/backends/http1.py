"""A lean keep-alive HTTP/1.1 client for the backend hot path.

Profiling the executor showed aiohttp's client machinery (request and response
objects, header multidicts, timeout handles, payload wrappers) to be about half
of the executor's CPU per job. A backend exchange needs far less: write one
pre-encoded request, parse one response with httptools (llhttp, the parser
behind uvicorn and Node.js), and keep the connection for the next job. This
module does exactly that for one origin, with:

- a bounded pool of keep-alive connections (LIFO, so warm connections are reused);
- one timer per exchange: a total deadline for whole responses, an idle deadline
  (no byte for N seconds) for streams;
- streamed bodies as lines, with reading paused while the consumer lags;
- leaving a stream early or cancelling a call aborts the connection, which is
  how the backend learns that nobody waits for its tokens any more;
- one retry on a fresh connection when a reused one turns out to have been
  closed (FIN, no answer) by the server before it answered: the keep-alive
  race. A reset is not retried: the server may have been running the request.

Failures are the `HttpError` subclasses below; the backend maps them to wire errors.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import urlsplit

import httptools

_PAUSE_ABOVE = 1 << 20  # bytes buffered for a slow stream reader before we stop reading the socket


class HttpError(Exception):
    """Base of this client's failures."""


class ConnectFailed(HttpError):
    """No connection could be opened (refused, unreachable, DNS, TLS)."""


class ConnectionDropped(HttpError):
    """The connection closed or reset before the response was complete."""

    def __init__(self, message: str, *, got_response: bool, clean_close: bool = False) -> None:
        super().__init__(message)
        self.got_response = got_response
        # Closed with a FIN and no answer: how a server drops an idle keep-alive
        # connection. A reset instead may mean it crashed while running our request.
        self.clean_close = clean_close

    @property
    def safe_to_retry(self) -> bool:
        return self.clean_close and not self.got_response


class MalformedResponse(HttpError):
    """The bytes received are not HTTP."""


class HttpTimeout(HttpError, TimeoutError):
    pass


class Response:
    """Status, lower-cased headers and, for whole responses, the body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One TCP connection and the exchange in progress on it (at most one: no pipelining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.closed = False
        self.keep_alive = True
        # The exchange in progress.
        self._head: asyncio.Future[Response] | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: HttpError | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle_s = 0.0
        self._last_data = 0.0
        self._paused = False
        self._until_close = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(MalformedResponse(f"not an HTTP response ({e}): {data[:80]!r}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_close and exc is None and not self._complete:
            self.on_message_complete()  # a body delimited by the end of the connection
        if self._head is not None and not self._complete:
            got = self._status != 0
            what = "reset" if isinstance(exc, ConnectionResetError) else "closed"
            detail = f" mid-body after {self._buffered} bytes" if got else " before answering"
            self._fail(ConnectionDropped(f"connection {what}{detail}", got_response=got, clean_close=exc is None))

    # -- httptools callbacks --

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self._headers[key] = value.decode("latin-1")
        if key == "connection" and value.lower() == b"close":
            self.keep_alive = False

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if self._parser.get_http_version() != "1.1":
            self.keep_alive = False
        headers = self._headers
        if "content-length" not in headers and "transfer-encoding" not in headers and self._status not in (204, 304):
            self._until_close = True
            self.keep_alive = False
        head = self._head
        if head is not None and not head.done():
            head.set_result(Response(self._status, self._headers))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._cancel_timer()
        self._wake()

    # -- the exchange --

    def start(self, request: bytes, *, total_s: float | None, idle_s: float | None) -> asyncio.Future[Response]:
        assert self.transport is not None
        if self.closed or self.transport.is_closing():
            raise ConnectionDropped("connection closed before the request was sent", got_response=False)
        self._head = self._loop.create_future()
        self._until_close = False
        self._status = 0
        self._headers = {}
        self._body = []
        self._buffered = 0
        self._complete = False
        self._error = None
        self._last_data = self._loop.time()
        if total_s is not None:
            self._timer = self._loop.call_at(self._last_data + total_s, self._on_total_timeout, total_s)
        elif idle_s is not None:
            self._idle_s = idle_s
            self._timer = self._loop.call_at(self._last_data + idle_s, self._on_idle_timer)
        self.transport.write(request)
        return self._head

    async def read_all(self) -> bytes:
        while not self._complete:
            await self._wait()
        body = b"".join(self._body)
        self._body = []
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                parts, self._body = self._body, []
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                for part in parts:
                    yield part
            elif self._complete:
                return
            else:
                await self._wait()

    @property
    def finished(self) -> bool:
        return self._complete

    def abort(self) -> None:
        self._cancel_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._wakeup = self._loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, error: HttpError) -> None:
        if self._error is None:
            self._error = error
        self._cancel_timer()
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _on_total_timeout(self, total_s: float) -> None:
        self._timer = None
        self._fail(HttpTimeout(f"no complete answer within {total_s:g}s"))
        self.abort()

    def _on_idle_timer(self) -> None:
        # Re-armed lazily: one timer per stream instead of one per chunk.
        due = self._last_data + self._idle_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._on_idle_timer)
            return
        self._timer = None
        self._fail(HttpTimeout(f"no data for {self._idle_s:g}s"))
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Http1Pool:
    """Keep-alive connections to one origin (`scheme://host:port`)."""

    def __init__(self, base_url: str, *, max_connections: int = 100, connect_timeout: float = 10.0) -> None:
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
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    def encode_head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The request line and fixed headers, built once per endpoint; Content-Length is added per call."""
        lines = [f"{method} {self.path_prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def request(self, head: bytes, body: bytes = b"", *, timeout: float) -> Response:
        """Send a request and read the whole response."""
        request = _frame(head, body)
        for attempt in (0, 1):
            conn = await self._acquire()
            try:
                response = await conn.start(request, total_s=timeout, idle_s=None)
                response.body = await conn.read_all()
            except ConnectionDropped as e:
                self._discard(conn)
                if attempt == 0 and conn.reused and e.safe_to_retry:
                    continue  # the server had closed this idle connection: a fresh one is safe
                raise
            except BaseException:
                conn.abort()
                self._discard(conn)
                raise
            self._release(conn)
            return response
        raise AssertionError("unreachable")

    def stream(self, head: bytes, body: bytes, *, idle_timeout: float) -> _StreamContext:
        """`async with pool.stream(...) as (response, lines):` for bodies read as they arrive."""
        return _StreamContext(self, _frame(head, body), idle_timeout)

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()

    # -- pool bookkeeping --

    async def _acquire(self) -> _Connection:
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
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as e:
            raise ConnectFailed(f"connecting to {self.host_header} timed out after {self.connect_timeout:g}s") from e
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.host_header}: {e.strerror or e}") from e
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.closed or not conn.keep_alive or not conn.finished or self._closed:
            conn.abort()
            self._discard(conn)
            return
        self._idle.append(conn)
        self._wake_one()

    def _discard(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class _StreamContext:
    def __init__(self, pool: Http1Pool, request: bytes, idle_timeout: float) -> None:
        self._pool = pool
        self._request = request
        self._idle_timeout = idle_timeout
        self._conn: _Connection | None = None

    async def __aenter__(self) -> tuple[Response, _Connection]:
        for attempt in (0, 1):
            conn = await self._pool._acquire()
            self._conn = conn
            try:
                response = await conn.start(self._request, total_s=None, idle_s=self._idle_timeout)
            except ConnectionDropped as e:
                self._pool._discard(conn)
                self._conn = None
                if attempt == 0 and conn.reused and e.safe_to_retry:
                    continue
                raise
            except BaseException:
                conn.abort()
                self._pool._discard(conn)
                self._conn = None
                raise
            return response, conn
        raise AssertionError("unreachable")

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if et is None and conn.finished:
            self._pool._release(conn)
        else:
            # Left early, failed or cancelled: closing the socket tells the backend to stop generating.
            conn.abort()
            self._pool._discard(conn)


async def iter_lines(conn: _Connection) -> AsyncIterator[bytes]:
    """The body of a streamed response as lines (without their line ends)."""
    pending = b""
    async for chunk in conn.chunks():
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")


def _frame(head: bytes, body: bytes) -> bytes:
    return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
