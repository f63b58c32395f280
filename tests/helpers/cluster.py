"""A 3-node NATS cluster for fault tests: the one `compose/cluster.py` runs, plus the faults.

`Cluster` starts `compose.cluster.NatsCluster` (routes between every pair, clustered
JetStream, the `LLOOM_RECEIPTS` stream and the job queue R3), so the cluster the
fault tests break is the cluster users run. On top it adds what a fault test does to
a node: SIGKILL it (`kill`), start it again on the same client and route ports and
the same JetStream store (`restart`), pause and resume it (`pause`/`cont`, SIGSTOP and
SIGCONT: a stand-in for a partition), and tell which node a connection is on
(`node_of`, from `nc.connected_url`). `receipts` reads the R3 receipts stream back.
Executor configs for such tests come from `executor_config` (own outbox and identity
per executor, short keepalives and liveness pings).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client as NATS

from compose.cluster import NatsCluster
from executor.process.embedded_nats import EmbeddedNats
from executor.receipts.publisher import STREAM
from protocol.receipts import SignedReceipt, receipt_lines, signed_receipt_decoder

SIZE = 3


class Cluster:
    """`SIZE` routed nats-server nodes with R3 JetStream streams; node i listens on `urls[i]` for ever."""

    def __init__(self, workdir: Path) -> None:
        self._cluster = NatsCluster(SIZE, workdir)
        self.paused: set[int] = set()

    @property
    def nodes(self) -> list[EmbeddedNats]:
        return self._cluster.nodes

    @property
    def urls(self) -> list[str]:
        return self._cluster.urls

    async def start(self) -> None:
        await self._cluster.start()

    async def stop(self) -> None:
        for i in list(self.paused):
            self.cont(i)  # a stopped process would sit out SIGTERM's whole grace period
        await self._cluster.stop()

    def node_of(self, nc: NATS) -> int:
        """Which node `nc` is connected to now (by its port; -1 while it is disconnected)."""
        url = nc.connected_url
        if url is None or not nc.is_connected:
            return -1
        ports = [n.port for n in self.nodes]
        return ports.index(url.port) if url.port in ports else -1

    async def kill(self, i: int) -> None:
        """SIGKILL node i (no goodbye to its clients or routes) and reap it; its store stays on disk."""
        node = self.nodes[i]
        self.paused.discard(i)
        node.kill()
        await node.stop()  # reaps the dead child, frees the store's lock

    async def restart(self, i: int) -> None:
        """Start node i again on its own ports and JetStream store (after `kill`)."""
        old = self.nodes[i]
        assert old.pid is None, "kill the node first"
        node = EmbeddedNats(port=old.port, jetstream=True, store_dir=old.store_dir, extra_args=old.extra_args,
                            env=old.env)  # the same config variables (compose/nats/cluster.conf reads them)
        self.nodes[i] = node
        await node.start()

    def pause(self, i: int) -> None:
        """SIGSTOP node i: its sockets stay open and nobody hears from it (a partition, seen from outside)."""
        pid = self.nodes[i].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(i)

    def cont(self, i: int) -> None:
        pid = self.nodes[i].pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        self.paused.discard(i)

    async def jetstream_ready(self, timeout: float = 30.0) -> None:
        """Return once the receipts stream has a leader and every replica is current (after a restart)."""
        async with self.admin() as nc, asyncio.timeout(timeout):
            js = nc.jetstream(timeout=2.0)
            while True:
                try:
                    info = await js.stream_info(STREAM)
                    replicas = info.cluster.replicas if info.cluster else []
                    if info.cluster and info.cluster.leader and len(replicas or []) == SIZE - 1 and all(
                        r.current for r in replicas or []
                    ):
                        return
                except (nats.errors.Error, TimeoutError):
                    pass  # no leader yet
                await asyncio.sleep(0.2)  # the meta group's pace; the timeout bounds it

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[NATS]:
        """A plain connection to whichever live node answers first."""
        live = [n.url for i, n in enumerate(self.nodes) if n.pid is not None and i not in self.paused]
        nc = await nats.connect(live, connect_timeout=2, max_reconnect_attempts=5, reconnect_time_wait=0.2)
        try:
            yield nc
        finally:
            await nc.close()

    async def receipts(self, timeout: float = 30.0) -> list[SignedReceipt]:
        """Every receipt in the R3 receipts stream (a message holds a batch of them, one per line).

        Read again while the stream has no leader (just after a node came back), within `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return await self._read_receipts()
                except (nats.errors.Error, TimeoutError):
                    await asyncio.sleep(0.2)  # a leader election's pace; the timeout bounds it

    async def _read_receipts(self) -> list[SignedReceipt]:
        async with self.admin() as nc:
            js = nc.jetstream(timeout=2.0)
            info = await js.stream_info(STREAM)
            out: list[SignedReceipt] = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(STREAM, seq)
                out += [signed_receipt_decoder.decode(line) for line in receipt_lines(msg.data)]
            return out

def executor_config(directory: Path, executor_id: str, backend_url: str, **node: object) -> Path:
    """A `lloom-executor` config of its own (outbox, identity) in `directory`; `node` adds [node] keys."""
    directory.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in node.items())
    path = directory / "executor.toml"
    path.write_text(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = {json.dumps(backend_url)}\ntimeout_secs = 60\n\n'
        f'[node]\nid = "{executor_id}"\nidentity_file = {json.dumps(str(directory / "identity.nk"))}\n{extra}\n'
        f"[receipts]\noutbox_dir = {json.dumps(str(directory / 'outbox'))}\n"
    )
    return path
