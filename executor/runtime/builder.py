"""One way to make a running node from a config: the daemon uses it, and so do tests.

`assemble()` builds every collaborator the config asks for (response cache and its
shared level, batcher, receipt issuer with its outbox and publisher, the durable
queue's producer and consumer, the announcer), hands them to the node through its
constructor, starts them in order, and registers their shutdown on the caller's
`AsyncExitStack` in the reverse order that keeps guarantees: NATS micro discovery and the
announcer leave first (clients stop choosing this executor), then jobs drain, then queued
runs store their results, then the last receipts are published.

    async with AsyncExitStack() as stack:
        running = await assemble(config, nc, backend, stack)
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from nats.aio.client import Client as NATS

from executor.backends.base import Backend, EmbeddingBackend, TextBackend
from executor.batching.coalescer import Batcher
from executor.cache.memory import ResponseCache
from executor.cache.shared import SharedCache
from executor.catalog.announcer import Announcer
from executor.catalog.micro import MicroResponder
from executor.config import ExecutorConfig
from executor.jobs.node import ExecutorNode, default_executor_id
from executor.queue.consumer import JobQueue
from executor.queue.producer import JobEnqueuer
from executor.receipts.healer import ReceiptHealer
from executor.receipts.issuer import ReceiptIssuer
from executor.receipts.outbox import Outbox
from executor.receipts.publisher import ReceiptPublisher
from executor.secrets import SecretMasker, config_secrets
from executor.tokens import TokenCounter
from protocol import subjects as subj
from protocol.announcements import Pricing
from protocol.identity import Identity
from protocol.sealing import CurveKeyPair
from protocol.trust import Endorsement, load_endorsement

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when telemetry is on (it costs ~5 MB of RSS)
    from opentelemetry.sdk.trace import TracerProvider

    from executor.telemetry.setup import Telemetry

log = structlog.get_logger(logger_name=__name__)
FREE = Pricing()


@dataclass(frozen=True, slots=True)
class RunningNode:
    node: ExecutorNode
    identity: Identity
    announcer: Announcer
    publisher: ReceiptPublisher | None
    healer: ReceiptHealer | None
    queue: JobQueue | None
    telemetry: Telemetry | None = None


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "lloom"


async def assemble(
    config: ExecutorConfig,
    nc: NATS,
    backend: Backend,
    stack: AsyncExitStack,
    *,
    identity: Identity | None = None,
    masker: SecretMasker | None = None,
    tracer_provider: TracerProvider | None = None,
) -> RunningNode:
    """Build, start and register for shutdown a node and everything the config gives it.

    `tracer_provider`: record the jobs' spans there (tests pass one with an in-memory exporter);
    by default, one exporting to `[telemetry] otlp_endpoint` when that is set, else none."""
    executor_id = subj.check_id("executor id", config.node.id or default_executor_id())
    telemetry = None
    if config.telemetry.enabled or tracer_provider is not None:
        from executor.telemetry.setup import Telemetry

        telemetry = Telemetry(config.telemetry, executor_id, tracer_provider=tracer_provider)
        stack.push_async_callback(telemetry.aclose)  # last of the node's parts: after the drain, the final export
    identity = identity or load_identity(config, executor_id)
    cache = shared_cache = batcher = None
    if config.cache.enabled:
        c = config.cache
        cache = ResponseCache(max_entries=c.max_entries, max_bytes=int(c.max_mb * 2**20), ttl_s=c.ttl_secs)
        if c.shared:
            shared_cache = await SharedCache.open(nc.jetstream(), identity, ttl_s=c.ttl_secs,
                                                  max_bytes=int(c.shared_max_mb * 2**20),
                                                  trusted_keys=frozenset(c.trusted_keys))  # fmt: skip
            stack.push_async_callback(shared_cache.aclose)
    if config.batching.enabled and isinstance(backend, (EmbeddingBackend, TextBackend)):
        b = config.batching
        batcher = Batcher(backend, window_s=b.window_ms / 1000, max_inputs=b.max_inputs, max_calls=b.max_calls)
        stack.push_async_callback(batcher.aclose)
    endorsement = None
    if config.node.endorsement_file:
        endorsement = load_endorsement(config.node.endorsement_file, identity.public_key)  # TrustError if not ours
    receipts = publisher = None
    counter = TokenCounter(config.tokens)
    healer = None
    if config.receipts.enabled:
        receipts, publisher = receipt_issuer(config, nc, executor_id, identity, counter, endorsement)
        stack.callback(publisher.outbox.close)  # after the publisher's last flush: frees the outbox's lock
        stack.push_async_callback(publisher.stop)  # after the drain: the last jobs' receipts too
    enqueuer = None
    if uses_queue(config):
        ex = config.executors
        enqueuer = JobEnqueuer(nc.jetstream(), fallback_models={f.model for f in ex.fallbacks if f.strategy == "queue"},
                               consume_all=ex.queue.consume_all)  # fmt: skip
    node = ExecutorNode(
        nc, backend, config.node, executor_id=executor_id,
        models=None if config.executors.backends else config.llm_client.models,
        receipts=receipts, cache=cache, shared_cache=shared_cache, batcher=batcher, queue=enqueuer,
        masker=masker or SecretMasker(config_secrets(config)),
        # Derived from the identity: announced with it, so sealed jobs reach only this executor.
        curve=CurveKeyPair.derive(identity.seed) if config.node.sealed_jobs else None,
        # The same [[models]] the announcer announces from: what is announced is what is enforced.
        model_features={m.name: m.features for m in config.models if m.features is not None},
        recorder=telemetry and telemetry.recorder, tracer=telemetry and telemetry.tracer,
        image_urls=config.llm_client.image_urls,  # for every backend, [[executors.backends]] too
    )  # fmt: skip
    if receipts is not None:

        def warm_tokenizers() -> None:
            # Building an encoding takes up to ~0.4 s: pay it when a model appears, not in its first job.
            for model in node.models:
                counter.method_for(model)

        node.on_models_changed.append(warm_tokenizers)
    if publisher is not None:
        await publisher.start()
        if publisher.outbox.waiting:
            log.info("publishing receipts left by an earlier run", pending=publisher.outbox.waiting,
                     outbox=str(publisher.outbox.directory))  # fmt: skip
        # Puts back in the stream what the outbox has acknowledged and the stream lacks, for this
        # outbox and (at start) those that earlier identities left on this machine.
        rc = config.receipts
        healer = ReceiptHealer(
            nc, publisher.outbox, publisher, executor_id=executor_id,
            siblings=None if rc.outbox_dir else publisher.outbox.directory.parent,
            interval_s=rc.reconcile_interval_secs, duplicate_window_s=rc.duplicate_window_secs,
        )  # fmt: skip
        await healer.start()
        stack.push_async_callback(healer.stop)
    queue = None
    if enqueuer is not None:
        queue = JobQueue(nc, node, enqueuer, config.executors.queue, retry=config.executors.retry,
                         identity=identity)
        stack.push_async_callback(queue.stop)  # after the drain: the last queued runs store their results
    await node.start()
    stack.push_async_callback(node.stop)
    if telemetry is not None:
        await telemetry.start(node)
    if queue is not None:
        await queue.start()
    announcer = Announcer(nc, node, identity, models=config.models,
                          heartbeat_interval=config.node.heartbeat_interval_secs, endorsement=endorsement)  # fmt: skip
    await announcer.start()
    # Runs before node.stop (the stack unwinds in reverse): clients stop choosing
    # this executor at once, then in-flight jobs drain.
    stack.push_async_callback(announcer.stop)
    # NATS micro discovery ($SRV.PING/INFO/STATS); registered last, so it stops first: an
    # executor that leaves is no longer listed by `nats micro ls`.
    micro = MicroResponder(nc, node)
    await micro.start()
    stack.push_async_callback(micro.stop)
    return RunningNode(node=node, identity=identity, announcer=announcer, publisher=publisher, healer=healer,
                       queue=queue, telemetry=telemetry)  # fmt: skip


def receipt_issuer(
    config: ExecutorConfig,
    nc: NATS,
    executor_id: str,
    identity: Identity,
    counter: TokenCounter,
    endorsement: Endorsement | None = None,
) -> tuple[ReceiptIssuer, ReceiptPublisher]:
    """A receipt issuer whose outbox a background publisher drains into JetStream."""
    rc = config.receipts
    directory = Path(rc.outbox_dir).expanduser() if rc.outbox_dir else data_home() / "receipts" / executor_id
    outbox = Outbox(directory, memory_window=rc.memory_window, fsync_each_batch=rc.fsync_each_batch)
    publisher = ReceiptPublisher(
        nc, outbox, duplicate_window_s=rc.duplicate_window_secs, sync_interval_s=rc.sync_interval_secs
    )
    prices = {m.name: Pricing(input=m.input_price, output=m.output_price) for m in config.models}
    issuer = ReceiptIssuer(
        identity,
        executor_id,
        outbox,
        pricing=lambda model: prices.get(model, FREE),
        on_issue=publisher.notify,
        counter=counter,
        mismatch_tolerance=config.tokens.mismatch_tolerance,
        endorsement=endorsement,
    )
    return issuer, publisher


def uses_queue(config: ExecutorConfig) -> bool:
    ex = config.executors
    return ex.queue.consume_all or any(f.strategy == "queue" for f in ex.fallbacks)


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
