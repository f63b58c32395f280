"""The checked-in JSON Schema of the wire matches the message types."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "wire_schema.py"


def test_checked_in_wire_schema_is_current() -> None:
    module = runpy.run_path(str(SCRIPT))
    assert module["OUT"].read_bytes() == module["render"](), "run: python scripts/wire_schema.py"
