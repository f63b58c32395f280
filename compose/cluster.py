"""A real multi-node Lloom deployment on one machine, without Docker: `python compose/cluster.py --double`.

Owns every process it starts and the one temporary directory they share: an
N-node `nats-server` cluster on 127.0.0.1 (routes between every pair, JetStream
with its own store dir and `server_name` per node, so the nodes form one
JetStream meta group), the `LLOOM_RECEIPTS` stream and the durable job queue
(`LLOOM_JOBS`, `LLOOM_RESULTS`) replicated on up to three of them, M `lloom-executor` processes each joined to a different node with its own
config, outbox and identity key, and, with `--double`, the repo's OpenAI test
double as their backend. Every child is tied to this process with
PR_SET_PDEATHSIG, so nothing outlives it; Ctrl-C or SIGTERM drains the
executors, then stops the double and the servers. Tests import `Deployment`
from here; product code never does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
from asyncio.subprocess import PIPE, Process
from pathlib import Path
from typing import IO

import nats.errors
from nats.js.api import StorageType, StreamConfig

from executor.process.child import spawn_tied, terminate
from executor.config import ReceiptsConfig
from executor.process.embedded_nats import EmbeddedNats, find_nats_server, free_port
from executor.receipts.publisher import STREAM
from protocol import subjects as subj
from protocol.connection import NatsConnectOptions, connect_nats
from protocol.durable import ensure_jobs_stream, results_bucket

REPO = Path(__file__).resolve().parent.parent
# Every node's nats-server config, the same file compose/docker-compose.yml runs (with secure.conf).
CLUSTER_CONF = REPO / "compose" / "nats" / "cluster.conf"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0  # any one start (a server, the meta group, an executor); a hang becomes an error
STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL
DEMO_MODEL = "demo-model"


def distinct_free_ports(count: int) -> list[int]:
    ports: dict[int, None] = {}
    while len(ports) < count:
        ports[free_port()] = None
    return list(ports)


class NatsCluster:
    """`size` routed `nats-server` nodes with clustered JetStream; `urls[i]` is node i+1's client URL."""

    def __init__(self, size: int, workdir: Path) -> None:
        find_nats_server()  # fail early, with the install hint, when the binary is missing
        ports = distinct_free_ports(2 * size)
        # The routes authenticate (compose/nats/cluster.conf): a fresh password per deployment.
        password = "r" + secrets.token_hex(16)  # a letter first: the server parses it as a config value
        routes = json.dumps([f"nats://route:{password}@127.0.0.1:{p}" for p in ports[size:]])
        self.nodes: list[EmbeddedNats] = []
        for i in range(size):
            store = workdir / f"nats-{i + 1}"
            # The config file compose/docker-compose.yml runs too; passed last, it is the one the
            # server reads (EmbeddedNats's own -c only sets the store, given again by -sd).
            args = ["-c", str(CLUSTER_CONF), "-sd", str(store)]
            env = {**os.environ, "LLOOM_NATS_SERVER_NAME": f"nats-{i + 1}",
                   "LLOOM_NATS_CLUSTER_PORT": str(ports[size + i]), "LLOOM_NATS_ROUTES": routes,
                   "LLOOM_NATS_ROUTE_PASSWORD": password}  # fmt: skip
            self.nodes.append(
                EmbeddedNats(port=ports[i], jetstream=True, store_dir=str(store), extra_args=args, env=env)
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.nodes))
        replicas = min(3, len(self.nodes))
        await create_receipts_stream(self.urls[0], replicas=replicas)
        await create_queue(self.urls[0], replicas=replicas)

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))


async def create_receipts_stream(url: str, *, replicas: int, options: NatsConnectOptions | None = None) -> None:
    """Create `LLOOM_RECEIPTS` with `replicas` copies, retrying until the JetStream meta group has formed.

    Placing an R3 stream needs a meta leader that knows three peers, so success is the check that
    the cluster formed. Executors use the stream as they find it (alone, they would create it R1).
    """
    config = StreamConfig(
        name=STREAM, subjects=[subj.RECEIPTS_ALL], storage=StorageType.FILE,
        num_replicas=replicas, duplicate_window=ReceiptsConfig().duplicate_window_secs,
        # A ledger, as executors make it (executor/receipts/publisher.py): no one deletes or purges receipts.
        deny_delete=True, deny_purge=True,
    )  # fmt: skip
    nc = await connect_nats(url, name="lloom-cluster", options=options)
    try:
        js = nc.jetstream(timeout=2.0)
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                try:
                    await js.add_stream(config)
                    return
                except (nats.errors.Error, TimeoutError):  # no meta leader yet: JetStream answers 503 or not at all
                    await asyncio.sleep(0.25)
    except TimeoutError:
        raise RuntimeError(f"the JetStream meta group did not form within {START_TIMEOUT_S}s") from None
    finally:
        await nc.close()


async def create_queue(url: str, *, replicas: int, options: NatsConnectOptions | None = None) -> None:
    """The durable job queue and its results bucket, replicated like the receipts (after the meta group formed)."""
    nc = await connect_nats(url, name="lloom-cluster", options=options)
    try:
        js = nc.jetstream(timeout=5.0)
        await ensure_jobs_stream(js, replicas=replicas)
        await results_bucket(js, replicas=replicas)
    finally:
        await nc.close()


