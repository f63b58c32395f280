"""The gateways' API keys in the NATS KV bucket `LLOOM_GATEWAY_KEYS`, and the one way to change one.

A key is `lloom_<id>_<secret>`: a 12-hex-digit id (not secret: it names the key in lists,
logs and reports) and 256 random bits (URL-safe base64). The bucket holds, under
`key.<id>`, a `KeyRecord`: the SHA-256 of the whole key (never the key), its name, when it
was made, whether it is revoked, its rate limit, budget, spend and open holds.

Why SHA-256 and not argon2/bcrypt: those are for passwords, which people choose and which
can be guessed, so each guess is made slow. A key is 256 random bits: nobody can guess it,
slow or fast, and a fast hash lets every request check its key in microseconds. The stored
hash is compared with `hmac.compare_digest`, so the time a comparison takes says nothing
about how much of it matched.

Every change (a hold, a settlement, a revoke) goes through `KeyStore.change`: read the entry
and its revision, compute the new record, write it only if the revision is still the last
(KV `update` with `last=`), and on a conflict read again and recompute. Two gateways settling
one key at once therefore never lose an update: one of them retries on the other's result.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated

import msgspec
import nats.errors
import nats.js.errors
from msgspec import Meta
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from protocol import subjects as subj
from protocol.backoff import Backoff, Retry
from protocol.jetstream import ensure_bucket

BUCKET = subj.GATEWAY_KEYS_BUCKET
KEY_PREFIX = "lloom_"
_KEY = re.compile(r"lloom_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[0-9a-f]{12}")
# Conflicts are retried quickly with jitter (two gateways that collided should not collide again).
CONFLICT_BACKOFF = Backoff(initial_s=0.001, max_s=0.05, jitter=0.5)
MAX_CONFLICTS = 100


class Hold(msgspec.Struct, frozen=True, kw_only=True):
    amount: Decimal  # USD
    # A hold its gateway never settled (it crashed) stops counting after this.
    expires_ms: int


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    sha256: str  # hex of SHA-256 over the whole key
    created_ms: int
    revoked_ms: int | None = None
    rpm: Annotated[int, Meta(ge=1)] | None = None  # requests per minute per gateway; None: unlimited
    budget: Decimal | None = None  # USD; None: unlimited
    spend: Decimal = Decimal(0)  # USD settled from receipts
    holds: dict[str, Hold] = {}  # hold id -> what an unfinished request has held

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None

    def held(self, now_ms: int) -> Decimal:
        return sum((h.amount for h in self.holds.values() if h.expires_ms > now_ms), Decimal(0))

    def remaining(self, now_ms: int) -> Decimal | None:
        return None if self.budget is None else self.budget - self.spend - self.held(now_ms)


_decode = msgspec.json.Decoder(KeyRecord).decode
_encode = msgspec.json.encode


class KeyStoreError(Exception):
    """The bucket could not be read or written (NATS down, permissions): the request cannot be admitted."""


class UnknownKey(KeyStoreError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(key: str) -> str | None:
    """The key's id, or None if it is not shaped like a Lloom key."""
    m = _KEY.fullmatch(key)
    return m.group(1) if m else None


def matches(record: KeyRecord, key: str) -> bool:
    return hmac.compare_digest(record.sha256.encode(), hash_key(key).encode())


