"""A whole network for gateway tests: real nats-server (JetStream), real executors assembled from
their config as the daemon does (receipts, announcer, prices, features), each on the OpenAI double,
and real gateways on free ports."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import aiohttp

from executor.backends.registry import create_backend
from executor.config import (
    ExecutorConfig, GatewayConfig, ImageUrlPolicy, LlmClientConfig, ModelConfig, NodeConfig, ReceiptsConfig,
)
from executor.gateway.app import Middleware
from executor.gateway.server import GatewayServer
from executor.runtime.builder import RunningNode, assemble
from protocol.client import LloomClient
from protocol.connection import NatsConnectOptions, connect_nats
from protocol.identity import Identity
from tests.doubles.openai_double import OpenAIDouble

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def offer(name: str, inp: str = "0", out: str = "0", *features: str, context: int | None = None) -> ModelConfig:
    return ModelConfig(name=name, input_price=Decimal(inp), output_price=Decimal(out), context_length=context,
                       features=["chat", "stream", *features])  # fmt: skip


class Network:
    """Executors and gateways on one bus; everything is stopped by `aclose`."""

    def __init__(self, nats_url: str, tmp: Path) -> None:
        self.nats_url = nats_url
        self.tmp = tmp
        self.stack = AsyncExitStack()
        self.session: aiohttp.ClientSession | None = None
        self.executors: dict[str, RunningNode] = {}
        self.doubles: dict[str, OpenAIDouble] = {}

    async def executor(self, executor_id: str, *offers: ModelConfig, double: OpenAIDouble | None = None,
                       options: NatsConnectOptions | None = None, tracer_provider: TracerProvider | None = None,
                       image_urls: ImageUrlPolicy = "data_only", **node: object) -> RunningNode:  # fmt: skip
        if self.session is None:
            self.session = aiohttp.ClientSession()
            self.stack.push_async_callback(self.session.close)
        if double is None:
            double = OpenAIDouble(models=[o.name for o in offers])
            await double.start()
            self.stack.push_async_callback(double.stop)
        config = ExecutorConfig(
            node=NodeConfig(id=executor_id, nats_url=self.nats_url, **node),  # type: ignore[arg-type]
            llm_client=LlmClientConfig(backend="openai_compatible", base_url=double.base_url,
                                       models=[o.name for o in offers], timeout_secs=30, image_urls=image_urls),
            models=list(offers),
            receipts=ReceiptsConfig(outbox_dir=str(self.tmp / f"outbox-{executor_id}")),
        )  # fmt: skip
        nc = await connect_nats(self.nats_url, name=executor_id, options=options)
        self.stack.push_async_callback(nc.close)
        backend = create_backend(config.llm_client, self.session)
        self.stack.push_async_callback(backend.aclose)
        running = await assemble(config, nc, backend, self.stack, identity=Identity.generate(),
                                 tracer_provider=tracer_provider)  # fmt: skip
        self.executors[executor_id] = running
        self.doubles[executor_id] = double
        return running

    async def gateway(self, options: NatsConnectOptions | None = None, observer: Middleware | None = None, *,
                      admission: Any = None, extra_routes: Iterable[Any] = (), **config: object) -> GatewayServer:  # fmt: skip
        """A gateway on a free port; `admission` may be a factory taking the gateway's client (keys)."""
        client = await LloomClient.connect(self.nats_url, timeout=15, client_id="gateway", options=options)
        self.stack.push_async_callback(client.close)
        seams: dict[str, Any] = {"extra_routes": extra_routes, "observer": observer}
        if admission is not None:
            seams["admission"] = await admission(client) if callable(admission) else admission
        server = GatewayServer(client, GatewayConfig(listen="127.0.0.1:0", **config), **seams)  # type: ignore[arg-type]
        await server.start()
        self.stack.push_async_callback(server.stop)
        return server

    async def aclose(self) -> None:
        await self.stack.aclose()
