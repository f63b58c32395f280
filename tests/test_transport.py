"""Both transports behave the same to the backend, the chooser picks the right one, proxies work end to end.

The behavioural tests run the OpenAI-compatible backend against the OpenAI
double once per transport (the lean HTTP/1.1 pool and aiohttp), injected through
the backend's constructor: a whole response, an SSE stream, leaving a stream
early, cancelling, a reset connection, a stalled server, and a pool that stays
exhausted. The proxy test puts a small forwarding HTTP proxy (written below with
asyncio streams) between the aiohttp transport and the double.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import aiohttp
import msgspec
import pytest
from aiohttp import web

from executor.backends.base import Delta, Finish
from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.transport.aiohttp import AiohttpTransport
from executor.backends.transport.base import PoolTimeout, Timeouts, Transport
from executor.backends.transport.choose import choose_transport
from executor.backends.transport.http1 import Http1Transport
from executor.backends.registry import create_backend
from executor.config import ConfigError, parse_config
from protocol.errors import BackendTimeout, BackendUnavailable, ErrorCode, StreamInterrupted
from tests.conftest import MODEL
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask

CONTENT = "".join(f"tok{i} " for i in range(8))  # what the double generates by default

BackendFactory = Callable[..., OpenAICompatibleBackend]


def make_transport(kind: str, session: aiohttp.ClientSession, url: str, max_connections: int = 100) -> Transport:
    if kind == "http1":
        return Http1Transport(url, max_connections=max_connections)
    return AiohttpTransport(session, url, max_connections=max_connections)


@pytest.fixture(params=["http1", "aiohttp"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_backend(
    kind: str, double: OpenAIDouble, http: aiohttp.ClientSession
) -> AsyncIterator[BackendFactory]:
    made: list[OpenAICompatibleBackend] = []

    def make(*, timeout_secs: float = 5.0, max_connections: int = 100) -> OpenAICompatibleBackend:
        transport = make_transport(kind, http, double.base_url, max_connections)
        backend = OpenAICompatibleBackend(
            http, base_url=double.base_url, timeout_secs=timeout_secs, max_connections=max_connections,
            transport=transport,
        )  # fmt: skip
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


# -- the same behaviour over both transports ------------------------------------


async def test_whole_response(make_backend: BackendFactory, double: OpenAIDouble) -> None:
    backend = make_backend()
    completion = await backend.complete(ask(text="three word prompt"))
    assert completion.content == CONTENT
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 8)
    assert double.requests[-1]["model"] == MODEL
    assert [m.id for m in await backend.list_models()] == double.models


async def test_sse_stream(make_backend: BackendFactory) -> None:
    backend = make_backend()
    events = [event async for event in backend.stream(ask(stream=True))]
    assert "".join(e.text for e in events if isinstance(e, Delta)) == CONTENT
    assert isinstance(events[-1], Finish)
    assert events[-1].usage.completion_tokens == 8
    # The connection was handed back and serves the next stream.
    again = [event async for event in backend.stream(ask(stream=True))]
    assert isinstance(again[-1], Finish)


async def test_leaving_a_stream_early_closes_the_backend_call(make_backend: BackendFactory, double: OpenAIDouble) -> None:
    backend = make_backend()
    double.fault = Fault.slow(0.05)  # spaced events, so the stream is still running when we leave
    events = backend.stream(ask(stream=True))
    async for event in events:
        assert isinstance(event, Delta)
        break
    await events.aclose()
    async with asyncio.timeout(5):
        await double.disconnected.wait()
    assert double.completed == 0


@pytest.mark.parametrize("call", ["complete", "stream"])
async def test_cancelling_the_call_aborts_the_backend_request(
    make_backend: BackendFactory, double: OpenAIDouble, call: str
) -> None:
    backend = make_backend()
    double.fault = Fault.stall()

    async def run() -> None:
        if call == "complete":
            await backend.complete(ask())
        else:
            async for _ in backend.stream(ask(stream=True)):
                pass

    task = asyncio.create_task(run())
    async with asyncio.timeout(5):
        await double.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(5):
        await double.disconnected.wait()
    # And the transport is usable afterwards.
    double.fault = None
    assert (await backend.complete(ask())).content == CONTENT


async def test_reset_connection_is_a_typed_error(make_backend: BackendFactory, double: OpenAIDouble) -> None:
    backend = make_backend()
    double.faults.append(Fault.reset())
    with pytest.raises(BackendUnavailable, match="dropped the connection"):
        await backend.complete(ask())

    double.faults.append(Fault.reset(after_chunks=2))
    got: list[str] = []
    with pytest.raises(StreamInterrupted):
        async for event in backend.stream(ask(stream=True)):
            if isinstance(event, Delta):
                got.append(event.text)
    assert got == ["tok0 ", "tok1 "]
    assert (await backend.complete(ask())).content == CONTENT  # the backend serves on


@pytest.mark.parametrize("call", ["complete", "stream"])
async def test_stalled_backend_times_out(make_backend: BackendFactory, double: OpenAIDouble, call: str) -> None:
    backend = make_backend(timeout_secs=0.3)
    double.fault = Fault.stall()
    started = time.monotonic()
    with pytest.raises(BackendTimeout, match="timeout_secs=0.3"):
        if call == "complete":
            await backend.complete(ask())
        else:
            async for _ in backend.stream(ask(stream=True)):
                pass
    assert 0.25 <= time.monotonic() - started < 3


async def test_exhausted_pool_fails_within_the_acquire_timeout(
    kind: str, double: OpenAIDouble, http: aiohttp.ClientSession
) -> None:
    transport = make_transport(kind, http, double.base_url, max_connections=1)
    chat = transport.endpoint("POST", "/chat/completions", {"Content-Type": "application/json"})
    body = msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    double.fault = Fault.stall()
    holder = asyncio.create_task(_hold(transport, chat, body))
    async with asyncio.timeout(5):
        await double.started.wait()
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="pool is exhausted") as caught:
        await transport.request(chat, body, Timeouts(acquire=0.2, total=30))
    assert 0.15 <= time.monotonic() - started < 2
    assert caught.value.max_connections == 1
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await transport.aclose()


async def _hold(transport: Transport, endpoint: object, body: bytes) -> None:
    """Take the pool's one connection with a stream the stalled server never answers."""
    async with transport.stream(endpoint, body, Timeouts(idle_read=30)):
        pytest.fail("a stalled server sends no response head")


