"""`lloom-gateway keys` and `lloom-gateway --api-keys` as processes: the commands a person types."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from executor.process.embedded_nats import EmbeddedNats, free_port
from tests.helpers.gateway import Network, offer
from tests.helpers.wait import within

GATEWAY = str(Path(sys.executable).parent / "lloom-gateway")
MODEL = "gw-model"
pytestmark = pytest.mark.slow


async def lloom_gateway(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(GATEWAY, *argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await within(proc.communicate(), f"lloom-gateway {' '.join(argv)}", timeout=30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_keys_made_by_the_command_open_a_gateway_started_with_api_keys(
    js_server: EmbeddedNats, tmp_path: Path) -> None:  # fmt: skip
    code, out, err = await lloom_gateway("keys", "--nats", js_server.url, "create", "--name", "cli", "--budget", "1",
                                         "--rpm", "100")  # fmt: skip
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    assert key.startswith("lloom_")
    code, out, _ = await lloom_gateway("keys", "--nats", js_server.url, "list")
    assert code == 0 and "cli" in out and key not in out
    code, _, err = await lloom_gateway("keys", "--nats", js_server.url, "create", "--name", "x", "--budget", "-1")
    assert code == 2 and "budget" in err

    net = Network(js_server.url, tmp_path)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        GATEWAY, "--nats", js_server.url, "--listen", f"127.0.0.1:{port}", "--api-keys", "--log-level", "info",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        await net.executor("exe-a", offer(MODEL))
        await within(proc.stdout.readline(), "the gateway's URL on stdout")  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 401
            async with http.post(f"{url}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
                assert r.status == 200, await r.text()
            async with http.get(f"{url}/") as r:
                assert r.status == 200 and "Lloom network" in await r.text()
        proc.send_signal(signal.SIGTERM)
        assert await within(proc.wait(), "the gateway to exit") == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert key not in err and key.split("_", 2)[2] not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await net.aclose()
