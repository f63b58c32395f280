"""The real-model benchmark keeps working: its smoke mode (c = 1 and 2, a few short requests) reports every row.

The `real_inference` tier: it needs `lloom-executor setup-local` and skips without it,
naming the command, except in CI (`CI=true`), where that is a failure. No timing
assertions: only that every concurrency has a row whose figures are real measurements
(tokens counted from the server's usage, positive times) and a verdict on each goal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from executor.backends.local import check_local
from executor.config import ConfigError, LlmClientConfig
from tests.helpers.processes import run_script

SCRIPT_TIMEOUT_S = 90  # smoke mode takes a few seconds; this turns a hang into a failure with the script's stderr

pytestmark = [pytest.mark.real_inference, pytest.mark.slow, pytest.mark.timeout(SCRIPT_TIMEOUT_S + 30)]


@pytest.fixture
def local_setup() -> None:
    try:
        check_local(LlmClientConfig(backend="local"))
    except ConfigError as e:
        reason = f"real-inference tier needs the local backend: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def test_smoke_run_reports_a_row_per_concurrency_with_a_verdict_on_each_goal(local_setup: None, tmp_path: Path) -> None:
    out = tmp_path / "local.json"

    proc = run_script("bench_local_model.py", "--smoke", "--quiet", "--json", str(out), timeout=SCRIPT_TIMEOUT_S)

    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["c"] for r in rows] == [1, 2]
    for r in rows:
        # Both paths ran every request and counted the server's completion tokens (max_tokens 8 each at most).
        assert r["requests"] == r["c"] * res["params"]["per_worker"] * res["params"]["rounds"], r
        for path in ("direct", "executor"):
            assert 0 < r[f"tokens_{path}"] <= r["requests"] * res["params"]["max_tokens"], (path, r)
            assert r[f"tps_{path}"] > 0 and 0 < r[f"ttft_p50_{path}"] <= r[f"lat_p50_{path}"], (path, r)
        assert r["ratio"] == pytest.approx(r["tps_executor"] / r["tps_direct"])
    assert res["executor_cpu_ms_per_request"] is not None
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in table] == ["1", "2"]
    assert all(line.count("PASS") + line.count("MISS") == 2 for line in table)
    assert proc.stdout.count("- c=") == 2
