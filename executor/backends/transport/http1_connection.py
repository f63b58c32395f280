"""One keep-alive HTTP/1.1 connection, parsed with httptools: the bytes side of `http1.py`.

Profiling the executor showed aiohttp's client machinery (request and response
objects, header multidicts, timeout handles, payload wrappers) to be about half
of the executor's CPU per job. A backend exchange needs far less: write one
pre-encoded request, parse one response with httptools (llhttp, the parser
behind uvicorn and Node.js), and keep the connection for the next job. A
`Connection` is an asyncio protocol that runs one exchange at a time (no
pipelining) with:

- one timer per exchange: a total deadline for whole responses, an idle deadline
  (no byte for N seconds) for streams, re-armed lazily rather than per chunk;
- streamed bodies handed over as chunks, with reading paused while the consumer lags;
- `abort()`, which drops the socket: how a server learns nobody waits any more;
- a `ConnectionDropped` that says whether the server closed cleanly before
  answering (the keep-alive race, safe to retry) or reset (it may have run the request).

The pool and the retry policy live in `http1.py`; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httptools

from executor.backends.transport.base import (
    ConnectionDropped,
    HttpTimeout,
    MalformedResponse,
    Response,
    TransportError,
)

_PAUSE_ABOVE = 1 << 20  # bytes buffered for a slow stream reader before we stop reading the socket


class Connection(asyncio.Protocol):
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
        self._error: TransportError | None = None
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

    def _fail(self, error: TransportError) -> None:
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
