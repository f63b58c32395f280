"""The README's two set-up commands stay true: CI runs the test command exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands_install_and_run_then_test() -> None:
    install_and_run, run_tests = readme_commands()
    assert install_and_run.endswith("lloom-executor")
    assert "pytest" in run_tests


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, run_tests = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert run_tests in ci_lines


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.+?)\n```", text, flags=re.S)[0]


def test_readme_install_commands_take_the_tested_versions() -> None:
    for command in readme_commands():
        assert "pip install -c constraints.txt " in command
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line[0] == "#"]
    assert all("==" in pin for pin in pins) and any(pin.startswith("msgspec==") for pin in pins)


@pytest.mark.slow
async def test_readme_python_example_runs_as_written(nats_server, http, signing) -> None:
    # Only the server's address differs from the README: the test's nats-server is on a free port.
    import asyncio
    import sys

    import nats

    from executor.backends.openai_compat import OpenAICompatibleBackend
    from executor.config import NodeConfig
    from executor.jobs.node import ExecutorNode
    from tests.doubles.openai_double import OpenAIDouble

    example = readme_python_example()
    assert 'LloomClient.connect("nats://127.0.0.1:4222")' in example
    model = re.search(r'model="([^"]+)"', example).group(1)
    async with OpenAIDouble(models=[model]) as double:
        conn = await nats.connect(nats_server.url)
        node = ExecutorNode(conn, OpenAICompatibleBackend(http, base_url=double.base_url), NodeConfig(), **signing())
        await node.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", example.replace("nats://127.0.0.1:4222", nats_server.url),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await node.stop(drain_timeout=1)
            await conn.close()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    # The double answers "tok0 tok1 ..." with exact usage: the unary reply, the streamed text, the usage.
    assert lines[0].startswith("tok0") and lines[1] == lines[0]
    assert "completion_tokens=" in lines[2]
    assert [r.get("stream", False) for r in double.requests] == [False, True]
