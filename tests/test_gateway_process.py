"""The gateway as a process: in `lloom-executor`'s single-machine start, and `lloom-gateway` draining on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from executor.process.embedded_nats import EmbeddedNats, free_port
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.gateway import Network, offer
from tests.helpers.processes import StartExecutor
from tests.helpers.wait import WAIT_S, eventually, within

GATEWAY = str(Path(sys.executable).parent / "lloom-gateway")
MODEL = "gw-model"


@pytest.mark.slow
async def test_the_single_machine_start_serves_the_openai_api_and_logs_its_url(
    start_executor: StartExecutor, tmp_path: Path
) -> None:
    port = free_port()
    async with OpenAIDouble(models=[MODEL]) as double:
        config = tmp_path / "executor.toml"
        config.write_text(
            f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\ntimeout_secs = 10\n\n'
            f"[node]\nembedded_nats_port = {free_port()}\n\n[gateway]\nlisten = \"127.0.0.1:{port}\"\n"
        )
        executor = await start_executor("--config", str(config))
        await executor.started()
        ready = await executor.wait_for("OpenAI-compatible gateway ready")
        assert ready["url"] == f"http://127.0.0.1:{port}/v1"
        assert any("has no API keys: anyone who can reach this port can use it" in line for line in executor.lines)
        async with openai.AsyncOpenAI(base_url=str(ready["url"]), api_key="unused", max_retries=0) as client:
            models = await eventually(lambda: _ids(client), timeout=WAIT_S, what="the model in /v1/models")
            reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert MODEL in models
        assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
        executor.proc.send_signal(signal.SIGTERM)
        assert await executor.exit_code() == 0


async def _ids(client: openai.AsyncOpenAI) -> list[str] | None:
    ids = [m.id for m in (await client.models.list()).data]
    return ids or None


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


@pytest.mark.slow
async def test_sigterm_stops_accepting_and_lets_open_streams_finish(net: Network, js_server: EmbeddedNats) -> None:
    await net.executor("exe-a", offer(MODEL))
    double = net.doubles["exe-a"]
    double.fault = Fault.slow(0.15)  # 8 chunks: about 1.2 s of stream
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        GATEWAY, "--nats", js_server.url, "--listen", f"127.0.0.1:{port}", "--drain-secs", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        line = await within(proc.stdout.readline(), "the gateway's URL on stdout")  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}/v1" in line.decode()
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                proc.send_signal(signal.SIGTERM)

                async def refused() -> bool:
                    try:
                        async with aiohttp.ClientSession() as other, other.get(f"{url}/v1/models"):
                            return False
                    except aiohttp.ClientConnectionError:
                        return True

                await eventually(refused, timeout=WAIT_S, what="new connections refused after SIGTERM")
                rest = await within(resp.content.read(), "the open stream to finish")
        events = (first + rest).decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        text = "".join(e.split('"content":"')[1].split('"')[0] for e in events if '"content":"' in e)
        assert text == "".join(f"tok{i} " for i in range(8))
        assert await within(proc.wait(), "the gateway to exit") == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
