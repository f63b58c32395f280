"""The benchmark harness keeps working: its quickest mode against real processes yields a complete report.

No timing assertions: only that every path was measured and every figure is a positive number.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers.processes import run_script

SCRIPT_TIMEOUT_S = 120  # the quick modes take seconds; this turns a hang into a failure with the script's stderr


@pytest.mark.slow  # about 15 s: it starts nats-server (JetStream), a backend and three executor processes
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)  # the script's own bound fails first, with its stderr
def test_smoke_run_reports_every_path(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    proc = run_script("bench.py", "--smoke", "--no-litellm", "--quiet", "--out", str(out), timeout=SCRIPT_TIMEOUT_S)
    res = json.loads(out.with_suffix(".json").read_text())
    paths = {"direct", "executor", "gateway"}
    assert set(res["paths"]) == paths
    for phase in ("c1", "sat", "half"):
        assert paths <= set(res[phase]), phase
        for name in paths:
            s = res[phase][name]
            assert s["n"] > 0 and s["errors"] == 0, (phase, name, s)
            assert 0 < s["p50_ms"] <= s["p99_ms"], (phase, name)
            assert s["rps"] > 0, (phase, name)
    for blk in res["stream"].values():
        for name in paths:
            assert blk["throughput"][name]["chunks_per_s"] > 0
            assert blk["ttft"][name]["ttft_p50_ms"] > 0
    for proc_name in ("executor", "gateway", "nats-server", "backend"):
        assert res["rss_idle_mb"][proc_name] > 0
    # The receipts A/B: a receipts-off executor measured alongside at saturation, returning no receipts.
    off = res["sat"]["executor-noreceipts"]
    assert off["n"] > 0 and off["errors"] == 0 and off["cpu_us"]["executor-noreceipts"] > 0
    ab = res["receipts_ab"]
    assert ab["status"] == "measured" and ab["receipts_returned_with_receipts_off"] == 0
    assert ab["receipts_sampled"] > 0 and ab["receipts_per_signature"] >= 1
    # JetStream is on: every receipt written to the (temporary) outboxes ended up in the stream, once.
    assert ab["stream"]["written"] > 0 and ab["stream"]["stored"] == ab["stream"]["written"], ab["stream"]
    assert ab["stream"]["duplicates"] == 0 and 0 < ab["stream"]["messages"] <= ab["stream"]["stored"], ab["stream"]
    # The telemetry A/B: the telemetry-on twin measured at c=1 and c=32, and its metrics counted every request.
    tel = res["telemetry_ab"]
    for phase in ("c1", "sat"):
        for name in ("executor", "executor-telemetry"):
            assert tel[phase][name]["n"] > 0 and tel[phase][name]["errors"] == 0, (phase, name)
    assert tel["counted"] == tel["completed_on"] > 0
    assert [r["executors"] for r in res["scaling"]] == [1, 2]
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in res["scaling"])
    text = out.read_text()
    for heading in ("## Goals for the executor path", "## Latency at concurrency 1", "## Saturation", "## Streaming",
                    "## Memory", "## Scaling", "## Receipts", "## Telemetry"):  # fmt: skip
        assert heading in text
    # Every goal line is judged (LiteLLM's are n/a without it).
    assert "PASS" in proc.stdout or "MISS" in proc.stdout


@pytest.mark.slow  # about 6 s: nats-server, the benchmark backend and two executor processes
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
def test_batching_benchmark_quick_run_reports_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    proc = run_script("bench_batching.py", "--quick", "--json", str(out), timeout=SCRIPT_TIMEOUT_S)
    res = json.loads(out.read_text())
    assert set(res["concurrency"]) == {"1", "8"}
    for row in res["concurrency"].values():
        for path in ("batched", "unbatched"):
            assert row[path]["jobs"] > 0 and 0 < row[path]["p50_ms"] <= row[path]["p99_ms"], (path, row)
            assert row[path]["jobs_per_call"] >= 1
        assert row["ratio"]["throughput"] > 0
    assert "| concurrency |" in proc.stdout


@pytest.mark.slow  # about 5 s: nats-server with JetStream, the benchmark backend, one executor
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
def test_queue_benchmark_quick_run_reports_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "queue.json"
    run_script("bench_queue.py", "--quick", "--json", str(out), timeout=SCRIPT_TIMEOUT_S)
    res = json.loads(out.read_text())
    for row in res["concurrency"].values():
        for path in ("complete", "submit+result"):
            assert row[path]["jobs"] > 0 and 0 < row[path]["p50_ms"] <= row[path]["p99_ms"], (path, row)


@pytest.mark.slow  # a few seconds: nats-server, the benchmark backend, one executor
def test_verification_benchmark_smoke_run_reports_its_figures() -> None:
    proc = run_script("bench_verify.py", "--smoke", timeout=SCRIPT_TIMEOUT_S)
    figures = dict(re.findall(r"^\| (.+?) \| ([0-9.]+)", proc.stdout, re.M))
    assert 0 < float(figures["verification, batch root already checked"]) < float(
        figures["verification, new batch root (one Ed25519 check)"]
    )
    assert float(figures["client CPU per request, verification on"]) > 0
    assert float(figures["ratio on / off"]) > 0


@pytest.mark.slow  # a few seconds: nats-server, the benchmark backend, one executor
def test_sealed_jobs_benchmark_smoke_run_reports_both_sides() -> None:
    proc = run_script("bench_sealed.py", "--smoke", timeout=SCRIPT_TIMEOUT_S)
    figures = dict(re.findall(r"^\| (.+?) \| ([0-9.]+)", proc.stdout, re.M))
    assert float(figures["sealing work, client (key pair, seal request, open reply)"]) > 0
    assert float(figures["sealing work, executor (box from client key, open request, seal reply)"]) > 0
    for mode in ("unsealed", "sealed"):
        assert float(figures[f"client CPU per request, {mode}"]) > 0
        assert f"executor CPU per request, {mode}" in figures  # 10 ms /proc ticks: may read 0 in a smoke run


@pytest.mark.slow  # about 20 s: nats-server, the benchmark backend, a receipts-on and a receipts-off executor
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
def test_executor_benchmark_reports_both_executors_and_the_receipt_cost() -> None:
    proc = run_script("bench_executor.py", "--rounds", "1", "--seconds", "0.3", "--stream", "8", "--quiet",
                      timeout=SCRIPT_TIMEOUT_S)  # fmt: skip
    cells: dict[str, list[str]] = {}
    for name, rest in re.findall(r"^\| (cand-on|cand-off|direct) \|(.*)\|$", proc.stdout, re.M):
        cells.setdefault(name, [c.strip() for c in rest.split("|")])  # the first table; the streams' comes later
    assert set(cells) == {"direct", "cand-on", "cand-off"}
    for name in ("cand-on", "cand-off"):
        p50, p99 = float(cells[name][0]), float(cells[name][1])
        assert 0 < p50 <= p99, cells[name]
        assert float(cells[name][7].replace(",", "")) > 0  # requests/s at c=32
    streams = {name: (float(ttft), int(rate.replace(",", ""))) for name, ttft, rate
               in re.findall(r"^\| (cand-on|cand-off) \| ([0-9.]+) \| ([0-9,]+) \| [0-9.]+ \|$", proc.stdout, re.M)}
    assert set(streams) == {"cand-on", "cand-off"}  # the streams' table
    assert all(ttft > 0 and rate > 0 for ttft, rate in streams.values()), streams
    assert re.search(r"^cand: receipt cost at c=32 -?[0-9.]+ µs", proc.stdout, re.M)
