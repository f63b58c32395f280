"""The long-lived executor process: wire NATS, HTTP and the backend to a node, run until told to stop.

Owns, in order of creation and reverse order of shutdown: the embedded NATS
bus (when no URL is configured: started, or joined when another executor of this
machine runs it; see shared_bus.py), the NATS connection, the process's one
aiohttp session (for plugin backends), the backend, the node and its
announcer. SIGTERM and SIGINT set the stop
event; the node then drains and the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import structlog
from nats.aio.client import Client as NATS

from executor.announcer import Announcer
from executor.backends.autodetect import AutoDetectBackend
from executor.backends.base import EmbeddingBackend, TextBackend
from executor.batcher import Batcher
from executor.backends.registry import create_backend, create_pool
from executor.config import ExecutorConfig
from executor.cache import ResponseCache
from executor.job_queue import JobQueue
from executor.node import ExecutorNode
from executor.outbox import Outbox
from executor.receipt_healer import ReceiptHealer
from executor.receipt_publisher import ReceiptPublisher
from executor.receipts import ReceiptIssuer
from executor.shared_bus import SharedBus
from executor.shared_cache import SharedCache
from executor.tokens import TokenCounter
from protocol.announcements import Pricing
from protocol.connection import close_nats, connect_nats
from protocol.identity import Identity

log = structlog.get_logger(logger_name=__name__)
FREE = Pricing()


def http_session(config: ExecutorConfig) -> aiohttp.ClientSession:
    """The process's one connection pool to backends (created inside the running loop)."""
    connector = aiohttp.TCPConnector(limit=config.llm_client.max_connections, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=config.llm_client.timeout_secs))


