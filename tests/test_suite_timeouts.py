"""The suite's own safety net: a test that hangs fails at its timeout instead of hanging CI.

pytest-timeout (configured in pyproject.toml) interrupts a test after `timeout`
seconds. Our tests are asyncio coroutines run by pytest-asyncio, so this runs a
hanging coroutine test in a separate pytest and checks that it fails in time
and that the test after it still runs on a working event loop.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HANGS = '''
import asyncio


async def test_awaits_forever():
    await asyncio.Event().wait()


async def test_after_it_the_loop_still_works():
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    loop.call_soon(answer.set_result, 42)
    assert await answer == 42
'''


def test_the_suite_has_a_per_test_timeout(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) > 0


def test_a_hanging_async_test_fails_at_its_timeout_and_the_next_test_runs(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(HANGS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "1", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED test_hangs.py::test_awaits_forever" in done.stdout
    assert "Failed: Timeout (>1.0s) from pytest-timeout" in done.stdout
    assert "1 failed, 1 passed" in done.stdout  # and not one test hanging until the outer timeout
