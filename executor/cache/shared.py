"""The response cache's second level, shared by executors: the NATS key-value bucket `LLOOM_CACHE`.

With `[cache] shared = true`, a local miss asks the bucket before the backend,
and every answer a node caches is also put there (in the background: storing
never delays a reply), so an answer computed by one executor serves identical
requests sent to any other. Keys are the local cache's keys (SHA-256 of the
normalized request, hex); values are the normalized `Completion`; the bucket's
TTL is `[cache] ttl_secs`. Share it only among executors that serve a model
name from the same source: the bucket trusts whoever can write to it.

A cache must never fail a job: a bucket that is away or holds something
unreadable is a miss.
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from executor.backends.base import Completion
from protocol.jetstream import ensure_bucket
from protocol.status import SharedCacheStatus

log = structlog.get_logger(logger_name=__name__)

BUCKET = "LLOOM_CACHE"
_decode = msgspec.json.Decoder(Completion).decode
_encode = msgspec.json.Encoder().encode


class SharedCache:
    def __init__(self, kv: KeyValue, *, max_value_bytes: int = 1 << 20, lookup_timeout_s: float = 0.5) -> None:
        self._kv = kv
        self.max_value_bytes = max_value_bytes
        self.lookup_timeout_s = lookup_timeout_s
        self._writes: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0
        self.errors = 0

    @classmethod
    async def open(cls, js: JetStreamContext, *, ttl_s: float, max_bytes: int) -> SharedCache:
        return cls(await ensure_bucket(js, KeyValueConfig(
            bucket=BUCKET, ttl=ttl_s, history=1, storage=StorageType.FILE, max_bytes=max_bytes)))  # fmt: skip

    def status(self) -> SharedCacheStatus:
        return SharedCacheStatus(hits=self.hits, misses=self.misses, errors=self.errors)

    async def get(self, key: bytes) -> Completion | None:
        try:
            entry = await asyncio.wait_for(self._kv.get(key.hex()), self.lookup_timeout_s)
            hit = _decode(entry.value or b"")
        except nats.js.errors.KeyNotFoundError:
            self.misses += 1
            return None
        except (nats.errors.Error, OSError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as e:
            self.errors += 1
            log.debug("shared cache lookup failed; a miss", error=str(e) or type(e).__name__)
            return None
        self.hits += 1
        return hit

    def put(self, key: bytes, completion: Completion) -> None:
        value = _encode(completion)
        if len(value) > self.max_value_bytes:
            return
        task = asyncio.get_running_loop().create_task(self._put(key.hex(), value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, value: bytes) -> None:
        try:
            await self._kv.put(key, value)
        except (nats.errors.Error, OSError) as e:
            self.errors += 1
            log.debug("shared cache store failed", error=str(e) or type(e).__name__)

    async def aclose(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=2.0)
