"""`lloom` and `lloom-executor` as a newcomer meets them: options anywhere, a mistyped model, Ctrl-C.

The process tests run the real console scripts against a real nats-server and a real
`lloom-executor` whose backend is the OpenAI test double, with the helpers and fixtures
of `tests/test_daemon.py`. The double serves two names a newcomer could mistype.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from executor.catalog.announcer import Announcer
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.errors import NoExecutors
from protocol.identity import Identity
from protocol.replies import closest_model
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.processes import EXECUTOR, LLOOM, StartExecutor, run
from tests.helpers.wait import WAIT_S, within
from tests.test_daemon import config  # noqa: F401  (a fixture)
from tests.helpers.jobs import ask

SERVED = ["gemma3-270m", "smollm2-135m-instruct"]  # sorted, as the error lists them
MODEL = "gemma3-270m"
MISTYPED = [("gemma3", "gemma3-270m"), ("Gemma3-270M", "gemma3-270m"), ("smollm2-135m", "smollm2-135m-instruct")]


@pytest.fixture
async def double() -> AsyncIterator[OpenAIDouble]:
    async with OpenAIDouble(models=SERVED) as d:
        yield d


async def serving_executor(start_executor: StartExecutor, config: Path) -> str:
    """Start `lloom-executor` with its own NATS server; return that server's URL."""
    executor = await start_executor("--config", str(config))
    return await executor.started()


# -- global options before or after the subcommand ------------------------------------


