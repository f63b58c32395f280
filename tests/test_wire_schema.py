"""The checked-in JSON Schema of the wire matches the message types, whatever msgspec renders."""

from __future__ import annotations

import os
import runpy
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "wire_schema.py"


def test_checked_in_wire_schema_is_current() -> None:
    module = runpy.run_path(str(SCRIPT))
    assert module["OUT"].read_bytes() == module["render"](), "run: python scripts/wire_schema.py"


def test_wire_schema_renders_identically_under_the_oldest_msgspec_allowed() -> None:
    # .ci/run makes a venv with the lowest msgspec pyproject.toml admits; a release that renders
    # schemas differently (docstring indent, anyOf order) must not make the file depend on it.
    python = os.environ.get("LLOOM_OLDEST_MSGSPEC_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("LLOOM_OLDEST_MSGSPEC_PYTHON is not set: .ci/run makes that venv")
        pytest.skip("set LLOOM_OLDEST_MSGSPEC_PYTHON to a python with the oldest allowed msgspec (see .ci/run)")
    version = subprocess.run(
        [python, "-c", "import msgspec; print(msgspec.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"msgspec>={version},' in pyproject, f"{python} has msgspec {version}, not the oldest allowed"
    done = subprocess.run(
        [python, str(SCRIPT), "--check"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
