"""A child process tied to this one: how our servers and helpers are spawned, watched and stopped.

`spawn_tied` starts a child that dies with this process (PR_SET_PDEATHSIG on
Linux) and runs in its own session; `terminate` stops one (SIGTERM, then SIGKILL
after a timeout). `ChildProcess` adds what a long-lived server child needs: its
stderr drained into a bounded `log_tail` (optionally watching for a readiness
line), `pid`, `returncode`, `wait()`, an idempotent `stop()` and `kill()`. The
embedded nats-server, the local llama-server and `compose/cluster.py` use it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from asyncio.subprocess import DEVNULL, PIPE, Process
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _tie_to_parent(parent: int, death_signal: int) -> None:
    """In the child, before exec: die with the parent, even if the parent is SIGKILLed.

    PR_SET_PDEATHSIG is what leaves no orphan server behind a crashed or SIGKILLed node.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


async def spawn_tied(
    *argv: str,
    death_signal: int = signal.SIGTERM,
    stdout: int = DEVNULL,
    stderr: int | IO[bytes] = PIPE,
    cwd: Path | None = None,
    pass_fds: tuple[int, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Process:
    """A child that gets `death_signal` when we die, in its own session; stdin is /dev/null.

    `pass_fds` are inherited by the child (e.g. a lock that must live as long as it does).
    """
    parent = os.getpid()
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=lambda: _tie_to_parent(parent, death_signal),
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the child
        # in order (a node drains through its nats-server before stopping it).
        start_new_session=True,
        pass_fds=pass_fds,
    )


async def terminate(proc: Process | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; no-op if already gone."""
    if proc is not None and proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


class ChildProcess:
    """One tied child whose stderr is drained into `log_tail`; create with `await ChildProcess.spawn(...)`."""

    def __init__(
        self, proc: Process, *, name: str, ready_line: bytes | None, log_tail: list[str],
        on_line: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self._proc = proc
        self._on_line = on_line  # sees every stderr line (e.g. the embedded server's leaf link events)
        self._ready_line = ready_line
        self._ready = False
        self._settled = asyncio.Event()  # the readiness line appeared, or stderr closed
        self.log_tail = log_tail
        self._drain: asyncio.Task[None] | None = asyncio.create_task(self._drain_log(), name=f"{name}-log")

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        *,
        name: str,
        death_signal: int = signal.SIGTERM,
        ready_line: bytes | None = None,
        log_tail: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> ChildProcess:
        """Start `argv` tied to us; `log_tail` is the list to keep the last 50 stderr lines in."""
        proc = await spawn_tied(*argv, death_signal=death_signal, pass_fds=pass_fds, env=env)
        return cls(proc, name=name, ready_line=ready_line, log_tail=[] if log_tail is None else log_tail,
                   on_line=on_line)  # fmt: skip

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs."""
        return self._proc.returncode

    async def wait_ready(self) -> bool:
        """True once `ready_line` appears on stderr; False if stderr closes first (the child exited)."""
        await self._settled.wait()
        return self._ready

    async def wait(self) -> int:
        return await self._proc.wait()

    async def _drain_log(self) -> None:
        # Keep reading so the child never blocks on a full pipe; keep a short tail for errors.
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.log_tail.append(text)
            del self.log_tail[:-50]
            if self._on_line is not None:
                self._on_line(text)
            if self._ready_line is not None and not self._ready and self._ready_line in line:
                self._ready = True
                self._settled.set()
        self._settled.set()

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; then stop draining. Idempotent."""
        await terminate(self._proc, timeout)
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    def kill(self) -> None:
        """SIGKILL it now (for fault tests); `stop()` still cleans up."""
        if self._proc.returncode is None:
            os.kill(self._proc.pid, signal.SIGKILL)