@pytest.mark.slow
async def test_nats_and_other_global_options_work_before_or_after_the_subcommand(
    start_executor: StartExecutor, config: Path, env: dict[str, str]
) -> None:
    url = await serving_executor(start_executor, config)
    nc = await nats.connect(url)
    receipts = await nc.subscribe("lloom.v1.receipts.>")
    await nc.flush()

    after = await run(LLOOM, "complete", "--model", MODEL, "--nats", url, "--max-tokens", "5", "hi", env=env)
    before = await run(LLOOM, "--nats", url, "--timeout", "9", "complete", "--model", MODEL, "--json", "hi", env=env)

    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "tok0 tok1 tok2 tok3 tok4"  # `--nats URL` was not taken as the prompt
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["content"].strip().startswith("tok0")

    for argv in (["models", "--nats", url, "--json"], ["--nats", url, "--json", "models"]):
        listing = await run(LLOOM, *argv, env=env)
        assert listing.returncode == 0, listing.stderr
        [entry] = json.loads(listing.stdout)
        assert sorted(m["name"] for m in entry["models"]) == SERVED
    from_env = await run(LLOOM, "models", env={**env, "LLOOM_NATS_URL": url})
    assert from_env.returncode == 0 and MODEL in from_env.stdout, from_env.stderr

    # Both jobs' receipts are in the stream before it is read.
    received = 0
    while received < 2:
        received += int((await receipts.next_msg(timeout=WAIT_S)).headers["Lloom-Receipts"])
    await nc.close()
    for argv in (["receipts", "verify", "--stream", "--nats", url], ["--nats", url, "receipts", "verify", "--stream"]):
        verified = await run(LLOOM, *argv, env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "2 receipts: 2 valid, 0 invalid; chain problems: 0" in verified.stdout

    for argv in (["status", "--nats", url, "--json"], ["--nats", url, "--json", "status"]):
        status = await run(EXECUTOR, *argv, env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["stats"]["completed"] == 2


@pytest.mark.slow
async def test_an_option_a_command_has_no_use_for_is_a_usage_error(env: dict[str, str]) -> None:
    result = await run(LLOOM, "--json", "receipts", "verify", "receipts.jsonl", env=env)

    assert result.returncode == 2
    assert "--json does not apply to this command" in result.stderr


# -- a mistyped model ------------------------------------------------------------------


def test_the_closest_served_name_ignores_case_and_is_never_the_name_itself() -> None:
    for asked, meant in MISTYPED:
        assert closest_model(asked, SERVED) == meant
    assert closest_model("gemma3-270m", SERVED) is None  # served: nothing to suggest
    assert closest_model("qwen2.5:7b", SERVED) is None  # nothing close
    assert closest_model("smollm2", SERVED) == "smollm2-135m-instruct"  # a short form of one served name
    assert closest_model("g", ["gemma3-270m", "gemma2-2b"]) is None  # the start of several: no guess


@pytest.mark.slow
async def test_a_mistyped_model_prints_the_served_models_and_the_closest_one_and_exits_1(
    start_executor: StartExecutor, config: Path, env: dict[str, str]
) -> None:
    url = await serving_executor(start_executor, config)

    for (asked, meant), stream in zip(MISTYPED, ([], ["--stream"], []), strict=True):
        result = await run(LLOOM, "complete", "--model", asked, *stream, "--nats", url, "hi", env=env)

        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"lloom: no_executors: no executor serves model {asked!r} (served: {', '.join(SERVED)});"
            f" did you mean {meant}? See `lloom models`."
        ]
        assert result.stdout.strip() == ""


async def test_the_python_client_error_carries_the_served_models_and_the_closest_one(
    node: ExecutorNode, nc: NATS, client: LloomClient
) -> None:
    announcer = Announcer(nc, node, Identity.generate())  # the node serves what the double lists: SERVED
    await announcer.start()

    for asked, meant in MISTYPED:
        with pytest.raises(NoExecutors) as unary:
            await client.complete(ask(model=asked))
        with pytest.raises(NoExecutors) as streamed:
            async with client.stream(ask(model=asked)) as stream:
                async for _ in stream:
                    pass
        for err in (unary.value, streamed.value):
            assert err.available_models == SERVED
            assert err.suggestion == meant
            assert f"did you mean {meant}?" in str(err)
    await announcer.stop()


async def test_with_no_executor_at_all_the_error_says_so(client: LloomClient, nats_server: EmbeddedNats) -> None:
    with pytest.raises(NoExecutors) as caught:
        await client.complete(ask(model="gemma3"))

    assert caught.value.available_models == []
    assert caught.value.suggestion is None
    assert "no executor on the network serves any model" in str(caught.value)


# -- Ctrl-C ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
async def test_ctrl_c_prints_cancelled_exits_130_and_cancels_the_job_at_the_executor(
    stream: bool, start_executor: StartExecutor, config: Path, double: OpenAIDouble, env: dict[str, str]
) -> None:
    # No liveness ping within the test: only the client's cancel can stop the job in time.
    config.write_text(config.read_text() + "liveness_interval_secs = 600\n")
    executor = await start_executor("--config", str(config))
    url = await executor.started()
    # A stream of 11 events a second apart (longer than any wait below), or an answer that never comes.
    double.fault = Fault.slow(1.0) if stream else Fault.stall()
    proc = await asyncio.create_subprocess_exec(
        LLOOM, "complete", "--model", MODEL, *(["--stream"] if stream else []), "--nats", url, "hi",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        if stream:
            first = await within(proc.stdout.read(64), "the first chunk on stdout")
            assert first.startswith(b"tok0")
        else:
            await within(double.started.wait(), "the backend got the job")

        proc.send_signal(signal.SIGINT)
        _, err = await within(proc.communicate(), "lloom to exit after Ctrl-C")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 130
    assert err.decode().splitlines() == ["cancelled"]
    await within(double.disconnected.wait(), "the executor closed its backend call")
    assert double.completed == 0
    # What the operator sees: the job counted as cancelled (counted just after the backend call closed).
    async with asyncio.timeout(WAIT_S):
        while (stats := await executor_stats(url, env))["cancelled"] == 0:
            pass
    assert (stats["cancelled"], stats["completed"], stats["failed"]) == (1, 0, 0)


async def executor_stats(url: str, env: dict[str, str]) -> dict[str, int]:
    status = await run(EXECUTOR, "status", "--nats", url, "--json", env=env)
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["stats"]


@pytest.mark.slow
async def test_ctrl_c_stops_lloom_models_watch_with_cancelled_and_130(
    start_executor: StartExecutor, config: Path, env: dict[str, str]
) -> None:
    url = await serving_executor(start_executor, config)
    proc = await asyncio.create_subprocess_exec(
        LLOOM, "models", "--watch", "--nats", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        header = await within(proc.stdout.readline(), "the catalogue on stdout")
        assert header.startswith(b"MODEL")

        proc.send_signal(signal.SIGINT)
        _, err = await within(proc.communicate(), "lloom to exit after Ctrl-C")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 130
    assert err.decode().splitlines() == ["cancelled"]
