"""Child processes of the benchmark and what the OS says about them (CPU time, RSS).

Every child is started through `Procs`, which remembers it and stops it (SIGTERM,
then SIGKILL) on exit, on error and on Ctrl-C. Children also get
PR_SET_PDEATHSIG, so a SIGKILLed harness leaves no orphan behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin `pid` and its threads (nats-server and uvicorn run several) to `cpus`."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    cpus = cpus & os.sched_getaffinity(0) or cpus
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out += [int(c) for c in text.split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (LiteLLM's CLI may fork its server)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """utime+stime of `pid` (and its live descendants) from /proc, in seconds."""
    total = 0
    for p in tree(pid) if with_children else [pid]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return total / CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of `pid` and its descendants, in MiB."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Procs:
    """The children this run started; `stop_all()` ends them in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], *, cpus: set[int] | None = None, env: dict[str, str] | None = None,
        stdout_pipe: bool = False, cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )
        self.started.append((name, proc))
        pin(proc.pid, cpus)
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started = [(n, p) for n, p in self.started if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.started):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started.clear()


def run_all_stopped(main: Coroutine[Any, Any, T], procs: Procs, *, uvloop_loop: bool = False) -> T:
    """Run a benchmark's `main`; whatever happens, stop every process it started.

    Ctrl-C ends with exit status 130; a failure shows each process's log tail first.
    """
    try:
        uvloop = None
        if uvloop_loop:
            try:
                import uvloop
            except ImportError:
                pass
        # An ImportError raised inside `main` must not be taken for a missing uvloop.
        return uvloop.run(main) if uvloop is not None else asyncio.run(main)
    except KeyboardInterrupt:
        print("interrupted; stopping every process this run started", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception:
        for name, _ in procs.started:
            tail = procs.log_tail(name)
            if tail:
                print(f"--- {name} log tail ---\n{tail}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()


def run_in_tempdir(prefix: str, main: Callable[[Procs, Path], Coroutine[Any, Any, T]]) -> T:
    """`main(procs, tmp)` on uvloop in a fresh temporary directory; its processes always stopped."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp_s:
        procs = Procs(Path(tmp_s))
        return run_all_stopped(main(procs, Path(tmp_s)), procs, uvloop_loop=True)


def run_ab_benchmark(
    amain: Callable[[argparse.Namespace, Procs, Path], Coroutine[Any, Any, Any]],
    description: str,
    prefix: str,
    argv: list[str] | None,
) -> int:
    """The command line of an A/B client benchmark (bench_verify.py, bench_sealed.py): `--smoke`
    for a few requests, else 8 rounds of 300; processes and files live in a temporary directory."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true", help="a few requests only")
    args = ap.parse_args(argv)
    args.rounds, args.batch, args.micro_n = (2, 20, 200) if args.smoke else (8, 300, 5000)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        (Path(tmp) / "logs").mkdir()
        procs = Procs(Path(tmp) / "logs")
        run_all_stopped(amain(args, procs, Path(tmp)), procs)
    return 0


def run_in_temp_dir(prefix: str, main: Callable[[Procs, Path], Coroutine[Any, Any, T]]) -> T:
    """`main(procs, tmp)` on uvloop in a fresh temp dir (`prefix`...), every process it starts stopped at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp_s:
        tmp = Path(tmp_s)
        procs = Procs(tmp)
        return run_all_stopped(main(procs, tmp), procs, uvloop_loop=True)
