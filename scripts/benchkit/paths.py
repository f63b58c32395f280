"""The paths under test and the bounded load loops that drive them.

Each path sends the same logical request (one user message, a constant small
answer) and decodes the answer as a user of that path would: the direct and
LiteLLM paths with aiohttp + msgspec on OpenAI's wire format, the executor path
with `LloomClient`. Every loop is bounded by a request count as well as a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec

from protocol.client import LloomClient
from protocol.trust import Trust
from protocol.messages import ChatRequest, Message, Role

MODEL = "bench-model"
PROMPT = "Say hello."
_decode = msgspec.json.decode


def _body(stream: bool, max_tokens: int | None = None) -> bytes:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return msgspec.json.encode(body)


class HttpPath:
    """OpenAI wire format over HTTP: the direct path and the LiteLLM proxy path."""

    def __init__(self, name: str, base_url: str, api_key: str | None = None) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.unary_body = _body(False)
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # One pool, as large as the highest concurrency, so no request waits for a connection.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def unary(self) -> None:
        assert self.session is not None
        async with self.session.post(self.url, data=self.unary_body, headers=self.headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{self.name}: HTTP {resp.status}: {raw[:200]!r}")
        if not _decode(raw)["choices"][0]["message"]["content"]:
            raise RuntimeError(f"{self.name}: empty completion")

    async def stream(self, n: int) -> tuple[float, int]:
        """Time to the first content chunk, and the number of content chunks."""
        assert self.session is not None
        t0 = time.perf_counter()
        ttft = 0.0
        chunks = 0
        async with self.session.post(self.url, data=_body(True, n), headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.name}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                choices = _decode(data).get("choices")
                if choices and choices[0].get("delta", {}).get("content"):
                    if not chunks:
                        ttft = time.perf_counter() - t0
                    chunks += 1
        return ttft, chunks


class ExecutorPath:
    """LloomClient -> NATS -> executor node(s) -> backend."""

    def __init__(self, nats_url: str, *, name: str = "executor", model: str = MODEL, verify: bool = True) -> None:
        self.name = name
        # Whether the client verifies replies by their receipts (off only for an executor that issues none).
        self.verify = verify
        self.nats_url = nats_url
        self.client: LloomClient | None = None
        self.request = ChatRequest(model=model, messages=[Message(role=Role.USER, content=PROMPT)])
        # Awaited after each measured batch, before the CPU is read (see Runner.measured).
        self.settle: Callable[[], Awaitable[None]] | None = None
        # When a list: the signature of every receipt returned (one per signed batch).
        self.sigs: list[str] | None = None
        self.receipts = 0

    async def open(self) -> None:
        self.client = await LloomClient.connect(self.nats_url, timeout=30.0, trust=Trust(verify=self.verify))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def unary(self) -> None:
        assert self.client is not None
        reply = await self.client.complete(self.request)
        if not reply.content:
            raise RuntimeError(f"{self.name}: empty completion")
        if reply.receipt is not None:
            self.receipts += 1
            if self.sigs is not None:
                self.sigs.append(reply.receipt.proof.sig)

    async def stream(self, n: int) -> tuple[float, int]:
        assert self.client is not None
        req = msgspec.structs.replace(self.request, stream=True, max_tokens=n)
        t0 = time.perf_counter()
        ttft = 0.0
        chunks = 0
        async with self.client.stream(req) as s:
            async for _ in s:
                if not chunks:
                    ttft = time.perf_counter() - t0
                chunks += 1
        return ttft, chunks


@dataclass
class Batch:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    chunks: int = 0
    errors: int = 0
    wall: float = 0.0
    first_error: str = ""
    lag_p99: float = 0.0

    def add(self, other: Batch) -> None:
        self.lag_p99 = max(self.lag_p99, other.lag_p99)
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.chunks += other.chunks
        self.errors += other.errors
        self.wall += other.wall
        self.first_error = self.first_error or other.first_error

    @property
    def ok(self) -> int:
        return len(self.latencies)


async def closed_loop(path, concurrency: int, seconds: float, max_requests: int, stream_n: int = 0) -> Batch:
    """`concurrency` workers back to back until the time or the request budget runs out."""
    b = Batch()
    remaining = max_requests
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                if stream_n:
                    ttft, n = await path.stream(stream_n)
                    b.ttfts.append(ttft)
                    b.chunks += n
                else:
                    await path.unary()
            except Exception as e:  # counted and reported; the loop is bounded anyway
                b.errors += 1
                b.first_error = b.first_error or f"{type(e).__name__}: {e}"
                continue
            b.latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    b.wall = time.perf_counter() - start
    return b


async def open_loop(path, rate: float, count: int) -> Batch:
    """`count` requests at a fixed arrival rate, sent whether or not earlier ones have answered.

    Latency counts from the actual send: the loop's timers tick in whole milliseconds,
    so counting from the scheduled instant would add up to 1 ms to every path alike.
    How far sends fell behind schedule is kept in `lag_p99` (a lagging generator is
    then visible instead of silently lowering the load)."""
    b = Batch()
    lags: list[float] = []
    start = time.perf_counter()

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            await path.unary()
        except Exception as e:
            b.errors += 1
            b.first_error = b.first_error or f"{type(e).__name__}: {e}"
            return
        b.latencies.append(time.perf_counter() - t0)

    tasks = []
    for i in range(count):
        t_sched = start + i / rate
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - t_sched))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    b.wall = time.perf_counter() - start
    lags.sort()
    b.lag_p99 = lags[int(0.99 * (len(lags) - 1))] if lags else 0.0
    return b