class ExecutorProcess:
    """One `lloom-executor` joined to one cluster node; its JSON log goes to `<directory>/executor.log`."""

    def __init__(self, name: str, nats_url: str, directory: Path) -> None:
        self.name, self.nats_url, self.directory = name, nats_url, directory
        self.log_path = directory / "executor.log"
        self.proc: Process | None = None
        self._ready = asyncio.Event()  # the node serves jobs, or the process ended
        self._serving = False
        self._pump: asyncio.Task[None] | None = None

    async def start(self, backend_url: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "executor.toml"
        config.write_text(
            f'[llm_client]\nbackend = "openai_compatible"\nbase_url = {json.dumps(backend_url)}\n\n'
            f'[node]\nid = "{self.name}"\nidentity_file = {json.dumps(str(self.directory / "identity.nk"))}\n\n'
            f"[receipts]\noutbox_dir = {json.dumps(str(self.directory / 'outbox'))}\n\n"
            "[executors.queue]\nconsume_all = true\nack_wait_secs = 5\n"
        )
        self.proc = await spawn_tied(str(BIN / "lloom-executor"), "--config", str(config), "--nats", self.nats_url)
        self._pump = asyncio.create_task(self._copy_log(), name=f"{self.name}-log")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_TIMEOUT_S):
                await self._ready.wait()
        if not self._serving:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-10:])
            raise RuntimeError(f"{self.name} did not start (see {self.log_path}):\n{tail}")

    async def _copy_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log_path.open("ab") as log:
            while line := await self.proc.stderr.readline():
                log.write(line)
                log.flush()
                if not self._ready.is_set() and b"executor node started" in line:
                    self._serving = True
                    self._ready.set()
        self._ready.set()

    async def stop(self) -> None:
        await terminate(self.proc, STOP_TIMEOUT_S)
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)


async def start_double(log: IO[bytes]) -> tuple[Process, str]:
    """The repo's OpenAI test double as a child serving `demo-model`; returns it and its base URL."""
    argv = ["-m", "tests.doubles.openai_double", "--port", str(free_port()), "--models", DEMO_MODEL]
    proc = await spawn_tied(sys.executable, *argv, stdout=PIPE, stderr=log, cwd=REPO)
    assert proc.stdout is not None
    async with asyncio.timeout(START_TIMEOUT_S):
        base_url = (await proc.stdout.readline()).decode().strip()  # it prints its URL once listening
    if not base_url.startswith("http"):
        await terminate(proc, STOP_TIMEOUT_S)
        raise RuntimeError(f"the OpenAI double did not start; see {log.name}")
    return proc, base_url


class Deployment:
    """The whole deployment; `async with` starts it and stops every process it started.

    Without `backend_url` it starts the OpenAI double. Executor i joins NATS node i (mod N).
    """

    def __init__(
        self, *, nats_nodes: int = 3, executors: int = 2, backend_url: str | None = None, workdir: Path | None = None
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lloom-cluster-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.nats = NatsCluster(nats_nodes, self.workdir)
        self.backend_url = backend_url
        self.double: Process | None = None
        names, urls = [f"exec-{i + 1}" for i in range(executors)], self.nats.urls
        self.executors = [ExecutorProcess(n, urls[i % len(urls)], self.workdir / n) for i, n in enumerate(names)]

    async def start(self) -> None:
        await self.nats.start()
        if self.backend_url is None:
            with (self.workdir / "double.log").open("ab") as log:  # the child keeps its own copy of the fd
                self.double, self.backend_url = await start_double(log)
        await asyncio.gather(*(e.start(self.backend_url) for e in self.executors))

    async def stop(self) -> None:
        # Executors first: they leave the catalogue and drain through the still-running servers.
        await asyncio.gather(*(e.stop() for e in self.executors))
        await terminate(self.double, STOP_TIMEOUT_S)
        await self.nats.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def __aenter__(self) -> Deployment:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def describe(self) -> str:
        lloom, urls = BIN / "lloom", self.nats.urls
        model = DEMO_MODEL if self.double else "MODEL"  # a real backend's model names are its own
        lines = [f"Lloom cluster in {self.workdir}", "NATS nodes (JetStream meta group formed):"]
        lines += [f"  nats-{i + 1}  {n.url}  pid {n.pid}" for i, n in enumerate(self.nats.nodes)]
        lines += ["executors:"]
        lines += [f"  {e.name}  on {e.nats_url}  pid {e.proc and e.proc.pid}  log {e.log_path}" for e in self.executors]
        lines += [f"backend: {self.backend_url}", "", "try:"]
        lines += [f'  {lloom} --nats {urls[-1]} complete --model {model} "hi"']
        lines += [f"  {lloom} --nats {','.join(urls)} models"]
        lines += [f"  kill -9 {self.nats.nodes[0].pid}   # nats-1: exec-1 moves to another node"]
        lines += ["Ctrl-C stops everything."]
        return "\n".join(lines)


async def run(args: argparse.Namespace) -> None:
    async with Deployment(nats_nodes=args.nats_nodes, executors=args.executors, backend_url=args.backend_url) as d:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(d.describe(), flush=True)
        await stop.wait()
        print("stopping: draining executors, then the NATS nodes", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description="Run a NATS cluster and Lloom executors on 127.0.0.1 until Ctrl-C.")
    p.add_argument("--nats-nodes", type=int, default=3, choices=range(1, 10), metavar="N")
    p.add_argument("--executors", type=int, default=2, choices=range(1, 33), metavar="M")
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--backend-url", metavar="URL", help="OpenAI-compatible base URL (http://host:port/v1)")
    backend.add_argument("--double", action="store_true", help="start the repo's OpenAI test double (demo-model)")
    try:
        asyncio.run(run(p.parse_args()))
    except (RuntimeError, ConnectionError, TimeoutError) as e:  # a start failed; everything started is stopped
        sys.exit(f"cluster: {e or 'timed out starting'}")


if __name__ == "__main__":
    main()