async def test_exhausted_pool_is_backend_unavailable_naming_the_setting(
    make_backend: BackendFactory, double: OpenAIDouble
) -> None:
    backend = make_backend(timeout_secs=0.5, max_connections=1)
    double.fault = Fault.slow(0.1)  # the holder's stream keeps talking, so it never times out itself
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async for _ in backend.stream(ask(stream=True)):
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    async with asyncio.timeout(5):
        await holding.wait()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        await backend.complete(ask())
    assert 0.45 <= time.monotonic() - started < 3
    assert caught.value.code is ErrorCode.BACKEND_UNAVAILABLE
    assert "pool is exhausted" in caught.value.message
    assert "max_connections (now 1)" in caught.value.message
    release.set()
    async with asyncio.timeout(5):
        await holder


# -- the chooser ----------------------------------------------------------------

PROXY = "http://proxy.internal:3128"


@pytest.mark.parametrize(
    ("url", "env", "chosen", "proxy"),
    [
        ("https://api.openai.com/v1", {}, Http1Transport, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": PROXY}, AiohttpTransport, PROXY),
        ("https://api.openai.com/v1", {"https_proxy": "proxy.internal:3128"}, AiohttpTransport, PROXY),
        ("http://localhost:1234/v1", {"HTTPS_PROXY": PROXY}, Http1Transport, None),  # for https URLs only
        ("http://localhost:1234/v1", {"HTTP_PROXY": PROXY}, AiohttpTransport, PROXY),
        ("http://localhost:1234/v1", {"ALL_PROXY": PROXY}, AiohttpTransport, PROXY),
        ("http://localhost:1234/v1", {"HTTP_PROXY": "http://upper:1", "http_proxy": PROXY}, AiohttpTransport, PROXY),
        ("http://localhost:1234/v1", {"HTTP_PROXY": PROXY, "http_proxy": ""}, Http1Transport, None),
        ("http://localhost:1234/v1", {"HTTP_PROXY": PROXY, "NO_PROXY": "localhost,127.0.0.1"}, Http1Transport, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": PROXY, "no_proxy": ".openai.com"}, Http1Transport, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": PROXY, "NO_PROXY": "*"}, Http1Transport, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": PROXY, "NO_PROXY": "example.com"}, AiohttpTransport, PROXY),
        ("http://localhost:1234/v1", {"HTTP_PROXY": PROXY, "REQUEST_METHOD": "GET"}, Http1Transport, None),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
async def test_chooser_takes_aiohttp_only_when_a_proxy_applies(
    http: aiohttp.ClientSession, url: str, env: dict[str, str], chosen: type, proxy: str | None
) -> None:
    transport = choose_transport(url, mode="auto", env=env, session=http, max_connections=4)
    assert type(transport) is chosen
    assert getattr(transport, "proxy", None) == proxy
    await transport.aclose()


async def test_chooser_obeys_an_explicit_mode(http: aiohttp.ClientSession) -> None:
    env = {"HTTPS_PROXY": PROXY}
    forced = choose_transport("https://api.openai.com/v1", mode="http1", env=env, session=http, max_connections=4)
    assert type(forced) is Http1Transport
    asked = choose_transport("http://localhost:1234/v1", mode="aiohttp", env={}, session=http, max_connections=4)
    assert type(asked) is AiohttpTransport and asked.proxy is None


async def test_chooser_refuses_a_proxy_it_cannot_speak_and_hides_credentials(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigError, match="socks5://.*NO_PROXY"):
        choose_transport("https://api.openai.com/v1", mode="auto", env={"ALL_PROXY": "socks5://127.0.0.1:1080"},
                         session=http, max_connections=4)  # fmt: skip
    secret = choose_transport("https://api.openai.com/v1", mode="auto",
                              env={"HTTPS_PROXY": "http://me:hunter2@proxy.internal:3128"}, session=http,
                              max_connections=4)  # fmt: skip
    assert "hunter2" not in secret.name
    assert secret.name == "aiohttp via proxy http://proxy.internal:3128"


# -- through a real proxy --------------------------------------------------------


class ForwardingProxy:
    """A plain forward HTTP proxy (absolute-form requests, no CONNECT): one request per client
    connection, relayed to the origin and its answer streamed back as it arrives. Records
    `METHOD absolute-URL` of each request it forwarded."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ForwardingProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *fields = [line for line in head.split("\r\n") if line]
        method, target, _ = request_line.split(" ")
        self.requests.append(f"{method} {target}")
        length = next((int(f.split(":", 1)[1]) for f in fields if f.lower().startswith("content-length:")), 0)
        body = await reader.readexactly(length)
        origin = urlsplit(target)
        hop_by_hop = ("proxy-", "connection:", "keep-alive:")
        kept = [f for f in fields if not f.lower().startswith(hop_by_hop)]
        up_reader, up_writer = await asyncio.open_connection(origin.hostname, origin.port)
        try:
            path = origin.path + (f"?{origin.query}" if origin.query else "")
            lines = [f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""]
            up_writer.write("\r\n".join(lines).encode("latin-1") + body)
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()


async def test_aiohttp_transport_reaches_the_backend_through_http_proxy(
    double: OpenAIDouble, http: aiohttp.ClientSession
) -> None:
    async with ForwardingProxy() as proxy:
        transport = choose_transport(
            double.base_url, mode="auto", env={"HTTP_PROXY": proxy.url}, session=http, max_connections=4
        )
        assert type(transport) is AiohttpTransport
        backend = OpenAICompatibleBackend(http, base_url=double.base_url, timeout_secs=5, transport=transport)
        try:
            assert (await backend.complete(ask())).content == CONTENT
            events = [event async for event in backend.stream(ask(stream=True))]
            assert "".join(e.text for e in events if isinstance(e, Delta)) == CONTENT
        finally:
            await backend.aclose()
        chat = f"POST {double.base_url}/chat/completions"
        assert proxy.requests == [chat, chat]
        assert len(double.requests) == 2

        # NO_PROXY for the backend's host: straight to it, the proxy sees nothing more.
        env = {"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"}
        direct = choose_transport(double.base_url, mode="auto", env=env, session=http, max_connections=4)
        backend = OpenAICompatibleBackend(http, base_url=double.base_url, timeout_secs=5, transport=direct)
        try:
            assert (await backend.complete(ask())).content == CONTENT
        finally:
            await backend.aclose()
        assert len(proxy.requests) == 2
        assert len(double.requests) == 3


async def test_aiohttp_transport_accepts_gzip(http: aiohttp.ClientSession) -> None:
    listing = msgspec.json.encode({"object": "list", "data": [{"id": "zipped-model", "object": "model"}]})

    async def models(request: web.Request) -> web.Response:
        if "gzip" not in request.headers.get("Accept-Encoding", ""):
            return web.Response(status=406, text="this server only speaks gzip")
        return web.Response(body=gzip.compress(listing), headers={"Content-Encoding": "gzip",
                                                                  "Content-Type": "application/json"})  # fmt: skip

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        transport = choose_transport(base_url, mode="aiohttp", env={}, session=http, max_connections=4)
        backend = OpenAICompatibleBackend(http, base_url=base_url, timeout_secs=5, transport=transport)
        try:
            assert [m.id for m in await backend.list_models()] == ["zipped-model"]
        finally:
            await backend.aclose()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("mode", "gzip_asked"), [("aiohttp", True), ("http1", False)])
async def test_config_key_reaches_the_backend_factory(
    double: OpenAIDouble, http: aiohttp.ClientSession, mode: str, gzip_asked: bool
) -> None:
    config = parse_config(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\ntransport = "{mode}"\n',
        source="executor.toml", environ={},
    )  # fmt: skip
    backend = create_backend(config.llm_client, http)
    assert isinstance(backend, OpenAICompatibleBackend)
    try:
        assert (await backend.complete(ask())).content == CONTENT
        # aiohttp announces gzip; the lean pool sends no Accept-Encoding at all.
        assert ("gzip" in double.request_headers[-1].get("Accept-Encoding", "")) is gzip_asked
    finally:
        await backend.aclose()


def test_an_unknown_transport_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"llm_client\.transport"):
        parse_config('[llm_client]\ntransport = "h2"\n', source="executor.toml", environ={})
