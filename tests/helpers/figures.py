"""Figures a fault test measured, kept for docs/faults.md when asked (LLOOM_FAULT_FIGURES=<dir>).

scripts/faults_receipts.py sets the variable, runs the tests and renders what they wrote;
a plain test run writes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record(name: str, figures: dict[str, object]) -> None:
    out = os.environ.get("LLOOM_FAULT_FIGURES")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=1))
