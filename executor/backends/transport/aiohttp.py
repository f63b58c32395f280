"""The transport for where the lean pool cannot serve: aiohttp, through the process's one session.

`http1.py` speaks plain HTTP/1.1 straight to the backend. Some set-ups need more:
an HTTP proxy (`HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`), or compressed answers.
`AiohttpTransport` serves those through the `aiohttp.ClientSession` the process
owns (created inside the running loop, passed in, never closed here): it sends
through `proxy` when the chooser found one (and the session, created with
`trust_env=True`, reads the same environment otherwise), accepts gzip/deflate and
decompresses (aiohttp's defaults), and bounds its own concurrency with
`max_connections` and `Timeouts.acquire` exactly as the pool does. Neither
transport speaks HTTP/2.

aiohttp's exceptions never leave this module: `_translate` maps them to the
`base.TransportError` hierarchy through one table, chained with `from`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from executor.backends.transport.base import (
    TRACE_HEADERS,
    ConnectFailed,
    ConnectionDropped,
    HttpTimeout,
    MalformedResponse,
    PoolTimeout,
    Response,
    Timeouts,
    TransportError,
    split_lines,
)


class Endpoint:
    """A method, an absolute URL and the fixed headers, prepared once per backend endpoint."""

    __slots__ = ("method", "url", "headers")

    def __init__(self, method: str, url: str, headers: Mapping[str, str]) -> None:
        self.method = method
        self.url = url
        self.headers = dict(headers)


class AiohttpTransport:
    """`base.Transport` over a shared `aiohttp.ClientSession` (not owned: `aclose` leaves it open)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        proxy: str | None = None,
        max_connections: int = 100,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self.proxy = proxy
        self.max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        self._client_timeouts: dict[tuple[Timeouts, bool], aiohttp.ClientTimeout] = {}
        self._closed = False

    @property
    def name(self) -> str:
        return f"aiohttp via proxy {_without_credentials(self.proxy)}" if self.proxy else "aiohttp"

    def endpoint(self, method: str, path: str, headers: Mapping[str, str]) -> Endpoint:
        return Endpoint(method, self.base_url + path, headers)

    async def request(self, endpoint: Endpoint, body: bytes, timeouts: Timeouts) -> Response:
        await self._acquire(timeouts)
        resp: aiohttp.ClientResponse | None = None
        try:
            resp = await self._send(endpoint, body, timeouts, streamed=False)
            try:
                data = await resp.read()
            except BaseException:
                resp.close()  # cancelled or failed mid-body: drop the connection, do not pool it
                raise
            resp.release()
            return Response(resp.status, resp.headers, data)
        except _FOREIGN as e:
            raise _translate(e, got_response=resp is not None, timeouts=timeouts, streamed=False) from e
        finally:
            self._slots.release()

    def stream(self, endpoint: Endpoint, body: bytes, timeouts: Timeouts) -> AiohttpStream:
        return AiohttpStream(self, endpoint, body, timeouts)

    async def aclose(self) -> None:
        self._closed = True

    async def _acquire(self, timeouts: Timeouts) -> None:
        if self._closed:
            raise ConnectFailed("the backend client is closed")
        try:
            async with asyncio.timeout(timeouts.acquire):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout(
                f"no free connection to {self.base_url} within {timeouts.acquire:g}s:"
                f" all {self.max_connections} stayed busy (the pool is exhausted)",
                max_connections=self.max_connections,
                waited_s=timeouts.acquire,
            ) from None

    async def _send(
        self, endpoint: Endpoint, body: bytes, timeouts: Timeouts, *, streamed: bool
    ) -> aiohttp.ClientResponse:
        key = (timeouts, streamed)
        client_timeout = self._client_timeouts.get(key)
        if client_timeout is None:
            # A whole response has a total deadline; a stream has a deadline per silence. `connect`
            # also bounds a wait for the shared session's own connector (its limit spans all backends).
            client_timeout = aiohttp.ClientTimeout(
                total=None if streamed else timeouts.total,
                connect=timeouts.acquire + timeouts.connect,
                sock_connect=timeouts.connect,
                sock_read=timeouts.idle_read if streamed else None,
            )
            self._client_timeouts[key] = client_timeout
        extra = TRACE_HEADERS.get()
        return await self._session.request(
            endpoint.method, endpoint.url, data=body or None,
            headers={**endpoint.headers, **extra} if extra else endpoint.headers,
            proxy=self.proxy, timeout=client_timeout,
        )  # fmt: skip


