"""The hot-path HTTP/1.1 client: keep-alive reuse, framing, the idle-close race, limits and timeouts.

The server here is a scripted raw TCP server, so each test controls the exact
bytes and connection behaviour a real backend could produce.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from executor.backends.transport.base import (
    ConnectFailed,
    ConnectionDropped,
    HttpTimeout,
    MalformedResponse,
    Timeouts,
)
from executor.backends.transport.http1 import Http1Transport
from executor.process.embedded_nats import free_port
from tests.helpers import wait

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            finally:
                w.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await r.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def echo_forever(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        try:
            req = await read_request(r)
        except asyncio.IncompleteReadError:
            return
        w.write(ok(req.split(b"\r\n\r\n", 1)[1]))
        await w.drain()


def within(seconds: float) -> Timeouts:
    return Timeouts(connect=seconds, acquire=seconds, total=seconds, idle_read=seconds)


@pytest.fixture
async def pool_for() -> AsyncIterator[Callable[[str], Http1Transport]]:
    pools: list[Http1Transport] = []

    def make(url: str, **kw: object) -> Http1Transport:
        pools.append(Http1Transport(url, **kw))  # type: ignore[arg-type]
        return pools[-1]

    yield make
    for p in pools:
        await p.aclose()


async def test_requests_reuse_one_keep_alive_connection(pool_for) -> None:
    async with ScriptedServer(echo_forever) as server:
        pool = pool_for(server.url)
        head = pool.endpoint("POST", "/chat/completions", {"Content-Type": "application/json"})
        for i in range(5):
            resp = await pool.request(head, b'{"n": %d}' % i, within(5))
            assert (resp.status, resp.body) == (200, b'{"n": %d}' % i)
        assert server.connections == 1


async def test_request_line_and_host_carry_the_base_path(pool_for) -> None:
    seen: list[bytes] = []

    async def record(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await read_request(r))
        w.write(ok(b"{}"))
        await w.drain()

    async with ScriptedServer(record) as server:
        pool = pool_for(server.url)
        await pool.request(pool.endpoint("GET", "/models", {"Authorization": "Bearer k"}), b"", within(5))
        host = server.url.removeprefix("http://").removesuffix("/v1")
    first_line, *headers = seen[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert first_line == b"GET /v1/models HTTP/1.1"
    assert f"Host: {host}".encode() in headers
    assert b"Authorization: Bearer k" in headers


async def test_chunked_body_split_across_packets_arrives_as_lines(pool_for) -> None:
    async def sse(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        for piece in (b"data: one\n\nda", b"ta: two\r\n\r\n", b"data: [DONE]\n\n"):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()  # keep the connection open until the client leaves

    async with ScriptedServer(sse) as server:
        pool = pool_for(server.url)
        head = pool.endpoint("POST", "/chat/completions", {})
        async with pool.stream(head, b"{}", within(5)) as resp:
            lines = [line async for line in resp.lines() if line]
        assert resp.status == 200
        assert lines == [b"data: one", b"data: two", b"data: [DONE]"]


async def test_idle_connection_closed_by_the_server_is_retried_on_a_fresh_one(pool_for) -> None:
    async def one_answer_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(ok(b"fine"))
        await w.drain()
        # Then the server drops the idle keep-alive connection (FIN), as servers do.

    async with ScriptedServer(one_answer_then_close) as server:
        pool = pool_for(server.url)
        head = pool.endpoint("POST", "/x", {})
        assert (await pool.request(head, b"1", within(5))).body == b"fine"
        assert (await pool.request(head, b"2", within(5))).body == b"fine"
        assert server.connections == 2


async def test_reset_after_the_request_is_not_retried(pool_for) -> None:
    import socket
    import struct

    async def reset(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    async with ScriptedServer(reset) as server:
        pool = pool_for(server.url)
        with pytest.raises(ConnectionDropped) as caught:
            await pool.request(pool.endpoint("POST", "/x", {}), b"{}", within(5))
        assert not caught.value.safe_to_retry
        assert server.connections == 1


async def test_body_cut_short_is_a_drop_with_a_response(pool_for) -> None:
    async def truncated(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await w.drain()

    async with ScriptedServer(truncated) as server:
        pool = pool_for(server.url)
        with pytest.raises(ConnectionDropped, match="mid-body") as caught:
            await pool.request(pool.endpoint("GET", "/x", {}), b"", within(5))
        assert caught.value.got_response


async def test_body_delimited_by_close_is_complete(pool_for) -> None:
    async def http10(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await w.drain()

    async with ScriptedServer(http10) as server:
        pool = pool_for(server.url)
        resp = await pool.request(pool.endpoint("GET", "/x", {}), b"", within(5))
        assert resp.body == b"until the end"


async def test_garbage_is_a_malformed_response(pool_for) -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await w.drain()
        await r.read()

    async with ScriptedServer(garbage) as server:
        pool = pool_for(server.url)
        with pytest.raises(MalformedResponse):
            await pool.request(pool.endpoint("GET", "/x", {}), b"", within(5))


async def test_total_timeout_and_stream_idle_timeout(pool_for) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()  # never answers; returns when the client aborts

    async with ScriptedServer(silent) as server:
        pool = pool_for(server.url)
        head = pool.endpoint("POST", "/x", {})
        with pytest.raises(HttpTimeout, match="0.1s"):
            await pool.request(head, b"{}", within(0.1))
        with pytest.raises(HttpTimeout, match="no data for 0.1s"):
            async with pool.stream(head, b"{}", within(0.1)):
                pytest.fail("no response head expected")


async def test_refused_connection_is_connect_failed(pool_for) -> None:
    pool = pool_for(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ConnectFailed, match="cannot connect to 127.0.0.1"):
        await pool.request(pool.endpoint("GET", "/models", {}), b"", within(5))


async def test_pool_limit_makes_callers_wait_for_a_connection(pool_for) -> None:
    gate = asyncio.Event()
    held = 0  # requests the server holds until the gate opens

    async def gated(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal held
        while True:
            try:
                await read_request(r)
            except asyncio.IncompleteReadError:
                return
            held += 1
            await gate.wait()
            w.write(ok(b"x"))
            await w.drain()

    async with ScriptedServer(gated) as server:
        pool = pool_for(server.url, max_connections=2)
        head = pool.endpoint("GET", "/x", {})
        calls = [asyncio.create_task(pool.request(head, b"", within(5))) for _ in range(5)]
        # All five calls started at once; a pool without a limit would have sent five requests.
        await wait.eventually(lambda: held == 2, timeout=5, what="two requests held by the server")
        assert server.connections == 2 and not any(c.done() for c in calls)
        gate.set()
        assert [r.body for r in await asyncio.gather(*calls)] == [b"x"] * 5
        assert held == 5 and server.connections == 2  # the other three waited, then reused the two


async def test_leaving_a_stream_early_closes_its_connection(pool_for) -> None:
    closed = asyncio.Event()

    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                w.write(b"6\r\ndata:\n\r\n")
                await w.drain()
                await asyncio.sleep(0.01)  # the behaviour: a backend streaming an event every 10 ms, forever
        except ConnectionError:
            closed.set()

    async with ScriptedServer(endless) as server:
        pool = pool_for(server.url)
        async with pool.stream(pool.endpoint("POST", "/x", {}), b"{}", within(5)) as resp:
            async for _line in resp.lines():
                break
        await wait.within(closed.wait(), "the server's writes failing on the closed connection", 5)
        # The half-read connection is not handed to the next caller: it gets a fresh one.
        async with pool.stream(pool.endpoint("POST", "/x", {}), b"{}", within(5)) as again:
            async for _line in again.lines():
                break
        assert server.connections == 2
