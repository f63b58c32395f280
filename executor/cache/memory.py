"""The response cache: identical cacheable requests answered without the backend.

A request is cacheable when it asks for deterministic output (temperature 0) or
opts in with `cache: true`; `cache: false` opts out. Its key is the SHA-256 of
the normalized request's canonical JSON (sorted keys; `stream` and `cache`
left out, so a streamed request can be answered from a unary one's result and
the other way round: a hit is replayed as a stream). Entries are kept in LRU
order within `max_entries`, `max_bytes` of text and `ttl_s` of age; every hit
is marked `cached` in the response and in its receipt.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from executor.backends.base import Completion
from protocol.messages import ChatRequest


def cacheable(request: ChatRequest) -> bool:
    if request.cache is not None:
        return request.cache
    return request.temperature == 0


def cache_key(request: ChatRequest) -> bytes:
    normalized = msgspec.structs.replace(request, stream=False, cache=None)
    return hashlib.sha256(msgspec.json.encode(normalized, order="sorted")).digest()


class ResponseCache:
    def __init__(
        self,
        *,
        max_entries: int = 1000,
        max_bytes: int = 64 << 20,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Completion]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Completion | None:
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry[0] > self.ttl_s:
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: bytes, completion: Completion) -> None:
        size = len(completion.content.encode())
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock(), completion)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        _, completion = self._entries.pop(key)
        self._bytes -= len(completion.content.encode())
