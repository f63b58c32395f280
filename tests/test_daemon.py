"""The `lloom-executor` and `lloom` console scripts, run as a user runs them.

Every test starts the real scripts as subprocesses, against the OpenAI test
double served on the test's own event loop. Readiness is read from the
executor's JSON log lines on stderr (it logs JSON when stderr is not a
terminal), never guessed with sleeps; every wait is bounded, and every process
started here (and the nats-server it may have started) is killed at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NATS

from executor.backends.autodetect import AutoDetectBackend
from executor.backends.presets import PRESETS, Preset
from executor.config import DEFAULT_CONFIG_TOML, LlmClientConfig
from executor.process.embedded_nats import EmbeddedNats, free_port
from protocol.catalog import Catalog
from protocol.client import LloomClient
from protocol.errors import BackendUnavailable
from tests.conftest import MODEL
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import ask
from tests.helpers.processes import EXECUTOR, LLOOM, Result, StartExecutor, children, is_running, run
from tests.helpers.wait import WAIT_S, eventually, within

from tests.helpers.processes import JOINED  # noqa: F401  (re-exported for other test files)
CONTENT = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"  # the double's default answer, stripped


# -- helpers -------------------------------------------------------------------


def write_config(path: Path, *, base_url: str, backend: str = "openai_compatible", port: int | None = None) -> Path:
    path.write_text(
        f'[llm_client]\nbackend = "{backend}"\nbase_url = "{base_url}"\ntimeout_secs = 10\n\n'
        f"[node]\nembedded_nats_port = {port or free_port()}\n"
    )
    return path


def durable_config(tmp_path: Path, *, base_url: str, executor_id: str, extra: str = "") -> Path:
    """A config with a fixed id, identity key and receipts outbox: a restarted process is the same executor."""
    cfg = write_config(tmp_path / "executor.toml", base_url=base_url)
    cfg.write_text(
        cfg.read_text() + f'id = "{executor_id}"\nidentity_file = "{tmp_path / "id.nk"}"\n\n'
        f'[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\nsync_interval_secs = 0.05\n' + extra
    )
    return cfg


@pytest.fixture
def config(tmp_path: Path, double: OpenAIDouble) -> Path:
    """An executor config serving whatever the double lists."""
    return write_config(tmp_path / "executor.toml", base_url=double.base_url)


def lloom(url: str, *args: str, env: dict[str, str]) -> Awaitable[Result]:
    return run(LLOOM, "--nats", url, "complete", *args, env=env)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[str], Awaitable[LloomClient]]]:
    """In-process clients whose connections give up at once if the server goes away."""
    conns: list[tuple[LloomClient, NATS]] = []

    async def quiet(_e: Exception) -> None:
        pass

    async def factory(url: str) -> LloomClient:
        nc = await nats.connect(url, allow_reconnect=False, error_cb=quiet)
        client = LloomClient(nc, timeout=WAIT_S)
        await client.start()
        conns.append((client, nc))
        return client

    yield factory
    for client, nc in conns:
        await client.close()
        await nc.close()


# -- a node with its own NATS server, and the client CLI ----------------------


@pytest.mark.slow
async def test_executor_without_nats_url_starts_one_and_lloom_prints_the_answer(
    start_executor: StartExecutor, config: Path, env: dict[str, str]
) -> None:
    executor = await start_executor("--config", str(config))
    url = await executor.started()
    assert url.startswith("nats://127.0.0.1:")

    result = await lloom(url, "--model", MODEL, "hi", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == CONTENT
    # The summary goes to stderr, so stdout can be piped: model, finish reason, usage.
    assert MODEL in result.stderr
    assert "stop" in result.stderr
    assert "tokens prompt 1 + completion 8 = 9" in result.stderr


@pytest.mark.slow
async def test_stream_and_json_modes_print_the_same_answer(
    start_executor: StartExecutor, config: Path, env: dict[str, str]
) -> None:
    executor = await start_executor("--config", str(config))
    url = await executor.started()

    streamed, as_json = await asyncio.gather(
        lloom(url, "--model", MODEL, "--stream", "hi", env=env),
        lloom(url, "--model", MODEL, "--json", "hi", env=env),
    )

    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == CONTENT
    assert "tokens prompt 1 + completion 8 = 9" in streamed.stderr
    assert as_json.returncode == 0, as_json.stderr
    reply = json.loads(as_json.stdout)
    assert reply["content"].strip() == CONTENT
    assert reply["finish_reason"] == "stop"
    assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}


@pytest.mark.slow
async def test_lloom_embed_prints_one_vector_per_input_and_bad_input_is_a_typed_error(
    start_executor: StartExecutor, config: Path, env: dict[str, str]
) -> None:
    from tests.doubles.openai_double import embedding_of

    executor = await start_executor("--config", str(config))
    url = await executor.started()
    result = await run(LLOOM, "--nats", url, "embed", "--model", MODEL, "first text", "second", env=env)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [{"input": "first text", "embedding": embedding_of("first text", 8)},
                     {"input": "second", "embedding": embedding_of("second", 8)}]  # fmt: skip
    assert "2 embeddings, 3 prompt tokens" in result.stderr
    refused = await run(LLOOM, "--nats", url, "embed", "--model", MODEL, "REJECT this", env=env)
    assert refused.returncode == 1 and "lloom: bad_request:" in refused.stderr and "not allowed" in refused.stderr


@pytest.mark.slow
async def test_busy_embedded_port_is_replaced_by_a_free_one(
    start_executor: StartExecutor, tmp_path: Path, double: OpenAIDouble, env: dict[str, str]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        config = write_config(tmp_path / "executor.toml", base_url=double.base_url, port=busy)
        executor = await start_executor("--config", str(config))
        url = await executor.started()

        warning = executor.logged("embedded NATS port busy, using another")
        assert warning is not None and warning["wanted"] == busy
        assert url == f"nats://127.0.0.1:{warning['port']}"
        assert (await lloom(url, "--model", MODEL, "hi", env=env)).returncode == 0


@pytest.mark.slow
async def test_executor_with_nats_url_joins_that_server(
    start_executor: StartExecutor, config: Path, nats_server: EmbeddedNats, connect: Callable[[str], Awaitable[LloomClient]]
) -> None:
    executor = await start_executor("--config", str(config), "--nats", nats_server.url)
    assert await executor.started() == ""  # no server of its own
    assert children(executor.proc.pid) == []

    client = await connect(nats_server.url)
    reply = await client.complete(ask())

    assert reply.content.strip() == CONTENT
    assert reply.executor_id == executor.logged("executor node started")["executor_id"]  # type: ignore[index]


# -- stopping ------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_lets_the_job_in_flight_finish_then_exits_0(
    start_executor: StartExecutor,
    config: Path,
    nats_server: EmbeddedNats,
    double: OpenAIDouble,
    connect: Callable[[str], Awaitable[LloomClient]],
) -> None:
    executor = await start_executor("--config", str(config), "--nats", nats_server.url)
    await executor.started()
    client = await connect(nats_server.url)
    double.fault = Fault.slow(1.0)
    job = asyncio.create_task(client.complete(ask()))
    await within(double.started.wait(), "the backend got the job")

    executor.proc.send_signal(signal.SIGTERM)

    reply = await within(job, "the in-flight job's answer")
    assert reply.content.strip() == CONTENT
    assert await executor.exit_code() == 0
    assert (await executor.wait_for("draining"))["in_flight"] == 1
    assert (await executor.wait_for("executor node stopped"))["completed"] == 1
    assert executor.stdout == b""  # the log goes to stderr only


@pytest.mark.slow
async def test_sigint_stops_an_idle_executor_with_exit_0(start_executor: StartExecutor, config: Path) -> None:
    executor = await start_executor("--config", str(config))
    await executor.started()

    executor.proc.send_signal(signal.SIGINT)

    assert await executor.exit_code() == 0
    await executor.wait_for("executor node stopped")


@pytest.mark.slow
async def test_sigterm_stops_an_executor_taking_queued_jobs_within_a_container_stop_grace(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path
) -> None:
    # Its idle pull subscriptions once held the connection's drain for nats.py's 30 s, past
    # `docker stop`'s 10 s grace: every compose stop ended in SIGKILL (exit 137).
    cfg = durable_config(tmp_path, base_url=double.base_url, executor_id="queue-stop",
                         extra="\n[executors.queue]\nconsume_all = true\n")  # fmt: skip
    async with EmbeddedNats(jetstream=True) as server:
        executor = await start_executor("--config", str(cfg), "--nats", server.url)
        await executor.started()

        executor.proc.send_signal(signal.SIGTERM)

        assert await within(executor.exit_code(), "the executor's exit after SIGTERM", timeout=10.0) == 0
    await executor.wait_for("executor node stopped")


@pytest.mark.slow
async def test_ctrl_c_in_a_terminal_still_drains_the_job_in_flight(
    start_executor: StartExecutor, config: Path, double: OpenAIDouble, connect: Callable[[str], Awaitable[LloomClient]]
) -> None:
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group; the
    # embedded nats-server must not die with it before the in-flight job answers.
    executor = await start_executor("--config", str(config), own_session=True)
    url = await executor.started()
    client = await connect(url)
    double.fault = Fault.slow(1.0)
    job = asyncio.create_task(client.complete(ask()))
    await within(double.started.wait(), "the backend got the job")

    os.killpg(executor.proc.pid, signal.SIGINT)

    reply = await within(job, "the in-flight job's answer")
    assert reply.content.strip() == CONTENT
    assert await executor.exit_code() == 0


@pytest.mark.slow
async def test_sigkill_of_the_executor_leaves_no_nats_server_behind(
    start_executor: StartExecutor, config: Path
) -> None:
    executor = await start_executor("--config", str(config))
    await executor.started()
    [server] = children(executor.proc.pid)
    assert b"nats-server" in Path(f"/proc/{server}/cmdline").read_bytes()

    executor.proc.kill()
    await executor.exit_code()

    # No event exists for another process's death: poll /proc, bounded.
    await eventually(lambda: not is_running(server), timeout=5.0,
                     what=f"nats-server {server} gone after its executor's SIGKILL")  # fmt: skip


# -- init and check --------------------------------------------------------------


@pytest.mark.slow
async def test_init_writes_a_config_once_and_check_accepts_it(
    tmp_path: Path, double: OpenAIDouble, env: dict[str, str]
) -> None:
    path = tmp_path / "conf" / "executor.toml"

    first = await run(EXECUTOR, "init", str(path), env=env)
    assert first.returncode == 0, first.stderr
    assert str(path) in first.stdout
    assert path.read_text() == DEFAULT_CONFIG_TOML

    path.write_text(path.read_text() + "# edited by the user\n")
    again = await run(EXECUTOR, "init", str(path), env=env)
    assert again.returncode == 2
    assert str(path) in again.stderr and "--force" in again.stderr
    assert path.read_text().endswith("# edited by the user\n")  # untouched

    forced = await run(EXECUTOR, "init", "--force", str(path), env=env)
    assert forced.returncode == 0
    assert path.read_text() == DEFAULT_CONFIG_TOML

    # The written file, pointed at a server that runs (its default backend is "auto").
    path.write_text(
        path.read_text().replace('backend = "auto"', f'backend = "openai_compatible"\nbase_url = "{double.base_url}"')
    )
    check = await run(EXECUTOR, "--config", str(path), "check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "config: ok" in check.stdout
    for model in double.models:
        assert f"model {model}" in check.stdout


@pytest.mark.slow
async def test_check_against_a_dead_server_exits_1_and_says_how_to_start_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    config = write_config(tmp_path / "executor.toml", backend="lmstudio", base_url=url)

    check = await run(EXECUTOR, "--config", str(config), "check", env=env)

    assert check.returncode == 1
    assert url in check.stdout
    assert "LM Studio" in check.stdout and "lms server start" in check.stdout


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[node]\nmax_concurrent_jobs = "many"\n', ["$.node.max_concurrent_jobs"]),
        ("[node]\nmax_concurent_jobs = 4\n", ["max_concurent_jobs", "$.node"]),
        ("[llm_client]\nmax_connections = 0\n", ["$.llm_client.max_connections"]),
        ('[llm_client]\napi_key = "${LLOOM_TEST_UNSET_KEY}"\n', ["llm_client.api_key", "LLOOM_TEST_UNSET_KEY"]),
    ],
    ids=["wrong-type", "unknown-key", "out-of-range", "unset-variable"],
)
@pytest.mark.slow
async def test_bad_config_exits_2_naming_the_file_and_the_key(
    tmp_path: Path, env: dict[str, str], toml: str, named: list[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)

    result = await run(EXECUTOR, "--config", str(config), "check", env=env)

    assert result.returncode == 2
    assert str(config) in result.stderr
    for name in named:
        assert name in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_missing_config_file_exits_2_naming_it(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "nowhere.toml"
    for command in ("check", "run"):
        result = await run(EXECUTOR, "--config", str(missing), command, env=env)
        assert result.returncode == 2
        assert str(missing) in result.stderr
        assert "Traceback" not in result.stderr


# -- client errors ---------------------------------------------------------------


@pytest.mark.slow
async def test_model_nobody_serves_exits_1_with_no_executors(nats_server: EmbeddedNats, env: dict[str, str]) -> None:
    result = await lloom(nats_server.url, "--model", "nobody-serves-this", "hi", env=env)

    assert result.returncode == 1
    assert "no_executors" in result.stderr
    assert "nobody-serves-this" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
async def test_no_nats_at_the_url_exits_2_saying_it_cannot_connect(env: dict[str, str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"

    result = await lloom(url, "--model", MODEL, "hi", env=env)

    assert result.returncode == 2
    assert f"cannot connect to NATS at {url}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_executor_told_to_join_a_dead_nats_url_exits_2_naming_it(config: Path, env: dict[str, str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"

    result = await run(EXECUTOR, "--config", str(config), "--nats", url, env=env)

    assert result.returncode == 2
    assert f"cannot connect to NATS at {url}" in result.stderr
    assert "Traceback" not in result.stderr


# -- backend = "auto" ------------------------------------------------------------


def local_preset(name: str, base_url: str) -> Preset:
    return Preset(name=name, base_url=base_url, start_hint=PRESETS[name].start_hint)


async def test_auto_backend_picks_the_server_that_answers(http: aiohttp.ClientSession, double: OpenAIDouble) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    backend = AutoDetectBackend(
        http, LlmClientConfig(), presets=[local_preset("lmstudio", dead), local_preset("ollama", double.base_url)]
    )

    models = await backend.list_models()

    assert [m.id for m in models] == double.models
    assert backend.resolved is not None and backend.resolved.base_url == double.base_url
    assert double.base_url in backend.name
    reply = await backend.complete(ask())
    assert reply.content.strip() == CONTENT


async def test_auto_backend_with_nothing_running_names_every_url_tried(http: aiohttp.ClientSession) -> None:
    urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    backend = AutoDetectBackend(
        http, LlmClientConfig(), presets=[local_preset("lmstudio", urls[0]), local_preset("ollama", urls[1])]
    )

    with pytest.raises(BackendUnavailable) as caught:
        await backend.list_models()

    for url in urls:
        assert url in caught.value.message
    assert backend.resolved is None


# -- the catalogue, as processes see it ------------------------------------------


async def announced(catalog: Catalog) -> None:
    """Return once `catalog` lists the one executor started. It announces itself just after
    logging "executor node started", so a query sent at that log line can miss it."""
    while len(catalog.entries()) != 1:
        assert await catalog.wait_changed(timeout=WAIT_S), f"catalogue lists {catalog.entries()}, not one executor"


@pytest.mark.slow
async def test_killed_executor_leaves_the_catalogue_after_missed_heartbeats_and_lloom_models_lists_the_live_ones(
    start_executor: StartExecutor, nats_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    heartbeat = 0.2
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    cfg.write_text(
        cfg.read_text() + f"heartbeat_interval_secs = {heartbeat}\n\n"
        '[[models]]\nname = "double-model"\ninput_price = "0.15"\noutput_price = "0.60"\ncategory = "fast"\n'
    )
    executor = await start_executor("--config", str(cfg), "--nats", nats_server.url)
    await executor.started()
    nc = await nats.connect(nats_server.url)
    catalog = Catalog(nc)
    await catalog.start()
    await announced(catalog)

    listing = await run(LLOOM, "--nats", nats_server.url, "models", env=env)
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("double-model"))
    assert row[2:7] == ["openai_compatible", "0.15", "0.60", "?", "fast"]
    as_json = await run(LLOOM, "--nats", nats_server.url, "models", "--json", env=env)
    [entry] = json.loads(as_json.stdout)
    assert {m["name"] for m in entry["models"]} == set(double.models)

    assert len(catalog.entries()) == 1
    executor.proc.kill()
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    while catalog.entries():
        await catalog.wait_changed(timeout=heartbeat)  # expiry is noticed on read: look every period
        assert loop.time() - killed_at < 3 * heartbeat + 1.0, "a killed executor stayed in the catalogue"
    gone_after = loop.time() - killed_at
    # Not before it missed heartbeats (no goodbye was sent): silent for 2.5 periods (±10% jitter)
    # after the last one received, which came at most one period before the kill.
    # (+0.4 s: the catalogue notices on its next read, one period later, on a loaded CI machine too.)
    assert 1.4 * heartbeat <= gone_after <= 3 * heartbeat + 0.4
    await catalog.stop()
    await nc.close()


@pytest.mark.slow
async def test_graceful_stop_says_goodbye_before_draining(
    start_executor: StartExecutor, nats_server: EmbeddedNats, config: Path
) -> None:
    executor = await start_executor("--config", str(config), "--nats", nats_server.url)
    await executor.started()
    nc = await nats.connect(nats_server.url)
    catalog = Catalog(nc)
    await catalog.start()
    await announced(catalog)
    executor.proc.send_signal(signal.SIGTERM)
    assert await catalog.wait_changed(timeout=WAIT_S)
    assert catalog.entries() == []
    assert await executor.exit_code() == 0
    await catalog.stop()
    await nc.close()


# -- receipts survive a missing JetStream and a killed executor ---------------------


@pytest.mark.slow
async def test_receipts_survive_jetstream_down_and_executor_sigkill_then_publish_exactly_once(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    port = free_port()
    cfg = durable_config(tmp_path, base_url=double.base_url, executor_id="durable-exec")

    async with EmbeddedNats(port=port) as no_jetstream:
        executor = await start_executor("--config", str(cfg), "--nats", no_jetstream.url)
        await executor.started()
        async with await LloomClient.connect(no_jetstream.url, timeout=WAIT_S) as client:
            replies = [await client.complete(ask()) for _ in range(5)]
        assert all(r.receipt is not None for r in replies)
        executor.proc.kill()  # no goodbye, no flush
        await executor.exit_code()

    async with EmbeddedNats(port=port, jetstream=True, store_dir=str(tmp_path / "js")) as server:
        nc = await nats.connect(server.url)
        arrived = await nc.subscribe("lloom.v1.receipts.>")
        await nc.flush()
        executor = await start_executor("--config", str(cfg), "--nats", server.url)
        await executor.started()

        async def receipts_arriving(n: int) -> None:
            while n > 0:
                n -= int((await arrived.next_msg(timeout=WAIT_S)).headers["Lloom-Receipts"])

        await receipts_arriving(5)  # the five receipts of the killed run, flushed from its outbox
        async with await LloomClient.connect(server.url, timeout=WAIT_S) as client:
            replies += [await client.complete(ask()) for _ in range(2)]
        await receipts_arriving(2)
        await nc.close()

        verified = await run(LLOOM, "--nats", server.url, "receipts", "verify", "--stream", env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "7 receipts: 7 valid, 0 invalid; chain problems: 0" in verified.stdout
        report = await run(LLOOM, "--nats", server.url, "receipts", "report", "--stream", "--json", env=env)
        sums = json.loads(report.stdout)
        assert sums["executor"]["durable-exec"]["jobs"] == 7
        assert sums["executor"]["durable-exec"]["completion_tokens"] == sum(r.usage.completion_tokens for r in replies)


# -- queued jobs survive a killed executor and a restarted NATS ------------------------


@pytest.mark.slow
async def test_queued_jobs_survive_executor_sigkill_and_nats_restart_each_run_and_billed_once(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    port = free_port()
    cfg = durable_config(tmp_path, base_url=double.base_url, executor_id="queue-exec",
                         extra="\n[executors.queue]\nconsume_all = true\nack_wait_secs = 2\n")  # fmt: skip
    store = str(tmp_path / "js")
    double.faults.append(Fault.stall())  # the first job to reach the backend hangs there

    async with EmbeddedNats(port=port, jetstream=True, store_dir=store) as server:
        executor = await start_executor("--config", str(cfg), "--nats", server.url)
        await executor.started()
        async with await LloomClient.connect(server.url, timeout=WAIT_S) as client:
            ids = [await client.submit(ask(text=f"queued job {i}")) for i in range(6)]
            # Five finish; one hangs in the backend when the executor is killed.
            results = [asyncio.create_task(client.result(i, timeout=WAIT_S)) for i in ids]
            async with asyncio.timeout(WAIT_S):
                while sum(t.done() for t in results) < 5:
                    await asyncio.wait([t for t in results if not t.done()], return_when=asyncio.FIRST_COMPLETED)
            assert double.in_flight == 1
            executor.proc.kill()
            await executor.exit_code()
            for t in results:
                t.cancel()
            await asyncio.gather(*results, return_exceptions=True)

    # NATS restarts from its store; so does the executor (same id, key and outbox).
    async with EmbeddedNats(port=port, jetstream=True, store_dir=store) as server:
        executor = await start_executor("--config", str(cfg), "--nats", server.url)
        await executor.started()
        async with await LloomClient.connect(server.url, timeout=WAIT_S) as client:
            replies = [await client.result(i, timeout=WAIT_S) for i in ids]
            assert [r.job_id for r in replies] == ids
            assert double.completed == 6  # the hung job ran again; none of the others did
            # Billed once each: one receipt per job in the stream, chain intact. The receipts are
            # published in the background; nothing announces it, so ask the report until it counts six.
            async def six_jobs_reported() -> bool:
                report = await run(LLOOM, "--nats", server.url, "receipts", "report", "--stream", "--json", env=env)
                sums = json.loads(report.stdout or "{}")
                return sums.get("executor", {}).get("queue-exec", {}).get("jobs") == 6

            await eventually(six_jobs_reported, timeout=WAIT_S, interval=0.1,
                             what="six receipts of queue-exec in `lloom receipts report`")  # fmt: skip
            verified = await run(LLOOM, "--nats", server.url, "receipts", "verify", "--stream", env=env)
            assert "6 receipts: 6 valid, 0 invalid; chain problems: 0" in verified.stdout, verified.stdout
            assert sorted(r.receipt.receipt.job_id for r in replies if r.receipt) == sorted(ids)
        fetched = await run(LLOOM, "--nats", server.url, "result", ids[0], "--no-wait", "--json", env=env)
        assert fetched.returncode == 0 and json.loads(fetched.stdout)["job_id"] == ids[0], fetched.stderr
        missing = await run(LLOOM, "--nats", server.url, "result", "no-such-job", "--no-wait", env=env)
        assert missing.returncode == 3 and "no result yet" in missing.stderr
        queued = await run(LLOOM, "--nats", server.url, "complete", "--model", MODEL, "--queue", "hello", env=env)
        assert queued.returncode == 0, queued.stderr
        waited = await run(LLOOM, "--nats", server.url, "result", queued.stdout.strip(), "--timeout", "10", env=env)
        assert waited.returncode == 0 and "tok0" in waited.stdout, waited.stderr
        status = await run(EXECUTOR, "--nats", server.url, "status", env=env)
        # Since its restart: the job that hung, and the one queued from the CLI.
        assert f"queue: pulling for {MODEL}, " in status.stdout and "; queued 0, ran 2, skipped 0" in status.stdout
