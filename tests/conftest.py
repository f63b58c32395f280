"""Fixtures shared by every test: real nats-server processes, the OpenAI test double, nodes and clients.

Everything here is real except the LLM backend, which is the fault-injecting
test double `tests.doubles.openai_double.OpenAIDouble` speaking OpenAI's wire
format over real HTTP. Nodes run in-process on the test's event loop; tests
that need a node as a separate process (signals, SIGKILL) start the
`lloom-executor` console script with `start_executor` (see tests/helpers/processes.py).
Plain helpers (requests, bounded waits, a fake clock) are in tests/helpers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nkeys
import pytest
from nats.aio.client import Client as NATS

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.presets import PRESETS
from executor.catalog.announcer import Announcer
from executor.config import ModelConfig, NodeConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode, default_executor_id
from executor.receipts.issuer import ReceiptIssuer
from executor.receipts.outbox import Outbox
from protocol.identity import Identity
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.jobs import MODEL
from tests.helpers.processes import EXECUTOR, Executor, StartExecutor, clean_env


# Bound on one client call in the JetStream tests (queue results, receipts): generous for a loaded machine.
JS_CLIENT_TIMEOUT_S = 15.0

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
    passwords = {user: "pw" + secrets.token_hex(12) for user in ("admin", "executor-1", "alice", "laptop-1", "gateway")}
    env = dict(os.environ)
    env.update({
        "LLOOM_NATS_ADMIN_PASSWORD": passwords["admin"],
        "LLOOM_NATS_EXECUTOR_1_PASSWORD": passwords["executor-1"],
        "LLOOM_NATS_ALICE_PASSWORD": passwords["alice"],
        "LLOOM_NATS_LAPTOP_1_PASSWORD": passwords["laptop-1"],
        "LLOOM_NATS_GATEWAY_PASSWORD": passwords["gateway"],
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
async def js_server() -> AsyncIterator[EmbeddedNats]:
    """A nats-server with JetStream (a temporary store), for the queue, receipts and KV tests."""
    async with EmbeddedNats(jetstream=True) as server:
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


Signing = Callable[..., dict[str, Any]]


@pytest.fixture
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signing]:
    """`ExecutorNode(..., **signing())`: an executor id and a receipt issuer for it (a fresh key, an
    outbox in a temporary directory, closed at teardown), as every real executor has: clients verify
    replies by their receipts."""
    outboxes: list[Outbox] = []

    def make(executor_id: str | None = None, identity: Identity | None = None) -> dict[str, Any]:
        executor_id = executor_id or default_executor_id()
        outbox = Outbox(tmp_path_factory.mktemp("outbox"))
        outboxes.append(outbox)
        return {"executor_id": executor_id, "receipts": ReceiptIssuer(identity or Identity.generate(), executor_id, outbox)}

    yield make
    for outbox in outboxes:
        outbox.close()


@pytest.fixture
async def make_node(
    nats_server: EmbeddedNats, double: OpenAIDouble, http: aiohttp.ClientSession, signing: Signing
) -> AsyncIterator[NodeFactory]:
    """Build and start nodes on their own NATS connections; all are stopped at teardown.

    Every node signs receipts (a fresh key, an outbox in a temporary directory) as a real
    executor does, because clients verify replies by them; `parts={"receipts": None}`
    makes a receipt-less node, for tests about networks without receipts."""
    made: list[tuple[ExecutorNode, NATS]] = []

    async def factory(
        *, base_url: str | None = None, timeout_secs: float = 10.0, models: list[str] | None = None,
        parts: dict[str, object] | None = None, preset: str = "openai_compatible", **node_config: object,
    ) -> ExecutorNode:
        """`parts`: the node's collaborators by keyword (receipts, cache, batcher, ...); `preset`: the
        backend preset (executor/backends/presets.py) the double stands for; the rest is NodeConfig."""
        conn = await nats.connect(nats_server.url)
        backend = OpenAICompatibleBackend(http, base_url=base_url or double.base_url, timeout_secs=timeout_secs,
                                          preset=PRESETS[preset])  # fmt: skip
        config = NodeConfig(**node_config)
        parts = dict(parts or {})
        if "receipts" in parts:
            issuer = parts["receipts"]
            parts["executor_id"] = issuer.executor_id if isinstance(issuer, ReceiptIssuer) else config.id
        else:
            parts.update(signing(config.id))
        node = ExecutorNode(conn, backend, config, models=models, **parts)  # type: ignore[arg-type]
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


# Configured, as an operator does for a backend that cannot be asked (vLLM, OpenAI).
EVERY_FEATURE = ["chat", "stream", "tools", "vision", "json_schema", "reasoning"]


@pytest.fixture
async def capable_node(
    make_node: NodeFactory, signing: Signing, double: OpenAIDouble, request: pytest.FixtureRequest
) -> AsyncIterator[ExecutorNode]:
    """A node whose models (the double's) are configured with every capability of the chat surface
    and announced on the bus, so a client routes requests needing them (tools, images, ...) to it.
    Parametrized indirectly, the parameter is its `image_urls` policy (default: the executor's, data_only)."""
    identity = Identity.generate()
    features = {model: EVERY_FEATURE for model in double.models}
    policy = {"image_urls": request.param} if hasattr(request, "param") else {}
    node = await make_node(parts={**signing(None, identity), "model_features": features, **policy})
    offers = [ModelConfig(name=model, features=EVERY_FEATURE) for model in double.models]
    announcer = Announcer(node.nc, node, identity, models=offers)
    await announcer.start()
    yield node
    await announcer.stop()


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[LloomClient]:
    async with await LloomClient.connect(nats_server.url, timeout=10.0) as c:
        yield c


@pytest.fixture
async def js_client(js_server: EmbeddedNats) -> AsyncIterator[LloomClient]:
    """A client of `js_server` identifying itself as the client "acme" (receipts name it)."""
    async with await LloomClient.connect(js_server.url, timeout=JS_CLIENT_TIMEOUT_S, client_id="acme") as c:
        yield c


# -- the console scripts as subprocesses ----------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The subprocesses' environment: no user config, no inherited Lloom settings."""
    return clean_env(tmp_path)


@pytest.fixture
async def start_executor(env: dict[str, str]) -> AsyncIterator[StartExecutor]:
    """Start `lloom-executor ARGS...`; each one (and its nats-server) is killed at teardown."""
    started: list[Executor] = []

    async def start(*args: str, own_session: bool = False) -> Executor:
        proc = await asyncio.create_subprocess_exec(
            EXECUTOR, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, start_new_session=own_session,
        )  # fmt: skip
        executor = Executor(proc)
        started.append(executor)
        return executor

    yield start
    for executor in started:
        await executor.close()
