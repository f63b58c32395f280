"""What every benchmark script's harness needs: progress lines, the two-core plan, the benchmark backend."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from benchkit.procs import Procs

ROOT = Path(__file__).resolve().parent.parent.parent


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)


def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """(the process under test alone, everything else): one core each, or (None, None) on one core."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


async def start_fast_backend(procs: Procs, cpus: set[int] | None = None, *args: str) -> tuple[str, int]:
    """scripts/fast_openai_server.py (extra `args` on its command line): its /v1 URL and pid."""
    argv = [sys.executable, str(ROOT / "scripts" / "fast_openai_server.py"), "--port", "0", *args]
    for c in sorted(cpus or []):
        argv += ["--cpu", str(c)]
    proc = procs.start("backend", argv, stdout_pipe=True)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
    if not line.startswith(b"READY "):
        raise RuntimeError(f"backend did not start: {line!r}\n{procs.log_tail('backend')}")
    return f"http://127.0.0.1:{int(line.split()[1])}/v1", proc.pid
