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

Identities: the first key that announces an executor id holds it for the life of
the catalogue (a restarted executor with a stable id keeps its key file, so it comes
back with the same key; one without a configured id comes back under a new random
id). Another key announcing a held id is an impostor: dropped, counted, logged once
and listed in `impostors`, never routed to. A key that moves to a new id gives up
its old one. With a keyring (`trust`, protocol/trust.py), messages from keys it does
not trust are dropped before they can hold anything.

Caps, so that strangers cannot fill a client's memory or keep dead entries alive:
at most `max_entries` executors (one entry per key, so one per key), announcements
of at most `max_message_bytes` and `max_models` offers, and a heartbeat period
clamped to [`min_heartbeat_s`, `max_heartbeat_s`] whatever the announcer claims: an
entry expires `missed_heartbeats` clamped periods after its last message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from protocol import subjects as subj
from protocol.announcements import HDR_SIGNATURE, Announcement, Heartbeat, Load, ModelOffer, Rejected, open_signed
from protocol.trust import OPEN, Trust

# Defaults of the caps (see the module docstring); each is a constructor argument.
# Five times the largest network measured (scripts/bench_discovery.py simulates 1,000 executors).
MAX_ENTRIES = 5000
MAX_MODELS = 256
MAX_MESSAGE_BYTES = 64 * 1024
MIN_HEARTBEAT_S = 0.1
MAX_HEARTBEAT_S = 10.0
# Ids remembered per live entry allowed: bindings of executors gone for good are forgotten beyond this.
BINDINGS_PER_ENTRY = 4
# What `impostors` remembers, so that a flood of keys cannot fill it: ids, and keys per id.
MAX_IMPOSTOR_IDS = 1024
MAX_IMPOSTOR_KEYS = 16

_log = logging.getLogger("protocol.catalog")


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

    @property
    def curve_key(self) -> str | None:
        """Its public curve key (`X...`) if it takes sealed jobs (protocol/sealing.py)."""
        return self.announcement.curve_key


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
        trust: Trust = OPEN,
        max_entries: int = MAX_ENTRIES,
        max_models: int = MAX_MODELS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        min_heartbeat_s: float = MIN_HEARTBEAT_S,
        max_heartbeat_s: float = MAX_HEARTBEAT_S,
    ) -> None:
        self._nc = nc
        self.idle_gap = idle_gap
        self.query_timeout = query_timeout
        self.missed_heartbeats = missed_heartbeats
        # Messages sent longer ago than this are stale (peers' clocks are assumed NTP-close).
        self.max_age_s = max_age_s
        self._wall_clock = wall_clock
        self.trust = trust
        self.max_entries = max_entries
        self.max_models = max_models
        self.max_message_bytes = max_message_bytes
        self.min_heartbeat_s = min_heartbeat_s
        self.max_heartbeat_s = max_heartbeat_s
        self._entries: dict[str, ExecutorEntry] = {}  # by key
        # executor id -> the key that holds it, oldest first; kept after the entry is gone.
        self._holder: OrderedDict[str, str] = OrderedDict()
        self._id_of: dict[str, str] = {}  # key -> the id it holds
        # Executor ids another key tried to take: id -> those keys.
        self.impostors: dict[str, set[str]] = {}
        # (epoch, seq, when accepted) of the last message accepted from each key. Kept
        # while a replay could still pass the staleness check, then forgotten.
        self._last: dict[str, tuple[int, int, float]] = {}
        self._fetching: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._changed = asyncio.Event()
        self.rejected: Counter[str] = Counter()

    def bound_key(self, executor_id: str) -> str | None:
        """The key that holds `executor_id` (the first that announced it), if any did."""
        return self._holder.get(executor_id)

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
        # The entry goes; the id stays bound to its key (a restart brings the same key back).
        return self._entries.pop(key, None) is not None

    def _bind(self, executor_id: str, key: str) -> None:
        old = self._id_of.get(key)
        if old == executor_id:
            return
        if old is not None:
            del self._holder[old]  # a key holds one id: the one it announces now
        self._holder[executor_id] = key
        self._id_of[key] = executor_id
        # Bounded: forget the oldest bindings of keys with no live entry.
        limit = BINDINGS_PER_ENTRY * self.max_entries
        if len(self._holder) > limit:
            for held, holder in list(self._holder.items()):
                if len(self._holder) <= limit:
                    break
                if holder not in self._entries:
                    del self._holder[held]
                    del self._id_of[holder]

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
            if len(msg.data) > self.max_message_bytes:
                raise Rejected("oversized", f"{len(msg.data)} bytes")
            message = open_signed(msg.data, (msg.headers or {}).get(HDR_SIGNATURE))
            self._check_allowed(message)
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
        period = min(max(message.heartbeat_ms / 1000, self.min_heartbeat_s), self.max_heartbeat_s)
        expires = now + self.missed_heartbeats * period
        entry = self._entries.get(message.key)
        if isinstance(message, Announcement):
            if message.state == "down":
                if self._remove(message.key):
                    self._changed.set()
                return
            self._entries[message.key] = ExecutorEntry(message, expires)
            self._bind(message.executor_id, message.key)
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

    def _check_allowed(self, message: Announcement | Heartbeat) -> None:
        """Trust, size and room: what a stranger with a valid signature may still not do."""
        entry = self._entries.get(message.key)
        if isinstance(message, Announcement):
            if not self.trust.trusts(message.key, message.endorsement):
                raise Rejected("untrusted", f"key {message.key} is not trusted")
            if len(message.models) > self.max_models:
                raise Rejected("oversized", f"{len(message.models)} models")
            if entry is None and message.state == "up" and len(self._entries) >= self.max_entries:
                self.entries()  # make room by dropping the silent first
                if len(self._entries) >= self.max_entries:
                    raise Rejected("full", f"already {len(self._entries)} executors")
        elif entry is None:  # a heartbeat from a key we hold nothing for: it leads to a fetch
            # Only announcements carry endorsements: with operator keys trusted, the fetch decides.
            t = self.trust
            if t.closed and not t.operator_keys and message.key not in t.executor_keys:
                raise Rejected("untrusted", f"key {message.key} is not trusted")
            if len(self._entries) + len(self._fetching) >= self.max_entries:
                raise Rejected("full", "no room to ask an unknown executor for its announcement")

    def _check_fresh(self, message: Announcement | Heartbeat) -> None:
        last = self._last.get(message.key)
        if last is not None and (message.epoch, message.seq) <= last[:2]:
            raise Rejected("replayed", "not newer than the last message of this key")
        age = self._wall_clock() - message.sent_at_ms / 1000
        if age > self.max_age_s:
            raise Rejected("stale", f"sent {age:.0f}s ago")
        holder = self._holder.get(message.executor_id)
        if holder is not None and holder != message.key:
            keys = self.impostors.get(message.executor_id)
            if keys is None and len(self.impostors) < MAX_IMPOSTOR_IDS:
                keys = self.impostors[message.executor_id] = set()
            if keys is not None and message.key not in keys and len(keys) < MAX_IMPOSTOR_KEYS:
                keys.add(message.key)
                _log.warning("executor id %s is held by key %s; ignoring key %s, which claims it too",
                             message.executor_id, holder, message.key)  # fmt: skip
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
