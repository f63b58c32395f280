"""The embedded NATS bus that the executors of one machine share: own it, join it, take it over.

An executor with no `[node] nats_url` uses the bus at 127.0.0.1:<embedded_nats_port>,
whose JetStream store is `<data home>/nats`. The store's lock (`StoreLock`) alone decides
who runs the server there, so two servers never share the store:

- the first executor takes the lock and starts the server: it *owns* the bus;
- a later one finds the lock held and the owner's server answering: it *joins* it as a
  client, and so adds capacity to the same network instead of starting a second one;
- a joiner tries the lock every `takeover_interval_s` (one flock call). The owner's
  nats-server inherits the lock, so it frees only once that server has exited, whether
  its executor stopped, crashed or was SIGKILLed. The one joiner that wins it starts the
  server on the same port with the same store (every stream kept), and every connection,
  which reconnects for ever to the same URL, comes back: the network survives any one
  executor stopping;
- a NATS server that holds no lock (one the user runs) is joined and never taken over; a
  port taken by something that is not NATS gets a server on a free port, with a warning.

With `leaf` (executor/process/leaf.py), a server this executor starts, or takes over, is a
leaf node of a hub; an executor that joins another's server uses that server's link (if any).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from executor.process.leaf import Leaf
from executor.process.embedded_nats import (
    EmbeddedNats,
    EmbeddedNatsError,
    StoreInUse,
    StoreLock,
    free_port,
    holder,
    holder_port,
    nats_answers,
    port_is_free,
)

log = structlog.get_logger(logger_name=__name__)
HOST = "127.0.0.1"


class SharedBus:
    """`await start()` owns or joins the bus; `url` is where to connect; `stop()` ends what it owns."""

    def __init__(
        self,
        *,
        port: int,
        store_dir: Path,
        takeover_interval_s: float = 0.5,
        start_timeout_s: float = 15.0,
        leaf: Leaf | None = None,
    ) -> None:
        self.port = port  # 0: a free port, not shared with anyone (found only through the store's lock)
        self.store_dir = store_dir
        self.takeover_interval_s = takeover_interval_s
        self.start_timeout_s = start_timeout_s
        self.leaf = leaf
        self.server: EmbeddedNats | None = None
        self.url = ""
        self._watch: asyncio.Task[None] | None = None

    @property
    def owner(self) -> bool:
        return self.server is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while True:
            lock = StoreLock.try_acquire(self.store_dir)
            if lock is not None:
                await self._own_or_join(lock)
                return
            # Another executor's server holds the store: join it where it said it listens.
            port = holder_port(self.store_dir)
            if port and await nats_answers(HOST, port):
                self._join(port, "joined the embedded NATS server of another executor on this machine")
                return
            if loop.time() > deadline:
                raise StoreInUse(
                    f"the JetStream store {self.store_dir} is in use by another nats-server"
                    f" ({holder(self.store_dir) or 'holder unknown'}) but none answers at its port within"
                    f" {self.start_timeout_s:g}s; set [node] nats_url to that server, or stop it"
                )
            await asyncio.sleep(0.1)  # its server is starting (or stopping): look again

    async def _own_or_join(self, lock: StoreLock) -> None:
        port = self.port
        if port and not port_is_free(HOST, port):
            if await nats_answers(HOST, port):
                lock.release()  # a server that holds no store lock: someone's own nats-server
                self._join(port, "joined the NATS server already listening on the embedded port")
                return
            chosen = free_port()
            log.warning(
                "embedded NATS port busy, using another", wanted=port, port=chosen,
                hint="something that is not NATS listens there; set [node] embedded_nats_port or nats_url",
            )  # fmt: skip
            port = chosen
        server = self._server(port, lock)
        await server.start()  # on failure it releases the lock
        self.server, self.url = server, server.url
        log.info("embedded NATS server listening", url=self.url, store=str(self.store_dir),
                 clients=f"lloom --nats {self.url} complete ...")  # fmt: skip

    def _server(self, port: int, lock: StoreLock) -> EmbeddedNats:
        more = self.leaf.server_options() if self.leaf is not None else {}
        return EmbeddedNats(host=HOST, port=port, jetstream=True, store_dir=str(self.store_dir), store_lock=lock,
                            **more)  # type: ignore[arg-type]  # fmt: skip

    def _join(self, port: int, event: str) -> None:
        self.url = f"nats://{HOST}:{port}"
        log.info(event, url=self.url, takeover="this executor starts the server here if its owner stops")
        if self.leaf is not None:
            log.warning("this executor's hub applies only if it takes the embedded server over; until then the"
                        " server's own hub link (if any) carries it", hub=self.leaf.link.hub)  # fmt: skip
        self._watch = asyncio.create_task(self._take_over_when_free(port), name="embedded-nats-takeover")

    async def _take_over_when_free(self, port: int) -> None:
        """Once the server we joined is gone (its lock free, its port free), start it again here."""
        while True:
            await asyncio.sleep(self.takeover_interval_s)
            lock = StoreLock.try_acquire(self.store_dir)
            if lock is None:
                continue  # its owner's server still runs (or another executor took over first)
            if not port_is_free(HOST, port):
                lock.release()  # a server without the store lock (the user's own): keep joining it
                continue
            server = self._server(port, lock)
            try:
                await server.start()
            except asyncio.CancelledError:
                await server.stop()  # stopped while starting: leave no server behind
                raise
            except EmbeddedNatsError as e:
                log.warning("could not take over the embedded NATS server; will try again", error=str(e))
                continue
            self.server = server
            log.info("took over the embedded NATS server", url=self.url, store=str(self.store_dir))
            return

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        server, self.server = self.server, None
        if server is not None:
            await server.stop()
        if self.leaf is not None:
            self.leaf.link.stop()