class AiohttpStream:
    """`async with transport.stream(...) as response:`; leaving early, failing or being cancelled closes
    the connection (the backend then stops generating), a finished body releases it."""

    def __init__(self, transport: AiohttpTransport, endpoint: Endpoint, body: bytes, timeouts: Timeouts) -> None:
        self._transport = transport
        self._endpoint = endpoint
        self._body = body
        self._timeouts = timeouts
        self._resp: aiohttp.ClientResponse | None = None
        self.status = 0
        self.headers: Mapping[str, str] = {}

    async def __aenter__(self) -> AiohttpStream:
        await self._transport._acquire(self._timeouts)
        try:
            self._resp = await self._transport._send(self._endpoint, self._body, self._timeouts, streamed=True)
        except BaseException as e:
            self._transport._slots.release()
            if isinstance(e, _FOREIGN):
                raise _translate(e, got_response=False, timeouts=self._timeouts, streamed=True) from e
            raise
        self.status, self.headers = self._resp.status, self._resp.headers
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        resp, self._resp = self._resp, None
        if resp is None:
            return
        try:
            if et is None and resp.content.at_eof():
                resp.release()
            else:
                resp.close()
        finally:
            self._transport._slots.release()

    async def read_all(self) -> bytes:
        assert self._resp is not None, "read inside the `async with` block"
        try:
            return await self._resp.read()
        except _FOREIGN as e:
            raise _translate(e, got_response=True, timeouts=self._timeouts, streamed=True) from e

    def lines(self) -> AsyncIterator[bytes]:
        return split_lines(self._chunks())

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._resp is not None, "read inside the `async with` block"
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except _FOREIGN as e:
            raise _translate(e, got_response=True, timeouts=self._timeouts, streamed=True) from e


# -- aiohttp's exceptions to ours: the one table, first match wins --------------

_FOREIGN = (aiohttp.ClientError, TimeoutError, OSError)


def _translate(e: BaseException, *, got_response: bool, timeouts: Timeouts, streamed: bool) -> TransportError:
    if isinstance(e, TransportError):
        return e
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return ConnectFailed(
            f"no connection within {timeouts.connect:g}s (or the session's connection pool stayed full for"
            f" {timeouts.acquire:g}s)"
        )
    if isinstance(e, aiohttp.ClientProxyConnectionError):
        return ConnectFailed(f"cannot reach the proxy: {e}")
    if isinstance(e, aiohttp.ClientHttpProxyError):
        return ConnectFailed(f"the proxy refused the connection: HTTP {e.status} {e.message}")
    if isinstance(e, aiohttp.ClientConnectorError):
        return ConnectFailed(f"cannot connect to {e.host}:{e.port}: {e.strerror or e}")
    if isinstance(e, TimeoutError):
        if streamed:
            return HttpTimeout(f"no data for {timeouts.idle_read:g}s")
        return HttpTimeout(f"no complete answer within {timeouts.total:g}s")
    if isinstance(e, aiohttp.ClientPayloadError):
        return ConnectionDropped(f"connection closed mid-body: {e}", got_response=True)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        where = "mid-body" if got_response else "before answering"
        return ConnectionDropped(f"connection closed {where}", got_response=got_response, clean_close=True)
    if isinstance(e, (ConnectionResetError, aiohttp.ClientOSError)):
        where = "mid-body" if got_response else "before answering"
        return ConnectionDropped(f"connection reset {where}: {e}", got_response=got_response)
    if isinstance(e, aiohttp.ClientResponseError):
        return MalformedResponse(f"not a valid HTTP response: {e.message}")
    return TransportError(f"{type(e).__name__}: {e}")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
