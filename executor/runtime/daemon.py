"""The long-lived executor process: wire NATS, HTTP and the backend to a node, run until told to stop.

Owns, in order of creation and reverse order of shutdown: the embedded NATS
bus (when no URL is configured: started, or joined when another executor of this
machine runs it; see process/shared_bus.py; a leaf node of `[hub] url` when set, see process/leaf.py),
the NATS connection, the process's one aiohttp session (for plugin backends), the backend, the
node with its collaborators (made by executor/runtime/builder.py), and the OpenAI-compatible
gateway (executor/gateway/, on by default with the embedded bus), which stops first.
SIGTERM and SIGINT set the stop event; the node then drains and the process exits 0. The handlers are in
place before anything else starts, and the start-up steps that wait on the
network (connecting to NATS) are abandoned when the stop event is set, so a
SIGTERM ends the process even while it is still trying to connect. SIGHUP reads
the config again and applies its backend API keys (executor/runtime/keys.py); a
watched `api_key_file` is applied without any signal.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import structlog

from executor.backends.autodetect import AutoDetectBackend
from executor.backends.registry import create_backend, create_pool
from executor.config import ConfigError, ExecutorConfig
from executor.jobs.node import ExecutorNode
from executor.process.leaf import Leaf
from executor.process.shared_bus import SharedBus
from executor.runtime.builder import assemble, data_home
from executor.runtime.keys import KeyRotation
from executor.secrets import SecretMasker, config_secrets
from protocol.connection import Violations, close_nats, connect_nats, redact

if TYPE_CHECKING:  # imported only when telemetry is on (it costs ~5 MB of RSS)
    from executor.gateway.server import GatewayServer
    from executor.telemetry.setup import Telemetry

log = structlog.get_logger(logger_name=__name__)
T = TypeVar("T")


class Stopped(Exception):
    """The stop event was set while a start-up step was still waiting."""


async def unless_stopped(step: Awaitable[T], stop: asyncio.Event) -> T:
    """Await `step`, or cancel it and raise `Stopped` when `stop` is set first."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if task.cancelled():
        raise Stopped
    return task.result()


def http_session(config: ExecutorConfig) -> aiohttp.ClientSession:
    """The process's one aiohttp session (created inside the running loop): probes, plugins and the
    aiohttp transport use it. trust_env: HTTP(S)_PROXY/NO_PROXY (and .netrc) apply to it."""
    connector = aiohttp.TCPConnector(limit=config.llm_client.max_connections, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=config.llm_client.timeout_secs), trust_env=True
    )


async def start_shared_bus(config: ExecutorConfig) -> SharedBus:
    """Own, or join, the embedded NATS bus of this machine (see executor/process/shared_bus.py)."""
    # JetStream keeps the receipts; its data outlives the process, like the outbox.
    leaf = Leaf(config.hub, config.node.id) if config.hub.url else None
    bus = SharedBus(port=config.node.embedded_nats_port, store_dir=data_home() / "nats", leaf=leaf)
    if leaf is not None:
        log.info("joining hub as a leaf node", hub=leaf.link.hub, domain=leaf.domain)
        queued = [f.model for f in config.executors.fallbacks if f.strategy == "queue"]
        if queued:
            # The queue and its results bucket stay in this machine's JetStream domain (process/leaf.py).
            log.warning("queue fallbacks keep jobs and results on this machine: a hub client whose job is"
                        " queued here cannot fetch its result; prefer reject or secondary for them", models=queued)  # fmt: skip
    await bus.start()
    return bus


async def _nats_error(e: Exception) -> None:
    # Denied publishes and slow consumers are reported only here (see NATS-NOTES).
    log.warning("nats error", error=str(e) or type(e).__name__)


