"""A client's live view of the network: which executors serve which models, at what price and load.

    catalog = Catalog(nc)
    await catalog.start()            # subscribes, then asks every executor at once
    for entry in catalog.entries():  # live executors only
        ...

Start-up does not wait for heartbeats: a query on `lloom.v1.catalog.query` is
answered by every executor with its signed announcement, and the answers are
collected until none has come for `idle_gap` (no executor at all answers at
once, through the server's no-responders status). Afterwards announcements and
heartbeats keep the view current; an executor that stops gracefully is removed
at its "down" announcement, one that dies after `missed_heartbeats` heartbeat
periods of silence. Unsigned, forged, replayed and stale messages are dropped
and counted in `rejected`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from protocol import subjects as subj
from protocol.announcements import HDR_SIGNATURE, Announcement, Heartbeat, Load, ModelOffer, Rejected, open_signed


class ExecutorEntry:
    """One live executor as last announced."""

    __slots__ = ("announcement", "load", "expires_at")

    def __init__(self, announcement: Announcement, expires_at: float) -> None:
        self.announcement = announcement
        self.load: Load = announcement.load
        self.expires_at = expires_at

    @property
    def executor_id(self) -> str:
        return self.announcement.executor_id

    @property
    def key(self) -> str:
        return self.announcement.key

    @property
    def models(self) -> list[ModelOffer]:
        return self.announcement.models


class Catalog:
    def __init__(
        self,
        nc: NATS,
        *,
        idle_gap: float = 0.05,
        query_timeout: float = 1.0,
        missed_heartbeats: float = 2.5,
        max_age_s: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._nc = nc
        self.idle_gap = idle_gap
        self.query_timeout = query_timeout
        self.missed_heartbeats = missed_heartbeats
        # Messages sent longer ago than this are stale (peers' clocks are assumed NTP-close).
        self.max_age_s = max_age_s
        self._wall_clock = wall_clock
        self._entries: dict[str, ExecutorEntry] = {}  # by key
        self._key_of: dict[str, str] = {}  # executor id -> key, for live entries
        # (epoch, seq, when accepted) of the last message accepted from each key. Kept
        # while a replay could still pass the staleness check, then forgotten.
        self._last: dict[str, tuple[int, int, float]] = {}
        self._fetching: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._changed = asyncio.Event()
        self.rejected: Counter[str] = Counter()

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(subj.CATALOG_ANNOUNCE, cb=self._on_message)
            await self.refresh()

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            if not self._nc.is_closed:
                await sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def refresh(self) -> None:
        """Ask every executor for its announcement and wait until the answers stop coming."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            await self._nc.publish(subj.CATALOG_QUERY, b"", reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.query_timeout
            answered = False
            while (left := deadline - loop.time()) > 0:
                try:
                    # The first answer may take a while (a busy executor); after it, the
                    # rest come close behind, and a short silence means they are all in.
                    msg = await sub.next_msg(timeout=min(self.idle_gap, left) if answered else left)
                except nats.errors.TimeoutError:
                    break
                if msg.headers and msg.headers.get(subj.HDR_STATUS) == subj.STATUS_NO_RESPONDERS:
                    break
                answered = True
                self._accept(msg, solicited=True)
        finally:
            await sub.unsubscribe()

    def entries(self) -> list[ExecutorEntry]:
        """Executors alive now (silent ones are dropped here, lazily)."""
        now = asyncio.get_running_loop().time()
        dead = [k for k, e in self._entries.items() if e.expires_at <= now]
        for key in dead:
            self._remove(key)
        if dead:
            self._changed.set()
            forget = now - self.max_age_s
            for key in [k for k, (_, _, seen) in self._last.items() if seen < forget and k not in self._entries]:
                del self._last[key]
        return list(self._entries.values())

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._key_of.pop(entry.executor_id, None)
        return True

    def model_names(self) -> list[str]:
        """The names of the models live executors serve, each once, sorted."""
        return sorted({offer.name for entry in self.entries() for offer in entry.models})

    def offers(self, model: str | None = None) -> Iterator[tuple[ExecutorEntry, ModelOffer]]:
        for entry in self.entries():
            for offer in entry.models:
                if model is None or offer.name == model:
                    yield entry, offer

    async def wait_changed(self, timeout: float | None = None) -> bool:
        """Wait for the next change (an executor added, updated or removed); False on timeout."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # -- incoming --

    async def _on_message(self, msg: Msg) -> None:
        self._accept(msg)

    def _accept(self, msg: Msg, *, solicited: bool = False) -> None:
        try:
            message = open_signed(msg.data, (msg.headers or {}).get(HDR_SIGNATURE))
            self._check_fresh(message)
        except Rejected as e:
            # An answer we asked for shares the executor's sequence with its broadcasts
            # but arrives on another subscription, so it may simply be overtaken: an
            # older answer is ignored, not counted as an attack.
            if not (solicited and e.kind == "replayed"):
                self.rejected[e.kind] += 1
            return
        now = asyncio.get_running_loop().time()
        self._last[message.key] = (message.epoch, message.seq, now)
        expires = now + self.missed_heartbeats * message.heartbeat_ms / 1000
        entry = self._entries.get(message.key)
        if isinstance(message, Announcement):
            if message.state == "down":
                if self._remove(message.key):
                    self._changed.set()
                return
            self._entries[message.key] = ExecutorEntry(message, expires)
            self._key_of[message.executor_id] = message.key
            self._changed.set()
            return
        assert isinstance(message, Heartbeat)
        if entry is not None:
            if entry.load != message.load:
                entry.load = message.load
                self._changed.set()
            entry.expires_at = expires
        if entry is None or entry.announcement.revision != message.revision:
            self._fetch(message)

    def _check_fresh(self, message: Announcement | Heartbeat) -> None:
        last = self._last.get(message.key)
        if last is not None and (message.epoch, message.seq) <= last[:2]:
            raise Rejected("replayed", "not newer than the last message of this key")
        age = self._wall_clock() - message.sent_at_ms / 1000
        if age > self.max_age_s:
            raise Rejected("stale", f"sent {age:.0f}s ago")
        holder = self._key_of.get(message.executor_id)
        if holder is not None and holder != message.key:
            raise Rejected("impostor", f"executor id {message.executor_id} belongs to another key")

    def _fetch(self, heartbeat: Heartbeat) -> None:
        """Ask an executor for the announcement its heartbeat says we lack."""
        if heartbeat.key in self._fetching:
            return
        self._fetching.add(heartbeat.key)

        async def fetch() -> None:
            try:
                msg = await self._nc.request(subj.info_subject(heartbeat.executor_id), b"", timeout=self.query_timeout)
                self._accept(msg, solicited=True)
            except (nats.errors.Error, subj.SubjectError):
                pass  # the next heartbeat tries again
            finally:
                self._fetching.discard(heartbeat.key)

        task = asyncio.create_task(fetch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
