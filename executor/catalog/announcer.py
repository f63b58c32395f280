"""Where the catalogue is announced: this executor's signed offer, heartbeats and goodbye.

The `Announcer` publishes on `lloom.v1.catalog.announce` (see
`protocol/announcements.py` for the messages and their rules):

- a full `Announcement` on start, whenever the served models change, and every
  `FULL_EVERY` heartbeats so that measured performance stays current;
- a small `Heartbeat` every `heartbeat_interval` otherwise;
- `state = "down"` on stop, before the node drains, so clients stop choosing
  this executor at once.

It also answers catalogue queries (`lloom.v1.catalog.query`, asked by every new
client) and direct info requests with a fresh signed announcement.
"""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from executor.catalog.features import model_features
from executor.config import ModelConfig
from executor.jobs.node import ExecutorNode
from protocol import subjects as subj
from protocol.connection import subscriptions_live
from protocol.announcements import HDR_SIGNATURE, Announcement, Heartbeat, Load, ModelOffer, Performance, Pricing
from protocol.identity import Identity
from protocol.trust import Endorsement

log = structlog.get_logger(logger_name=__name__)

# Every this many heartbeats, a full announcement instead (fresh performance figures).
FULL_EVERY = 20
_encode = msgspec.json.Encoder().encode


class Announcer:
    def __init__(
        self,
        nc: NATS,
        node: ExecutorNode,
        identity: Identity,
        *,
        models: list[ModelConfig] | None = None,
        heartbeat_interval: float = 0.5,
        endorsement: Endorsement | None = None,
    ) -> None:
        self._nc = nc
        self._node = node
        self.identity = identity
        self.endorsement = endorsement  # an operator's, of identity's key: announced so clients can trust it
        self._configured = {m.name: m for m in models or []}
        self.heartbeat_interval = heartbeat_interval
        self._epoch = time.time_ns() // 1_000_000
        self._seq = 0
        self._revision = 0
        self._shape: list[ModelOffer] | None = None  # the offers without their performance figures
        self._dirty = asyncio.Event()
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._subs = [
            await self._nc.subscribe(subj.CATALOG_QUERY, cb=self._answer),
            await self._nc.subscribe(subj.info_subject(self._node.id), cb=self._answer),
        ]
        self._node.on_models_changed.append(self._models_changed)
        await self._publish_full()
        await subscriptions_live(self._nc)  # when start() returns, queries are answered
        self._task = asyncio.create_task(self._beat(), name="heartbeat")

    async def stop(self) -> None:
        """Say goodbye (state "down") and stop answering; idempotent."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self._models_changed in self._node.on_models_changed:
            self._node.on_models_changed.remove(self._models_changed)
        if self._nc.is_closed:
            return
        for sub in self._subs:
            await sub.unsubscribe()
        await self._send(subj.CATALOG_ANNOUNCE, self._announcement(state="down"))
        await self._nc.flush()

    def offers(self) -> list[ModelOffer]:
        node = self._node
        out = []
        for name in sorted(node.models):
            cfg = self._configured.get(name) or ModelConfig(name=name)
            info = node.model_info.get(name)
            out.append(
                ModelOffer(
                    name=name,
                    backend=node.backend_kind,
                    pricing=Pricing(input=cfg.input_price, output=cfg.output_price),
                    context_length=cfg.context_length or (info.context_length if info else None),
                    features=model_features(cfg.features, info.capabilities if info else None),
                    category=cfg.category,
                    available=node.model_available(name),
                    perf=node.perf.snapshot(name),
                )
            )
        return out

    # -- messages --

    def _announcement(self, *, state: str = "up") -> bytes:
        offers = self.offers()
        shape = [msgspec.structs.replace(o, perf=Performance()) for o in offers]
        if shape != self._shape:
            self._shape = shape
            self._revision += 1
        models = offers if state == "up" else []
        return _encode(Announcement(**self._envelope(), state=state, models=models,  # type: ignore[arg-type]
                                    endorsement=self.endorsement, curve_key=self._curve_key()))  # fmt: skip

    def _curve_key(self) -> str | None:
        curve = self._node.curve
        return None if curve is None else curve.public_key

    def _shape_changed(self) -> bool:
        """Whether the offers (availability included) differ from the last announcement."""
        return [msgspec.structs.replace(o, perf=Performance()) for o in self.offers()] != self._shape

    def _heartbeat(self) -> bytes:
        return _encode(Heartbeat(**self._envelope()))

    def _envelope(self) -> dict[str, object]:
        """The fields every catalogue message carries; each call takes the next sequence number."""
        self._seq += 1
        return {
            "executor_id": self._node.id,
            "key": self.identity.public_key,
            "epoch": self._epoch,
            "seq": self._seq,
            "sent_at_ms": time.time_ns() // 1_000_000,
            "heartbeat_ms": int(self.heartbeat_interval * 1000),
            "revision": self._revision,
            "load": self._load(),
        }

    def _load(self) -> Load:
        return Load(in_flight=self._node.in_flight, capacity=self._node.config.max_concurrent_jobs)

    async def _send(self, subject: str, payload: bytes) -> None:
        await self._nc.publish(subject, payload, headers={HDR_SIGNATURE: self.identity.sign(payload)})

    async def _publish_full(self) -> None:
        await self._send(subj.CATALOG_ANNOUNCE, self._announcement())

    async def _answer(self, msg: Msg) -> None:
        if msg.reply and subj.is_reply_inbox(msg.reply):
            await self._send(msg.reply, self._announcement())

    def _models_changed(self) -> None:
        self._dirty.set()

    async def _beat(self) -> None:
        count = 0
        while True:
            try:
                # ±10% jitter: executors started together do not stay in step (bursts at clients).
                async with asyncio.timeout(self.heartbeat_interval * random.uniform(0.9, 1.1)):
                    await self._dirty.wait()  # a change is announced at once, not at the next beat
            except TimeoutError:
                pass
            count += 1
            try:
                if self._dirty.is_set() or count % FULL_EVERY == 0 or self._shape_changed():
                    self._dirty.clear()
                    await self._publish_full()
                else:
                    await self._send(subj.CATALOG_ANNOUNCE, self._heartbeat())
            except Exception as e:  # a disconnected bus must not end the heartbeat for good
                log.warning("heartbeat failed", error=str(e) or type(e).__name__)