def new_key() -> tuple[str, str]:
    """A fresh (id, key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def redact(key: str) -> str:
    """What may be logged of a presented key: its id (or that it was malformed), never the secret."""
    key_id = parse_key(key)
    return f"{KEY_PREFIX}{key_id}_***" if key_id else "(malformed key)"


def _kv_key(key_id: str) -> str:
    return f"key.{key_id}"


def _record(key_id: str, data: bytes) -> KeyRecord:
    try:
        return _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        # Refuse rather than guess (and never rewrite a record this gateway cannot read).
        raise KeyStoreError(f"the record of key {key_id} is unreadable: {e}") from None


class KeyStore:
    """The keys bucket over one NATS connection (shared by `Admission` and `lloom-gateway keys`)."""

    def __init__(self, nc: NATS, *, clock: Callable[[], float] = time.time) -> None:
        self.nc = nc
        self.clock = clock
        self._kv: KeyValue | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await ensure_bucket(self.nc.jetstream(), KeyValueConfig(
                    bucket=BUCKET, history=1, storage=StorageType.FILE))  # fmt: skip
            except (nats.errors.Error, nats.js.errors.Error) as e:
                raise KeyStoreError(f"cannot open the keys bucket {BUCKET}: {e}") from e
        return self._kv

    async def get(self, key_id: str) -> tuple[KeyRecord, int]:
        """The record and its revision; `UnknownKey` if there is none."""
        if not _ID.fullmatch(key_id):
            raise UnknownKey(f"no key {key_id!r} (ids are 12 hex digits)")
        kv = await self.bucket()
        try:
            entry = await kv.get(_kv_key(key_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise UnknownKey(f"no key {key_id}") from None
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise KeyStoreError(f"cannot read the keys bucket {BUCKET}: {e}") from e
        if not entry.value or entry.revision is None:
            raise UnknownKey(f"no key {key_id}")
        return _record(key_id, entry.value), entry.revision

    async def create(self, name: str, *, rpm: int | None, budget: Decimal | None) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (shown once, stored nowhere)."""
        key_id, key = new_key()
        record = KeyRecord(id=key_id, name=name, sha256=hash_key(key), created_ms=self.now_ms(), rpm=rpm,
                           budget=budget)  # fmt: skip
        kv = await self.bucket()
        try:
            await kv.create(_kv_key(key_id), _encode(record))
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise KeyStoreError(f"cannot write the keys bucket {BUCKET}: {e}") from e
        return record, key

    async def list(self) -> list[KeyRecord]:
        kv = await self.bucket()
        try:
            names = await kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise KeyStoreError(f"cannot list the keys bucket {BUCKET}: {e}") from e
        records = []
        for name in names:
            try:
                records.append((await self.get(name.removeprefix("key.")))[0])
            except UnknownKey:
                continue  # deleted meanwhile
        return sorted(records, key=lambda r: r.created_ms)

    async def change(self, key_id: str, fn: Callable[[KeyRecord], KeyRecord],
                     known: tuple[KeyRecord, int] | None = None) -> tuple[KeyRecord, int]:  # fmt: skip
        """Apply `fn` to the latest record and store it, retrying on a concurrent write; the new record and revision.

        `fn` may raise to refuse the change (nothing is written). `known` is a record and
        revision already read (saves a read when nobody wrote since)."""
        retry = Retry(CONFLICT_BACKOFF)
        record, revision = known if known is not None else await self.get(key_id)
        for _ in range(MAX_CONFLICTS):
            new = fn(record)
            kv = await self.bucket()
            try:
                return new, await kv.update(_kv_key(key_id), _encode(new), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # another gateway wrote first: recompute on its result
            except (nats.errors.Error, nats.js.errors.Error) as e:
                raise KeyStoreError(f"cannot write the keys bucket {BUCKET}: {e}") from e
            await asyncio.sleep(retry.next_delay())  # a backoff between conflicting writes
            record, revision = await self.get(key_id)
        raise KeyStoreError(f"key {key_id}: {MAX_CONFLICTS} write conflicts in a row")

    async def revoke(self, key_id: str) -> KeyRecord:
        now = self.now_ms()
        record, _ = await self.change(key_id, lambda r: r if r.revoked else msgspec.structs.replace(r, revoked_ms=now))
        return record



_ANY_KEY = re.compile(r"\blloom_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


def redact_text(text: str) -> str:
    return _ANY_KEY.sub(r"lloom_\1_***", text)


class RedactKeys(logging.Filter):
    """On a log handler: any API key in a record's message becomes `lloom_<id>_***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "lloom_" in message:
            record.msg, record.args = redact_text(message), None
        return True
