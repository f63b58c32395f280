"""The response cache: what is cached, hits marked and replayed as streams, LRU, TTL and size limits."""

from __future__ import annotations

from decimal import Decimal

import pytest

from executor.backends.base import Completion
from executor.cache import ResponseCache, cache_key, cacheable
from executor.node import ExecutorNode
from protocol.client import LloomClient
from protocol.messages import FinishReason, Usage
from protocol.receipts import verify_receipt
from tests.conftest import NodeFactory
from tests.doubles.openai_double import OpenAIDouble
from tests.test_roundtrip import ask


def completion(text: str) -> Completion:
    return Completion(model="m", content=text, finish_reason=FinishReason.STOP,
                      usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))  # fmt: skip


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_deterministic_or_opted_in_requests_are_cacheable() -> None:
    assert cacheable(ask(temperature=0))
    assert not cacheable(ask())
    assert not cacheable(ask(temperature=0.7))
    assert cacheable(ask(temperature=0.7, cache=True))
    assert not cacheable(ask(temperature=0, cache=False))


def test_the_key_ignores_streaming_and_the_cache_flag_but_nothing_else() -> None:
    base = ask(temperature=0)
    assert cache_key(base) == cache_key(ask(temperature=0, stream=True)) == cache_key(ask(temperature=0, cache=True))
    assert cache_key(base) != cache_key(ask(temperature=0, max_tokens=5))
    assert cache_key(base) != cache_key(ask(text="other", temperature=0))


def test_lru_ttl_and_size_limits() -> None:
    clock = Clock()
    cache = ResponseCache(max_entries=2, max_bytes=10, ttl_s=60, clock=clock)
    cache.put(b"a", completion("aaa"))
    cache.put(b"b", completion("bbb"))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", completion("ccc"))  # evicts b, the least recent
    assert cache.get(b"b") is None and cache.get(b"a") is not None
    cache.put(b"d", completion("dddddddd"))  # 8 bytes: the total would pass 10, older ones go
    assert len(cache) == 1 and cache.get(b"d") is not None
    cache.put(b"huge", completion("x" * 11))  # larger than the cache: not kept
    assert cache.get(b"huge") is None
    clock.now = 61
    assert cache.get(b"d") is None  # expired
    assert (cache.hits, cache.misses) == (3, 3)


@pytest.fixture
async def cached_node(make_node: NodeFactory) -> ExecutorNode:
    node = await make_node()
    node.cache = ResponseCache()
    return node


async def test_an_identical_request_is_answered_from_the_cache_and_marked(
    cached_node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    first = await client.complete(ask(temperature=0))
    second = await client.complete(ask(temperature=0))
    assert (first.cached, second.cached) == (False, True)
    assert second.content == first.content and second.usage == first.usage
    assert len(double.requests) == 1
    varied = await client.complete(ask(temperature=0.9))  # not cacheable: always the backend
    assert not varied.cached and len(double.requests) == 2


async def test_a_cache_hit_is_replayed_as_a_stream_and_its_receipt_says_cached(
    cached_node: ExecutorNode, client: LloomClient, double: OpenAIDouble, tmp_path
) -> None:
    from executor.outbox import Outbox
    from executor.receipts import ReceiptIssuer
    from protocol.identity import Identity

    cached_node.receipts = ReceiptIssuer(Identity.generate(), cached_node.id, Outbox(tmp_path))
    unary = await client.complete(ask(temperature=0))
    async with client.stream(ask(temperature=0)) as stream:
        text = "".join([c.delta async for c in stream])
    assert text == unary.content
    assert stream.end is not None and stream.end.cached
    assert stream.end.receipt is not None and stream.end.receipt.receipt.cached
    verify_receipt(stream.end.receipt)
    assert stream.end.receipt.receipt.cost == Decimal(0)  # no prices configured
    assert len(double.requests) == 1
    cached_node.receipts.outbox.close()
