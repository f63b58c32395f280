"""The scale model's measuring script keeps working: its smoke mode against real nats-servers measures every
input and prints the extrapolation. No figure is judged (speed is for benchmarks): only that each was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.processes import run_script

SCRIPT_TIMEOUT_S = 120


@pytest.mark.slow  # about 10 s: a routed pair, a gatewayed pair, a fan-out server, R1 and R3 JetStream
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
def test_smoke_run_measures_every_input_and_extrapolates(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = run_script("scale_model.py", "--smoke", "--json", str(out), timeout=SCRIPT_TIMEOUT_S)
    m = json.loads(out.read_text())
    subs = m["subs"]
    assert subs["subscriptions_seen_by_peer"] >= 1_000  # the route peer learned every subscription
    assert subs["route_all_known_s"] > 0 and subs["gateway_all_known_s"] > 0
    assert set(m["sizes"]) == {"announcement_1_models", "announcement_10_models", "announcement_100_models", "heartbeat"}
    sizes = [m["sizes"][f"announcement_{k}_models"]["payload"] for k in (1, 10, 100)]
    assert sizes == sorted(sizes) and m["sizes"]["heartbeat"]["payload"] < sizes[0]
    assert [f["fanout"] for f in m["fanout"]] == [1, 10, 50]
    for f in m["fanout"]:
        assert f["msgs_out"] >= f["msgs_in"] * f["fanout"] > 0 and f["server_cpu_s"] >= 0
    assert [(a["replicas"], a["stored"]) for a in m["appends"]] == [(1, 200), (3, 200)]
    assert "MEASURED" in proc.stdout and "EXTRAPOLATED" in proc.stdout
