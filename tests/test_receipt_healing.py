"""Receipts heal themselves: acknowledged receipts the stream lost are re-published, with no one acting.

Real `lloom-executor` processes on the embedded bus, real JetStream; the gaps
are opened the ways they open in life (a purge, a store wiped, an executor
killed while JetStream was away) and `lloom receipts verify --stream` judges.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import nats
import nats.js.errors
from nats.js.api import StreamConfig
import pytest

from executor.process.embedded_nats import EmbeddedNats, free_port
from protocol import subjects as subj
from protocol.client import LloomClient
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.processes import LLOOM, Executor, StartExecutor, run
from tests.helpers import wait
from tests.helpers.wait import WAIT_S
from tests.test_daemon import write_config
from tests.helpers.jobs import ask
from tests.test_shared_bus import eventually

pytestmark = pytest.mark.slow


def executor_id(executor: Executor) -> str:
    return str(executor.logged("executor node started")["executor_id"])  # type: ignore[index]


async def jobs(url: str, n: int) -> None:
    async with await LloomClient.connect(url, timeout=WAIT_S) as client:
        for _ in range(n):
            assert (await client.complete(ask())).receipt is not None


async def test_receipts_purged_from_the_stream_are_re_published_and_verify_says_they_were_healed(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    cfg.write_text(cfg.read_text() + 'id = "healer"\n\n[receipts]\nsync_interval_secs = 0.05\nreconcile_interval_secs = 0.2\n')
    executor = await start_executor("--config", str(cfg))
    url = await executor.started()
    # The executor makes its stream with deny_purge; an operator may have made one without, and
    # made this way the same gap opens as when the store is wiped. No job has run yet: nothing
    # is published between the delete and the add.
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()

        async def made() -> bool:
            try:
                return bool(await js.stream_info(subj.RECEIPTS_STREAM))
            except nats.js.errors.NotFoundError:
                return False

        await wait.eventually(made, timeout=WAIT_S, what="the executor's receipts stream")
        await js.delete_stream(subj.RECEIPTS_STREAM)
        await js.add_stream(StreamConfig(name=subj.RECEIPTS_STREAM, subjects=[subj.RECEIPTS_ALL]))
    finally:
        await nc.close()
    await jobs(url, 5)
    # Executors that have stopped announce no key any more: this is about the chain, not whose keys.
    verify = lambda: run(LLOOM, "--nats", url, "receipts", "verify", "--stream", "--any-key", env=env)  # noqa: E731
    await eventually(verify, lambda r: "5 receipts: 5 valid" in r.stdout, "the five receipts stored")

    nc = await nats.connect(url)
    assert await nc.jetstream().purge_stream(subj.RECEIPTS_STREAM, subject=subj.receipts_subject("healer"))
    await nc.close()
    healed = await executor.wait_for("receipts were missing from the stream; re-published them")
    assert (healed["executor"], healed["healed"], healed["first"], healed["last"]) == ("healer", 5, 1, 5)

    result = await eventually(verify, lambda r: "5 receipts: 5 valid" in r.stdout, "the receipts back")
    assert result.returncode == 0, result.stdout
    assert "healed: 5 receipts re-published by healer after the stream had lost them" in result.stdout
    assert "chain problems: 0" in result.stdout


async def test_earlier_identities_outboxes_are_published_and_healed_by_the_next_executor(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url, port=port)
    cfg.write_text(cfg.read_text() + "\n[receipts]\nsync_interval_secs = 0.05\n")
    data = tmp_path / ".local" / "share" / "lloom"

    # 1. An executor (no configured id: a new identity each start) whose 3 receipts were stored...
    acked = await start_executor("--config", str(cfg))
    url = await acked.started()
    await jobs(url, 3)
    # Executors that have stopped announce no key any more: this is about the chain, not whose keys.
    verify = lambda: run(LLOOM, "--nats", url, "receipts", "verify", "--stream", "--any-key", env=env)  # noqa: E731
    await eventually(verify, lambda r: "3 receipts: 3 valid" in r.stdout, "the first identity's receipts stored")
    acked.proc.send_signal(signal.SIGTERM)
    assert await acked.exit_code() == 0
    shutil.rmtree(data / "nats")  # ...in a store that is then lost (a new disk, a wiped server)

    # 2. One killed while JetStream was away: its 2 receipts never left the outbox.
    async with EmbeddedNats() as no_jetstream:
        pending = await start_executor("--config", str(cfg), "--nats", no_jetstream.url)
        await pending.started()
        await jobs(no_jetstream.url, 2)
        pending.proc.kill()
        await pending.exit_code()

    # 3. The next executor on this machine puts both back, on a fresh stream.
    current = await start_executor("--config", str(cfg))
    assert await current.started() == url
    published = await current.wait_for("published an earlier identity's receipts")
    assert (published["executor"], published["published"], published["left"]) == (executor_id(pending), 2, 0)
    healed = await current.wait_for("receipts were missing from the stream; re-published them")
    assert (healed["executor"], healed["healed"]) == (executor_id(acked), 3)

    result = await eventually(verify, lambda r: "5 receipts: 5 valid" in r.stdout, "all five receipts back")
    assert result.returncode == 0, result.stdout
    assert (
        f"healed: 3 receipts re-published by {executor_id(current)} (receipts of {executor_id(acked)})" in result.stdout
    )
