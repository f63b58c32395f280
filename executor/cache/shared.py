"""The response cache's second level, shared by executors: the NATS key-value bucket `LLOOM_CACHE`.

With `[cache] shared = true`, a local miss asks the bucket before the backend,
and every answer a node caches is also put there (in the background: storing
never delays a reply), so an answer computed by one executor serves identical
requests sent to any other. Keys are the local cache's keys (SHA-256 of the
normalized request, hex); the bucket's TTL is `[cache] ttl_secs`.

Anyone able to write the bucket could plant an answer that executors would then
serve (and sign receipts for) as their own. So a value is a `SignedEntry`: the
normalized `Completion`, the public key of the executor that computed it and its
Ed25519 signature over `DOMAIN || cache key || completion bytes` (the cache key is
inside the signature, so an entry cannot be moved to another request). On read,
an entry counts only when its key is in the trusted set (this executor's own key
plus `[cache] trusted_keys`) and its signature holds; anything else is a miss,
counted as `rejected`, and never served.

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
from protocol.identity import Identity, verify
from protocol.jetstream import ensure_bucket
from protocol.status import SharedCacheStatus

log = structlog.get_logger(logger_name=__name__)

BUCKET = "LLOOM_CACHE"
DOMAIN = b"lloom-cache-v1:"


class SignedEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: str  # public nkey of the executor that computed the completion
    sig: str  # its signature of DOMAIN || cache key || completion
    completion: msgspec.Raw


_decode_entry = msgspec.json.Decoder(SignedEntry).decode
_decode = msgspec.json.Decoder(Completion).decode
_encode = msgspec.json.Encoder().encode


def _signed_bytes(key: bytes, completion: bytes) -> bytes:
    return DOMAIN + key + completion


class SharedCache:
    def __init__(
        self,
        kv: KeyValue,
        identity: Identity,
        *,
        trusted_keys: frozenset[str] = frozenset(),
        max_value_bytes: int = 1 << 20,
        lookup_timeout_s: float = 0.5,
    ) -> None:
        self._kv = kv
        self._identity = identity
        # Whose entries this executor serves: its own, and those of executors its operator vouches for.
        self.trusted_keys = frozenset(trusted_keys) | {identity.public_key}
        self.max_value_bytes = max_value_bytes
        self.lookup_timeout_s = lookup_timeout_s
        self._writes: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.rejected = 0

    @classmethod
    async def open(
        cls, js: JetStreamContext, identity: Identity, *, ttl_s: float, max_bytes: int,
        trusted_keys: frozenset[str] = frozenset(),
    ) -> SharedCache:  # fmt: skip
        kv = await ensure_bucket(js, KeyValueConfig(
            bucket=BUCKET, ttl=ttl_s, history=1, storage=StorageType.FILE, max_bytes=max_bytes))  # fmt: skip
        return cls(kv, identity, trusted_keys=trusted_keys)

    def status(self) -> SharedCacheStatus:
        return SharedCacheStatus(hits=self.hits, misses=self.misses, errors=self.errors, rejected=self.rejected)

    async def get(self, key: bytes) -> Completion | None:
        try:
            entry = await asyncio.wait_for(self._kv.get(key.hex()), self.lookup_timeout_s)
        except nats.js.errors.KeyNotFoundError:
            self.misses += 1
            return None
        except (nats.errors.Error, OSError, TimeoutError) as e:
            self.errors += 1
            log.debug("shared cache lookup failed; a miss", error=str(e) or type(e).__name__)
            return None
        hit = self._open(key, entry.value or b"")
        if hit is None:
            self.rejected += 1
            return None
        self.hits += 1
        return hit

    def _open(self, key: bytes, value: bytes) -> Completion | None:
        """The completion in an entry signed by a trusted executor for this very key; else None."""
        try:
            signed = _decode_entry(value)
            completion = bytes(signed.completion)
            if signed.key in self.trusted_keys and verify(signed.key, _signed_bytes(key, completion), signed.sig):
                return _decode(completion)
            why = f"signed by {signed.key}, not trusted" if signed.key not in self.trusted_keys else "bad signature"
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            why = f"not a signed entry ({e})"
        log.warning("shared cache entry refused; a miss", cache_key=key.hex(), reason=why)
        return None

    def put(self, key: bytes, completion: Completion) -> None:
        body = _encode(completion)
        sig = self._identity.sign(_signed_bytes(key, body))
        value = _encode(SignedEntry(key=self._identity.public_key, sig=sig, completion=msgspec.Raw(body)))
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
