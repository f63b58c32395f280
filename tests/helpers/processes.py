"""The `lloom-executor` and `lloom` console scripts (and our scripts/) run as subprocesses, as a user runs them.

`Executor` follows a running `lloom-executor` through its JSON log lines on
stderr (it logs JSON when stderr is not a terminal), so readiness and shutdown
are read, never guessed; `run` runs a command to completion within a bound,
`run_script` a script of scripts/ (the benchmarks). The fixtures that start
and clean up executor processes are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.wait import WAIT_S

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXECUTOR = str(BIN / "lloom-executor")
# What an executor logs when it joins the embedded server another executor of this machine runs.
JOINED = "joined the embedded NATS server of another executor on this machine"
LLOOM = str(BIN / "lloom")


def clean_env(home: Path) -> dict[str, str]:
    """A subprocess environment with no user config and no inherited Lloom settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLOOM_")}
    clean.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "xdg"))
    return clean


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run(*argv: str, env: dict[str, str], timeout: float = WAIT_S) -> Result:
    """Run a command to completion (killed if it outlives `timeout`)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `scripts/<script> ARGS...` with this interpreter from the repository root.

    Fails the test, with the end of the script's stderr, if it exits non-zero or outlives `timeout`."""
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"scripts/{script} still running after {timeout}s; stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(p) for p in task.read_text().split()]
        except OSError:
            pass  # the thread (or the process) is gone
    return kids


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class Executor:
    """A running `lloom-executor`; its stderr log lines are collected as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.events: list[dict[str, object]] = []
        self.stdout = bytearray()
        self.descendants: set[int] = set()
        self._eof = False
        self._changed = asyncio.Condition()
        self._readers = [asyncio.create_task(self._read_stderr()), asyncio.create_task(self._read_stdout())]

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.events.append(event)
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.stdout += chunk

    def logged(self, event: str) -> dict[str, object] | None:
        return next((e for e in self.events if e.get("event") == event), None)

    async def wait_for(self, event: str, timeout: float = WAIT_S) -> dict[str, object]:
        """The first log line with this `event`; fails if the process ends or the time runs out first."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.logged(event) is not None or self._eof)
        except TimeoutError:
            pytest.fail(f"no {event!r} log line within {timeout}s; stderr so far:\n{self.stderr}")
        found = self.logged(event)
        if found is None:
            pytest.fail(f"executor ended without logging {event!r}; stderr:\n{self.stderr}")
        return found

    async def started(self) -> str:
        """Wait until the node serves jobs; return the NATS URL it serves on when it started one."""
        await self.wait_for("executor node started")
        self.descendants.update(children(self.proc.pid))
        embedded = self.logged("embedded NATS server listening") or self.logged(JOINED)
        return str(embedded["url"]) if embedded else ""

    async def exit_code(self, timeout: float = WAIT_S) -> int:
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            pytest.fail(f"executor still running {timeout}s later; stderr:\n{self.stderr}")
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines[-30:])

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.descendants.update(children(self.proc.pid))
            self.proc.kill()
            await self.proc.wait()
        for pid in self.descendants:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


StartExecutor = Callable[..., Awaitable[Executor]]
