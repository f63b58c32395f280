"""The garbage collector, set for a long-lived server (lloom-executor, lloom-gateway).

The startup heap is frozen and young collections are spaced out.

CPython's cyclic collector walks every tracked object of the generations it collects. A node
imports tens of thousands of objects (modules, classes, msgspec types, tables) that live as long
as the process; left in the old generation, every full collection walks all of them again, which
at thousands of jobs a second was several per cent of the node's CPU and a multi-millisecond
pause in the tail. `gc.freeze()` moves what exists once the node is ready into a permanent
generation the collector never walks. A larger first threshold makes young collections rarer,
so each job's short-lived objects are mostly freed by reference counting before the collector
ever looks at them.
"""

from __future__ import annotations

import gc
import os

# Allocations (net) between young collections; CPython's default is 700.
YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once the node is ready: collect what startup left, freeze the rest, space young collections out.

    Only for a process that is the node or the gateway (their CLIs call it): the collector's settings
    are the process's, never a library caller's.
    """
    if os.environ.get("LLOOM_GC_DEFAULT"):  # the interpreter's defaults, for an A/B (scripts/bench_executor.py)
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
