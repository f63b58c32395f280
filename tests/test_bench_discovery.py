"""The discovery benchmark keeps working: its smoke mode against real processes writes a complete report.

No timing assertions: only that every section is there and every figure is a positive number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.processes import run_script

SCRIPT_TIMEOUT_S = 120  # smoke mode takes seconds; this turns a hang into a failure with the script's stderr


@pytest.mark.slow  # about 15 s: nats-server, a backend, two executor processes, a simulator and a client process
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)  # the script's own bound fails first, with its stderr
def test_smoke_run_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "discovery.md"
    proc = run_script("bench_discovery.py", "--smoke", "--quiet", "--out", str(out), timeout=SCRIPT_TIMEOUT_S)
    res = json.loads(out.with_suffix(".json").read_text())

    ip = res["inprocess"]
    assert ip["failures"] == 0
    for key in ("from_announcer_start", "from_node_start", "goodbye"):
        assert ip[key]["n"] == res["params"]["visible_n"] and 0 < ip[key]["p50_ms"] <= ip[key]["max_ms"], key
    pr = res["processes"]
    assert pr["not_removed"] == 0
    assert [r["how"] for r in pr["runs"]] == ["kill", "term"]
    for key in ("spawn_to_visible", "log_to_visible", "kill_observed", "kill_expiry", "term"):
        assert pr[key] is not None and pr[key]["p50_ms"] > 0, key
    assert all(q["entries"] == 1 for q in res["query_one"])
    assert all(q["entries"] == 0 for q in res["query_empty"])

    sim = res["simulated"]
    assert sim["n"] == 20
    tr = sim["traffic"]
    assert tr["msgs_per_s"] > 0 and tr["wire_bytes_per_s"] > 0 and tr["per_executor_per_s"] > 0
    for kind in ("announce", "heartbeat"):
        assert tr["sizes"][kind]["payload"] > 0 and tr["sizes"][kind]["headers"] > 0
    cl = sim["client"]
    assert cl["window"]["msgs"] > 0 and cl["window"]["max_entries"] == 20
    assert all(q["entries"] == 20 for q in cl["patient"])
    assert cl["rss_after_mb"] > 0 and cl["heap_kib"] > 0

    text = out.read_text()
    for heading in ("## Goals", "## Machine and conditions", "## Method", "## 1. Time until a new executor is visible",
                    "## 2. Time until a dead or stopped executor is dropped", "## 3. 20 simulated executors",
                    "## Findings", "## Why a query subject rather than a JetStream KV bucket"):  # fmt: skip
        assert heading in text, heading
    assert proc.stdout.count("PASS") + proc.stdout.count("MISS") == 2
