"""The seam between a backend and HTTP: the `Transport` interface, its timeouts and its errors.

A backend speaks to its server only through a `Transport` it receives in its
constructor, so the wire client can be swapped (the lean HTTP/1.1 pool of
`http1.py`, or aiohttp where that pool cannot serve: `aiohttp.py`) and a test
can inject whichever it needs without patching anything. The interface is small:

- `endpoint(method, path, headers)` prepares, once, what every call to one
  endpoint shares (the http1 pool pre-encodes the request head there); the
  result is opaque to the caller;
- `request(endpoint, body, timeouts)` sends a request and returns the whole
  `Response`;
- `stream(endpoint, body, timeouts)` is an async context manager giving a
  `Streamed` response whose body is read as lines while it arrives; leaving the
  block before the end, failing or being cancelled aborts the connection, which
  is how a server learns that nobody waits for its tokens any more;
- `aclose()` releases what the transport owns (never a session passed in).

Every failure is one of the `TransportError` subclasses below, whatever library
raised it underneath (the aiohttp transport translates its exceptions through
one table, chained with `from`); the backend maps these to wire errors:

    TransportError
    ├── ConnectFailed       no connection could be opened (refused, DNS, TLS, proxy)
    ├── PoolTimeout         every pooled connection stayed busy for Timeouts.acquire
    ├── ConnectionDropped   closed or reset before the response was complete
    ├── MalformedResponse   the bytes received are not HTTP
    └── HttpTimeout         no complete answer in Timeouts.total / silence over Timeouts.idle_read
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Any, Protocol, runtime_checkable

import msgspec


# Headers the request being made now adds to its endpoint's fixed ones: the W3C trace context
# of the job it serves (executor/telemetry/tracing.py sets it in the job's task). A context
# variable, so the seam's signature stays as it is and a call made outside a job adds nothing.
TRACE_HEADERS: ContextVar[Mapping[str, str] | None] = ContextVar("lloom_trace_headers", default=None)


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    """Deadlines per phase of one exchange, in seconds; built once by the backend, passed per call."""

    # Opening a TCP (and TLS) connection, or reaching the proxy.
    connect: float = 10.0
    # Waiting for a pooled connection while all `max_connections` are busy.
    acquire: float = 300.0
    # A whole response (`request`): from sending to the last byte.
    total: float = 300.0
    # A streamed response (`stream`): the longest silence, head included. A stream may
    # run for long; what must not happen is that it stops saying anything.
    idle_read: float = 300.0


class TransportError(Exception):
    """Base of every failure a transport reports."""


class ConnectFailed(TransportError):
    """No connection could be opened (refused, unreachable, DNS, TLS, proxy)."""


class PoolTimeout(TransportError, TimeoutError):
    """Every connection of the pool stayed busy for `Timeouts.acquire` seconds."""

    def __init__(self, message: str, *, max_connections: int, waited_s: float) -> None:
        super().__init__(message)
        self.max_connections = max_connections
        self.waited_s = waited_s


class ConnectionDropped(TransportError):
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


class MalformedResponse(TransportError):
    """The bytes received are not HTTP."""


class HttpTimeout(TransportError, TimeoutError):
    """No complete answer within `Timeouts.total`, or a stream silent for `Timeouts.idle_read`."""


class Response:
    """Status, lower-cased headers and, for whole responses, the body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body


@runtime_checkable
class Streamed(Protocol):
    """A response whose body is still arriving (what `Transport.stream` yields)."""

    status: int
    headers: Mapping[str, str]

    async def read_all(self) -> bytes:
        """The rest of the body (for error bodies, and to finish a body so its connection is reused)."""
        ...

    def lines(self) -> AsyncIterator[bytes]:
        """The rest of the body as lines, without their line ends."""
        ...


@runtime_checkable
class Transport(Protocol):
    """How a backend reaches its server; see the module docstring."""

    @property
    def name(self) -> str:
        """`http1` or `aiohttp` (with the proxy, if any), for logs."""
        ...

    def endpoint(self, method: str, path: str, headers: Mapping[str, str]) -> Any:
        """Prepare `method base_path+path` with fixed `headers`; pass the result to request/stream."""
        ...

    async def request(self, endpoint: Any, body: bytes, timeouts: Timeouts) -> Response: ...

    def stream(self, endpoint: Any, body: bytes, timeouts: Timeouts) -> AbstractAsyncContextManager[Streamed]: ...

    async def aclose(self) -> None: ...


async def split_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Body chunks as lines (without `\\n` or `\\r\\n`), whatever the chunk boundaries."""
    pending = b""
    async for chunk in chunks:
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")
