"""The venv with LiteLLM's SDK that tests/test_gateway.py runs as a second client of the gateway.

    python3 scripts/litellm_venv.py          # create it unless there; prints its python

litellm cannot go in the project's test extra (its dependency tree conflicts with our pins),
so it lives in a venv of its own, outside the checkout: `${LLOOM_CACHE_DIR:-~/.cache/lloom}/
litellm-venv-<hash of scripts/litellm-constraints.txt>`, installed from those pins. A change
to the pins gives a new directory, so a stale venv is never used. Standard library only: the
test imports `venv_python` from this file to find the venv.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent / "litellm-constraints.txt"
READY = "lloom-ready"  # written last: a venv whose install was interrupted is rebuilt


def venv_dir() -> Path:
    cache = Path(os.environ.get("LLOOM_CACHE_DIR") or Path.home() / ".cache" / "lloom")
    return cache / f"litellm-venv-{hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:12]}"


def venv_python() -> Path | None:
    """The venv's python if the venv is complete, else None."""
    d = venv_dir()
    return d / "bin" / "python" if (d / READY).exists() else None


def create() -> Path:
    d = venv_dir()
    if venv_python() is None:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(d)], check=True)
        pin = next(line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("litellm=="))
        subprocess.run([str(d / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), pin],
                       check=True)  # fmt: skip
        (d / READY).write_text(pin + "\n")
    return d / "bin" / "python"


if __name__ == "__main__":
    print(create())
