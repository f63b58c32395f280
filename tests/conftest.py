"""Fixtures shared by every test: real nats-server processes, the OpenAI test double, nodes and clients.

Everything here is real except the LLM backend, which is the fault-injecting
test double `tests.doubles.openai_double.OpenAIDouble` speaking OpenAI's wire
format over real HTTP. Nodes run in-process on the test's event loop; tests
that need a node as a separate process (signals, SIGKILL) start the
`lloom-executor` console script.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats
import nkeys
import pytest
from nats.aio.client import Client as NATS

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import NodeConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions
from tests.doubles.openai_double import OpenAIDouble

MODEL = "double-model"

NodeFactory = Callable[..., Awaitable[ExecutorNode]]


@pytest.fixture
async def nats_server() -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats() as server:
        yield server


SECURE_CONF = Path(__file__).resolve().parent.parent / "compose" / "nats" / "secure.conf"


@dataclass
class SecureBus:
    """A nats-server running the shipped permissions config (compose/nats/secure.conf)."""

    server: EmbeddedNats
    passwords: dict[str, str]  # user -> password (admin, executor-1, alice)
    nkey_files: dict[str, Path]  # user -> nkey seed file (executor-2, bob)
    env: dict[str, str] = field(default_factory=dict)  # the server's environment

    @property
    def url(self) -> str:
        return self.server.url

    def options(self, user: str, **more: object) -> NatsConnectOptions:
        """How `user` connects: its password or nkey, and the inbox prefix its permissions allow."""
        if user in self.nkey_files:
            auth: dict[str, object] = {"nkey_file": str(self.nkey_files[user])}
        else:
            auth = {"user": user, "password": self.passwords[user]}
        prefix = {} if user == "admin" else {"inbox_prefix": f"_INBOX_{user}"}
        return NatsConnectOptions(**auth, **prefix, **more)  # type: ignore[arg-type]


async def start_secure_bus(tmp: Path, *extra_args: str) -> SecureBus:
    """Start the shipped secure config on a free port, secrets made up for this run."""
    passwords = {user: "pw" + secrets.token_hex(12) for user in ("admin", "executor-1", "alice")}
    env = dict(os.environ)
    env.update({
        "LLOOM_NATS_ADMIN_PASSWORD": passwords["admin"],
        "LLOOM_NATS_EXECUTOR_1_PASSWORD": passwords["executor-1"],
        "LLOOM_NATS_ALICE_PASSWORD": passwords["alice"],
    })  # fmt: skip
    nkey_files = {}
    for user, var in (("executor-2", "LLOOM_NATS_EXECUTOR_2_NKEY"), ("bob", "LLOOM_NATS_BOB_NKEY")):
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        path = tmp / f"{user}.nk"
        path.write_bytes(seed + b"\n")
        env[var] = nkeys.from_seed(bytearray(seed)).public_key.decode()
        nkey_files[user] = path
    store = tmp / "jetstream"
    server = EmbeddedNats(extra_args=["-c", str(SECURE_CONF), "-sd", str(store), *extra_args], env=env)
    await server.start()
    return SecureBus(server, passwords, nkey_files, env)


@pytest.fixture
async def secure_bus(tmp_path: Path) -> AsyncIterator[SecureBus]:
    bus = await start_secure_bus(tmp_path)
    yield bus
    await bus.server.stop()


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
