"""The node process's collector settings (executor/process/heap.py), checked in a child interpreter:
they are the process's, so pytest's own must not change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import gc, json
import executor.runtime.daemon  # what a node has imported by the time it is ready
from executor.process.heap import YOUNG_THRESHOLD, settle_heap
before = gc.get_threshold()
settle_heap()
print(json.dumps({"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(), "before": before,
                  "young": YOUNG_THRESHOLD}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})  # fmt: skip
    return json.loads(out.stdout)


def test_a_ready_node_freezes_its_startup_heap_and_spaces_young_collections_out() -> None:
    got = _probe()
    assert got["frozen"] > 10_000  # the imported modules, classes and tables: never walked again
    assert got["threshold"] == [got["young"], *got["before"][1:]]


def test_the_interpreters_defaults_stay_when_asked_for_an_ab() -> None:
    got = _probe(LLOOM_GC_DEFAULT="1")
    assert got["frozen"] == 0 and got["threshold"] == got["before"]
