"""The gateway as OpenAI's SDKs see it: a real gateway on a free port, real NATS, real executors.

Clients are the official `openai` package (sync and async) and LiteLLM's SDK; the backend is
the OpenAI double, which answers `tok0 tok1 ...` with exact usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from executor.process.embedded_nats import EmbeddedNats
from tests.helpers.gateway import Network, offer

MODEL = "gw-model"


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


def sdk(url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]


async def test_async_sdk_chat_completion_unary_names_the_executor_and_its_receipt(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL, "1.00", "2.00"))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "say hi"}], max_tokens=4)
        reply = raw.parse()
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 4)
    assert raw.headers["x-lloom-executor"] == "exe-a"
    assert raw.headers["x-lloom-receipt"].startswith("exe-a#")
    assert raw.headers["x-lloom-job-id"] == reply.id
    # The cost is the signed receipt's: (2 * 1.00 + 4 * 2.00) / 1e6 USD.
    assert reply.usage.model_extra["cost"] == "0.00001"


async def test_async_sdk_streams_chunks_then_done_with_usage_when_asked(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a story"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(8))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


async def test_sync_sdk_unary_and_streaming(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()

    def use() -> tuple[str, str]:  # the sync client blocks: it runs in a thread, the gateway on this loop
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
            unary = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=2)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True) if c.choices)
            return unary.choices[0].message.content or "", streamed

    assert await asyncio.to_thread(use) == ("tok0 tok1 ", "tok0 tok1 tok2 ")