async def serve(
    config: ExecutorConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[ExecutorNode, str], None] | None = None,
    masker: SecretMasker | None = None,
    reload: Callable[[], ExecutorConfig] | None = None,
) -> None:
    """Run an executor until `stop` is set (or SIGTERM/SIGINT), then drain.

    `reload` reads the config again (on SIGHUP, for its API keys); `masker` holds the
    process's secrets (made from `config` when not given)."""
    stop = stop or asyncio.Event()
    masker = masker or SecretMasker(config_secrets(config))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rotation: KeyRotation | None = None

    def on_hangup() -> None:
        if rotation is None or reload is None:
            log.info("SIGHUP ignored: nothing to reload yet")
            return
        try:
            rotation.reload(reload())
        except ConfigError as e:
            log.warning("SIGHUP: the config cannot be read again; keeping the current keys", error=str(e))
            return
        log.info("SIGHUP: backend API keys reloaded", rotations=rotation.rotations)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        async with AsyncExitStack() as stack:
            url = config.node.nats_url
            if not url:
                bus = await start_shared_bus(config)
                stack.push_async_callback(bus.stop)  # last: the other executors may take the bus over then
                url = bus.url
            name = f"lloom-executor {config.node.id or ''}".strip()
            log.info("connecting to NATS", url=redact(url, config.nats))
            try:
                violations = Violations(then=_nats_error)
                nc = await unless_stopped(
                    connect_nats(url, name=name, options=config.nats, on_error=violations), stop
                )
            except Stopped:
                log.info("stop requested while connecting to NATS; exiting")
                return
            stack.push_async_callback(close_nats, nc)
            # Without its replies (JetStream acks, liveness answers) a node would run but never settle a receipt.
            await violations.check_inbox(nc, timeout=config.nats.connect_timeout_secs)
            session = http_session(config)
            stack.push_async_callback(session.close)
            if config.executors.backends:
                backend = create_pool(config.executors, session)
                backend.start_health_checks()
            else:
                backend = create_backend(config.llm_client, session)
            stack.push_async_callback(backend.aclose)
            rotation = KeyRotation(backend, config, masker)
            await rotation.start()
            stack.push_async_callback(rotation.stop)
            running = await assemble(config, nc, backend, stack, masker=masker)
            node = running.node
            _report_backend(node)
            if gateway_enabled(config):
                await start_gateway(config, url, stack, running.telemetry)
            if on_ready is not None:
                on_ready(node, url)
            await stop.wait()
            log.info("stop requested; draining")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def gateway_enabled(config: ExecutorConfig) -> bool:
    """`[gateway] enabled`; unset, it runs with the single-machine start (the embedded NATS) only."""
    return config.gateway.enabled if config.gateway.enabled is not None else not config.node.nats_url


async def start_gateway(config: ExecutorConfig, url: str, stack: AsyncExitStack,
                        telemetry: Telemetry | None = None) -> GatewayServer | None:  # fmt: skip
    """The OpenAI-compatible gateway in this process, on its own client connection; stopped (drained)
    by `stack` before the node drains. A taken port (another executor of this machine runs one) is
    logged and skipped: the executor serves jobs all the same. With the executor's `telemetry`, the
    gateway's metrics and spans go through it (its metrics port: no second one)."""
    # Imported here: an executor without a gateway (a cluster's) keeps aiohttp's server out of memory.
    from executor.gateway.keystore import KeyStoreError
    from executor.gateway.seams import seams_for
    from executor.gateway.server import GatewayServer
    from protocol.client import LloomClient

    gw = config.gateway
    try:
        client = await LloomClient.connect(url, timeout=gw.default_timeout_secs, client_id=gw.client_id,
                                           options=config.nats)  # fmt: skip
    except ConnectionError as e:
        log.warning("OpenAI-compatible gateway not started: it cannot connect to NATS as a client", error=str(e))
        return None
    stack.push_async_callback(client.close)
    observer = None
    if telemetry is not None:
        from executor.gateway.telemetry import GatewayTelemetry

        observer = GatewayTelemetry.beside(telemetry).observer
    try:
        admission, routes = await seams_for(client, gw)
    except KeyStoreError as e:
        log.warning("OpenAI-compatible gateway not started: [gateway] api_keys is on but the keys are"
                    " unreachable", error=str(e))  # fmt: skip
        return None
    server = GatewayServer(client, gw, admission=admission, extra_routes=routes, observer=observer)
    try:
        await server.start()
    except OSError as e:
        log.warning("OpenAI-compatible gateway not started: its address is taken (another gateway on this"
                    " machine?); set [gateway] listen", listen=gw.listen, error=e.strerror or str(e))  # fmt: skip
        return None
    stack.push_async_callback(server.stop)
    log.info("OpenAI-compatible gateway ready", url=f"{server.url}/v1")
    return server


def _report_backend(node: ExecutorNode) -> None:
    backend = node.backend
    # Failures to list models were logged by the node; say what was found.
    if isinstance(backend, AutoDetectBackend) and backend.resolved is not None:
        log.info("auto-detected backend", backend=backend.resolved.name)
