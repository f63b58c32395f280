"""`StatusFeed`: the latest status snapshot of one application, and its watchers.

One task (started by the first watcher or snapshot request, stopped by `close()` when
the application shuts down) follows the catalogue: it wakes on each catalogue change, and
at least every `poll_s` (an executor that goes silent expires without a change event),
builds a snapshot, and when its bytes differ from the last one wakes every watcher.
Each watcher reads the newest snapshot when it gets to it: a slow browser skips
snapshots instead of queueing them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from executor.gateway.status_page.snapshot import build
from protocol.client import LloomClient

_encode = msgspec.json.encode
_log = logging.getLogger("executor.gateway.status_page")
# An SSE comment this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


class StatusFeed:
    def __init__(self, client: LloomClient, *, poll_s: float = 1.0) -> None:
        self.client = client
        self.poll_s = poll_s
        self._data = b""
        self._version = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def _refresh(self) -> None:
        data = _encode(build(await self.client.catalog()))
        if data != self._data:
            async with self._changed:
                self._data = data
                self._version += 1
                self._changed.notify_all()

    async def _follow(self) -> None:
        catalog = await self.client.catalog()
        while True:
            await catalog.wait_changed(timeout=self.poll_s)
            try:
                await self._refresh()
            except Exception:  # a bad snapshot must not end the page's updates: log it, try on the next change
                _log.exception("status page: cannot build a snapshot of the catalogue")

    async def _start(self) -> None:
        if self._task is None and not self._closed:
            await self._refresh()
            self._task = asyncio.create_task(self._follow(), name="status-feed")

    async def current(self) -> bytes:
        await self._start()
        if self._task is None:  # closed
            await self._refresh()
        return self._data

    async def watch(self) -> AsyncIterator[bytes]:
        """SSE frames: the current snapshot, then each newer one, keepalive comments between; ends at close."""
        await self._start()
        seen = -1
        while not self._closed:
            async with self._changed:
                if self._version == seen:
                    try:
                        await asyncio.wait_for(self._changed.wait(), KEEPALIVE_S)
                    except TimeoutError:
                        pass
                if self._closed:
                    return
                if self._version == seen:
                    frame = b": keepalive\n\n"
                else:
                    seen = self._version
                    frame = b"event: snapshot\ndata: " + self._data + b"\n\n"
            yield frame

    async def close(self) -> None:
        """Stop following the catalogue and end every watcher's stream (idempotent)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with self._changed:
            self._changed.notify_all()


FEED_KEY: web.AppKey[StatusFeed] = web.AppKey("lloom_status_feed", StatusFeed)
