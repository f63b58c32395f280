"""Fault figures: rerun the delivery fault scenarios and write them to docs/faults.md.

    .venv/bin/python scripts/faults.py            # every scenario (~1 min), writes docs/faults.md
    .venv/bin/python scripts/faults.py --quick    # a 200-job burst instead of 500
    .venv/bin/python scripts/faults.py --out /tmp/faults.md

The scenarios are the process tests of tests/test_faults_delivery.py (real nats-server
and `lloom-executor` processes, the OpenAI test double as the backend): this script
runs them with pytest, collects the figures each test records (LLOOM_FAULTS_FIGURES),
and replaces the "## Delivery" section of the output file, leaving every other
section (receipts faults, written by their own scenarios) as it is. It exits
non-zero when a scenario missed its goal; the figures are written either way.
Run it with the project's venv; traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = "tests/test_faults_delivery.py"
HEADING = "## Delivery"

# What the same scenarios gave before the delivery work (issue 15), for comparison.
BEFORE = {
    "nats restart, 1 s outage, 20 jobs of 2 s": "20/20 `deadline_exceeded` after the full budget",
    "nats restart, 3 s outage, 20 jobs of 2 s": "20/20 `deadline_exceeded` (0.2-0.6 s outages: 20/20 ok)",
    "nats restart, 3 s outage, 20 jobs of 4.5 s": "20/20 `cancelled`: liveness pings took the outage for the callers' absence",
    "nats restart, 1 s outage, 5 streams": "not measured",
    "executor SIGKILLed, unary job (2 executors)": "noticed only at the caller's deadline",
    "executor SIGKILLed mid-stream": "noticed at the caller's deadline (19-20 s of 20 s)",
    "burst": "32 ok, 468 `busy` after 0.23 s; retries ~4x the load",
    "job and cancel sent back to back": "30/30 callers never answered",
}


def run_scenarios(quick: bool) -> tuple[int, list[dict[str, object]]]:
    with tempfile.TemporaryDirectory(prefix="lloom-faults-") as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "LLOOM_FAULTS_FIGURES": str(figures), "LLOOM_FAULTS_QUICK": "1" if quick else "0"}
        proc = subprocess.run([sys.executable, "-m", "pytest", SCENARIOS, "-q", "-p", "no:cacheprovider"],
                              cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    return proc.returncode, rows


def _before(scenario: str) -> str:
    return BEFORE.get(scenario) or next((v for k, v in BEFORE.items() if scenario.startswith(k)), "")


def _details(row: dict[str, object]) -> str:
    labels = {"outage_s": "outage {} s", "answered_after_s": "all answered {} s after it began",
              "resume_requests": "{} resume request(s)", "noticed_after_s": "noticed {} s after the kill",
              "executor_lost_errors": "{} `executor_lost`", "chunks_before": "{} chunks before the kill",
              "busy_replies": "{} busy replies", "busy_per_job": "{} busy per job", "took_s": "all done in {} s",
              "answers_per_job": "final answers per job: {}"}  # fmt: skip
    return ", ".join(label.format(row[k]) for k, label in labels.items() if k in row)


def render(rows: list[dict[str, object]], ok: bool, quick: bool) -> str:
    lines = [
        HEADING,
        "",
        f"Written by `scripts/faults.py{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" ({platform.machine()}, {os.cpu_count()} CPUs, shared with other work); the scenarios are the process tests"
        f" of `{SCENARIOS}`{'' if ok else ' (**at least one missed its goal**)'}. \"Run twice\" is the backend's"
        " count of completed requests minus the jobs answered.",
        "",
        "| scenario | attempted | completed | failed (typed) | lost | run twice | details | before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['attempted']} | {r['completed']} | {r['failed_typed']} | {r['lost']} |"
                     f" {r['run_twice']} | {_details(r)} | {_before(str(r['scenario']))} |")  # fmt: skip
    lines += [
        "",
        "How: executors keep each job's replies for `result_retention_secs` and re-send them to the job's own",
        "reply subject when a reconnected client asks on `lloom.v1.resume`; running jobs send keepalives every",
        "`keepalive_secs`, and a client fails a call whose executor was silent for 3 s with `executor_lost`",
        "(retried elsewhere when no chunk had arrived); busy replies carry `retry_after_s`, the executor's",
        "estimate of when it has room, which clients wait out (with jitter) within their deadline. A job",
        "cancelled before it started is answered `cancelled`. In the restart scenarios the executor pings its",
        "callers every 0.5 s (`liveness_interval_secs`), so pings fall into the outage. See docs/architecture.md,",
        "\"Delivery\", and docs/protocol.md.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the Delivery section of `path` (or add it), keeping every other section."""
    text = path.read_text() if path.exists() else "# Fault figures\n\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smaller burst (200 jobs)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "faults.md")
    args = parser.parse_args()
    code, rows = run_scenarios(args.quick)
    if not rows:
        print("no figures were recorded (see the pytest output above)", file=sys.stderr)
        return code or 1
    write_section(args.out, render(rows, code == 0, args.quick))
    print(f"wrote {args.out} ({len(rows)} scenarios{'' if code == 0 else ', some missed their goal'})")
    return code


if __name__ == "__main__":
    sys.exit(main())
