"""Rerun the receipts fault tests and write their figures into docs/faults.md, section "Receipts".

    .venv/bin/python scripts/faults_receipts.py            # runs the tests (~40 s), rewrites the section
    .venv/bin/python scripts/faults_receipts.py --out F    # another file

The tests (tests/test_receipts_full_disk.py with real `lloom-executor` processes, a
256 KiB tmpfs when root, a file-size limit anywhere; tests/test_receipts_durability.py in-process) write
what they counted to a temp dir (LLOOM_FAULT_FIGURES); this renders it. Only the
"## Receipts" section is replaced: other sections of the file (other fault families)
are kept as they are, so a combined faults script can call this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_receipts_full_disk.py", "tests/test_receipts_durability.py"]
TITLE = "# Fault figures\n\nEach section is written by a script that reruns its fault tests; numbers are from this machine.\n"


def run_tests(figures: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LLOOM_FAULT_FIGURES=str(figures))
    return subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)  # fmt: skip


def section(fig: dict[str, dict[str, object]], passed: str) -> str:
    lines = ["## Receipts", "",
             f"`scripts/faults_receipts.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; tests: {passed}.", ""]  # fmt: skip
    tmpfs, rlimit = fig.get("full_disk_tmpfs"), fig.get("full_disk_rlimit")
    if tmpfs or rlimit:
        cols = [(name, d) for name, d in (("tmpfs (ENOSPC)", tmpfs), ("RLIMIT_FSIZE (EFBIG)", rlimit)) if d]
        row = lambda label, before, key: f"| {label} | {before} | " + " | ".join(str(d[key]) for _, d in cols) + " |"  # noqa: E731
        lines += [
            "**Full disk** (`lloom-executor` processes; the outbox on a 256 KiB tmpfs filled to its last 16 KiB, or"
            " an executor whose file-size limit is 16 KiB; 20 jobs one after another, then the disk freed (the filler"
            " deleted, the limit raised), 5 jobs, a restart, 2 jobs):", "",
            "| | before (issue 15) | " + " | ".join(name for name, _ in cols) + " |",
            "|---|---|" + "---|" * len(cols),
            row("jobs attempted", 20, "jobs_attempted"),
            row("jobs completed, each with a receipt", "20, receipts not written", "jobs_completed"),
            row("of them before the disk filled", "-", "completed_before_the_disk_filled"),
            row("jobs failed with `receipts_unavailable` (retryable, not billed)", 0, "jobs_failed_typed"),
            row("receipts expected (held by clients)", 20, "receipts_expected"),
            row("receipts stored in the stream", 4, "receipts_stored"),
            row("receipts lost", 16, "receipts_lost"),
            row("receipts duplicated", "-", "receipts_duplicated"),
            row("sequence numbers reused", "yes", "seqs_reused"), "",
            "The executor resumed by itself once the disk was freed (its probe, every 0.2 s); the restarted one"
            " found no torn line to cut.", "",
        ]  # fmt: skip
    m = fig.get("memory_flat")
    if m:
        lines += [
            f"**JetStream away, memory** (`lloom-executor` process on a nats-server without JetStream, c=32,"
            f" {m['jobs_measured']:,} jobs in {m['seconds']} s after a 2,000-job warm-up): RSS {m['rss_before_mib']} ->"
            f" {m['rss_after_mib']} MiB ({m['bytes_per_job']} B a job, the memory window filling); {m['receipts_waiting']:,}"
            f" receipts waiting, {m['in_memory']:,} of them in memory (window {m['memory_window']:,}). The same test run"
            " once against the code before this change (3e2c911): 51.7 -> 88.0 MiB, 2,118 B a job (issue 15"
            " measured 47 -> 266 MiB over 120,000 jobs).", "",
        ]  # fmt: skip
    o = fig.get("jetstream_outage")
    if o:
        lines += [
            f"**JetStream away, then back** (in-process node, {o['jobs']:,} jobs with no JetStream, memory window"
            f" {o['memory_window']}; then the server restarted with JetStream on the same port): at most"
            f" {o['window_high_water']} receipts in memory; receipts expected {o['receipts_expected']:,}, stored"
            f" {o['receipts_stored']:,}, duplicated {o['receipts_duplicated']}, sequence numbers reused {o['seqs_reused']}.", "",
        ]  # fmt: skip
    return "\n".join(lines)


def replace_section(text: str, new: str) -> str:
    """`text` with its "## Receipts" section (up to the next "## ") replaced by `new`, or `new` appended."""
    start = text.find("\n## Receipts\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + new + "\n"
    end = text.find("\n## ", start + 1)
    return text[: start + 1] + new + "\n" + (text[end:] if end >= 0 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "faults.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_tests(Path(tmp))
        summary = next((line for line in reversed(result.stdout.splitlines()) if " passed" in line or " failed" in line),
                       "no summary")  # fmt: skip
        print(summary)
        if result.returncode != 0:
            print(result.stdout[-4000:], file=sys.stderr)
            return 1
        fig = {p.stem: json.loads(p.read_text()) for p in Path(tmp).glob("*.json")}
    text = args.out.read_text() if args.out.exists() else TITLE
    args.out.write_text(replace_section(text, section(fig, summary.strip("= "))))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
