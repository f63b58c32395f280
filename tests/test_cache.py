"""The response cache: what is cached, hits marked and replayed as streams, LRU, TTL and size limits."""

from __future__ import annotations

from decimal import Decimal

import pytest

from executor.backends.base import Completion
from executor.cache.memory import ResponseCache, cache_key, cacheable
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.messages import FinishReason, Usage
from protocol.receipts import verify_receipt
from tests.conftest import NodeFactory
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.clock import FakeClock
from tests.helpers.jobs import ask
from tests.helpers.wait import eventually


def completion(text: str) -> Completion:
    return Completion(model="m", content=text, finish_reason=FinishReason.STOP,
                      usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))  # fmt: skip


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
    clock = FakeClock()
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
    return await make_node(parts={"cache": ResponseCache()})


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
    make_node: NodeFactory, client: LloomClient, double: OpenAIDouble, tmp_path
) -> None:
    from executor.receipts.outbox import Outbox
    from executor.receipts.issuer import ReceiptIssuer
    from protocol.identity import Identity

    receipts = ReceiptIssuer(Identity.generate(), "cached-exe", Outbox(tmp_path))
    cached_node = await make_node(id="cached-exe", parts={"cache": ResponseCache(), "receipts": receipts})
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


# -- the shared level: a NATS KV bucket --------------------------------------------------


async def test_an_answer_cached_by_one_executor_serves_another_through_the_shared_bucket(tmp_path, signing) -> None:  # type: ignore[no-untyped-def]
    import nats
    from nats.js.errors import NoKeysError

    from executor.backends.openai_compat import OpenAICompatibleBackend
    from executor.cache.shared import BUCKET, SharedCache
    from executor.process.embedded_nats import EmbeddedNats
    from protocol.identity import Identity

    async with EmbeddedNats(jetstream=True) as server, OpenAIDouble() as backend_a, OpenAIDouble() as backend_b:
        nc = await nats.connect(server.url)
        nodes = []
        keys = [Identity.generate(), Identity.generate()]  # node b trusts node a's key (its operator's choice)
        for double, key, trusted in ((backend_a, keys[0], ()), (backend_b, keys[1], (keys[0].public_key,))):
            shared = await SharedCache.open(nc.jetstream(), key, ttl_s=60, max_bytes=1 << 20,
                                            trusted_keys=frozenset(trusted))  # fmt: skip
            node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), models=["double-model"],
                                cache=ResponseCache(), shared_cache=shared, **signing())  # fmt: skip
            await node.start()
            nodes.append(node)
        async with await LloomClient.connect(server.url) as client:
            first = await client.complete(ask(temperature=0), executor=nodes[0].id)
            assert not first.cached and backend_a.completed == 1
            # The answer is put in the bucket in the background, after the reply: nothing announces
            # it to a bystander, so look for it there.
            bucket = await nc.jetstream().key_value(BUCKET)

            async def stored() -> bool:
                try:
                    return len(await bucket.keys()) == 1
                except NoKeysError:
                    return False

            await eventually(stored, timeout=5, what="the first answer stored in the shared bucket")
            second = await client.complete(ask(temperature=0), executor=nodes[1].id)
            assert second.cached and second.content == first.content and second.executor_id == nodes[1].id
            assert backend_b.completed == 0  # answered from the bucket
            assert nodes[1].shared_cache.hits == 1  # type: ignore[union-attr]
            third = await client.complete(ask(temperature=0), executor=nodes[1].id)
            assert third.cached and nodes[1].shared_cache.hits == 1  # type: ignore[union-attr]  # now from its own LRU
            other = await client.complete(ask(text="something else", temperature=0), executor=nodes[1].id)
            assert not other.cached and backend_b.completed == 1
        for node in nodes:
            await node.stop(drain_timeout=1)
            await node.backend.aclose()
        await nc.close()


async def test_a_shared_bucket_that_is_away_is_a_miss_not_a_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import nats

    from executor.process.embedded_nats import EmbeddedNats
    from executor.cache.shared import SharedCache
    from protocol.identity import Identity

    async with EmbeddedNats(jetstream=True) as server:
        nc = await nats.connect(server.url)
        shared = await SharedCache.open(nc.jetstream(), Identity.generate(), ttl_s=60, max_bytes=1 << 20)
        await nc.jetstream().delete_key_value("LLOOM_CACHE")  # gone under it
        assert await shared.get(b"k" * 32) is None
        shared.put(b"k" * 32, completion("x"))
        await shared.aclose()
        assert shared.errors >= 1
        await nc.close()
