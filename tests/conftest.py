"""Fixtures shared by every test: real nats-server processes, the OpenAI test double, nodes and clients.

Everything here is real except the LLM backend, which is the fault-injecting
test double `tests.doubles.openai_double.OpenAIDouble` speaking OpenAI's wire
format over real HTTP. Nodes run in-process on the test's event loop; tests
that need a node as a separate process (signals, SIGKILL) start the
`lloom-executor` console script.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NATS

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import NodeConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from tests.doubles.openai_double import OpenAIDouble

MODEL = "double-model"

NodeFactory = Callable[..., Awaitable[ExecutorNode]]


@pytest.fixture
async def nats_server() -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats() as server:
        yield server


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
async def double() -> AsyncIterator[OpenAIDouble]:
    async with OpenAIDouble(models=[MODEL, "qwen2.5:7b", "meta-llama/Llama-3-8B"]) as d:
        yield d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_node(
    nats_server: EmbeddedNats, double: OpenAIDouble, http: aiohttp.ClientSession
) -> AsyncIterator[NodeFactory]:
    """Build and start nodes on their own NATS connections; all are stopped at teardown."""
    made: list[tuple[ExecutorNode, NATS]] = []

    async def factory(
        *, base_url: str | None = None, timeout_secs: float = 10.0, models: list[str] | None = None,
        parts: dict[str, object] | None = None, **node_config: object,
    ) -> ExecutorNode:
        """`parts`: the node's collaborators by keyword (receipts, cache, batcher, ...); the rest is NodeConfig."""
        conn = await nats.connect(nats_server.url)
        backend = OpenAICompatibleBackend(http, base_url=base_url or double.base_url, timeout_secs=timeout_secs)
        node = ExecutorNode(conn, backend, NodeConfig(**node_config), models=models, **(parts or {}))  # type: ignore[arg-type]
        await node.start()
        made.append((node, conn))
        return node

    yield factory
    for node, conn in made:
        await node.stop(drain_timeout=1)
        await conn.close()


@pytest.fixture
async def node(make_node: NodeFactory) -> ExecutorNode:
    return await make_node()


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[LloomClient]:
    async with await LloomClient.connect(nats_server.url, timeout=10.0) as c:
        yield c