async def start_shared_bus(config: ExecutorConfig) -> SharedBus:
    """Own, or join, the embedded NATS bus of this machine (see executor/shared_bus.py)."""
    # JetStream keeps the receipts; its data outlives the process, like the outbox.
    bus = SharedBus(port=config.node.embedded_nats_port, store_dir=data_home() / "nats")
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
) -> None:
    """Run an executor until `stop` is set (or SIGTERM/SIGINT), then drain."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with AsyncExitStack() as stack:
            url = config.node.nats_url
            if not url:
                bus = await start_shared_bus(config)
                stack.push_async_callback(bus.stop)  # last: the other executors may take the bus over then
                url = bus.url
            nc = await connect_nats(url, name=f"lloom-executor {config.node.id or ''}".strip(), on_error=_nats_error)
            stack.push_async_callback(close_nats, nc)
            session = http_session(config)
            stack.push_async_callback(session.close)
            if config.executors.backends:
                backend = create_pool(config.executors, session)
                backend.start_health_checks()
            else:
                backend = create_backend(config.llm_client, session)
            stack.push_async_callback(backend.aclose)
            models = None if config.executors.backends else config.llm_client.models
            node = ExecutorNode(nc, backend, config.node, models=models)
            if config.cache.enabled:
                c = config.cache
                node.cache = ResponseCache(max_entries=c.max_entries, max_bytes=int(c.max_mb * 2**20), ttl_s=c.ttl_secs)
                if c.shared:
                    node.shared_cache = await SharedCache.open(nc.jetstream(), ttl_s=c.ttl_secs,
                                                               max_bytes=int(c.shared_max_mb * 2**20))  # fmt: skip
                    stack.push_async_callback(node.shared_cache.aclose)
            if config.batching.enabled and isinstance(backend, (EmbeddingBackend, TextBackend)):
                b = config.batching
                node.batcher = Batcher(backend, window_s=b.window_ms / 1000, max_inputs=b.max_inputs,
                                       max_calls=b.max_calls)  # fmt: skip
                stack.push_async_callback(node.batcher.aclose)
            identity = load_identity(config, node.id)
            if config.receipts.enabled:
                publisher, healer = await start_receipts(config, nc, node, identity)
                stack.callback(publisher.outbox.close)  # after the publisher's last flush: frees the outbox's lock
                stack.push_async_callback(publisher.stop)  # after the drain: the last jobs' receipts too
                stack.push_async_callback(healer.stop)
            queue = _job_queue(config, nc, node)
            if queue is not None:
                stack.push_async_callback(queue.stop)  # after the drain: the last queued runs store their results
            await node.start()
            stack.push_async_callback(node.stop)
            if queue is not None:
                await queue.start()
            announcer = Announcer(
                nc,
                node,
                identity,
                models=config.models,
                heartbeat_interval=config.node.heartbeat_interval_secs,
            )
            await announcer.start()
            # Runs before node.stop (the stack unwinds in reverse): clients stop choosing
            # this executor at once, then in-flight jobs drain.
            stack.push_async_callback(announcer.stop)
            _report_backend(node)
            if on_ready is not None:
                on_ready(node, url)
            await stop.wait()
            log.info("stop requested; draining")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "lloom"


async def start_receipts(
    config: ExecutorConfig, nc: NATS, node: ExecutorNode, identity: Identity
) -> tuple[ReceiptPublisher, ReceiptHealer]:
    """Give the node a receipt issuer whose outbox a background publisher drains into JetStream.

    A healer puts back in the stream what the outbox has acknowledged and the stream lacks,
    for this outbox and (at start) those that earlier identities left on this machine.
    """
    rc = config.receipts
    directory = Path(rc.outbox_dir).expanduser() if rc.outbox_dir else data_home() / "receipts" / node.id
    outbox = Outbox(directory)
    publisher = ReceiptPublisher(
        nc, outbox, duplicate_window_s=rc.duplicate_window_secs, sync_interval_s=rc.sync_interval_secs
    )
    prices = {m.name: Pricing(input=m.input_price, output=m.output_price) for m in config.models}
    counter = TokenCounter(config.tokens)

    def warm_tokenizers() -> None:
        # Building an encoding takes up to ~0.4 s: pay it when a model appears, not in its first job.
        for model in node.models:
            counter.method_for(model)

    node.on_models_changed.append(warm_tokenizers)
    node.receipts = ReceiptIssuer(
        identity,
        node.id,
        outbox,
        pricing=lambda model: prices.get(model, FREE),
        on_issue=publisher.notify,
        counter=counter,
        mismatch_tolerance=config.tokens.mismatch_tolerance,
    )
    await publisher.start()
    if outbox.pending:
        log.info("publishing receipts left by an earlier run", pending=len(outbox.pending), outbox=str(directory))
    healer = ReceiptHealer(
        nc, outbox, publisher, executor_id=node.id, siblings=None if rc.outbox_dir else directory.parent,
        interval_s=rc.reconcile_interval_secs, duplicate_window_s=rc.duplicate_window_secs,
    )  # fmt: skip
    await healer.start()
    return publisher, healer


def uses_queue(config: ExecutorConfig) -> bool:
    ex = config.executors
    return ex.queue.consume_all or any(f.strategy == "queue" for f in ex.fallbacks)


def _job_queue(config: ExecutorConfig, nc: NATS, node: ExecutorNode) -> JobQueue | None:
    if not uses_queue(config):
        return None
    ex = config.executors
    fallback = {f.model for f in ex.fallbacks if f.strategy == "queue"}
    node.job_queue = JobQueue(nc, node, ex.queue, fallback_models=fallback, retry=ex.retry)
    return node.job_queue


def load_identity(config: ExecutorConfig, executor_id: str) -> Identity:
    """The configured key file, a per-id file when the id is stable, else a key for this run only."""
    if config.node.identity_file:
        path = Path(config.node.identity_file).expanduser()
    elif config.node.id:
        path = data_home() / f"{executor_id}.nk"
    else:
        return Identity.generate()
    identity = Identity.load_or_create(path)
    log.info("executor identity", key=identity.public_key, file=str(path))
    return identity


def _report_backend(node: ExecutorNode) -> None:
    backend = node.backend
    # Failures to list models were logged by the node; say what was found.
    if isinstance(backend, AutoDetectBackend) and backend.resolved is not None:
        log.info("auto-detected backend", backend=backend.resolved.name)
