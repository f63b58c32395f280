"""Receipts through a full disk and a long JetStream outage, with real `lloom-executor` processes.

The full disk is real, two ways: the outbox on a 256 KiB tmpfs (mounting one
needs root; skipped elsewhere), and on any machine an executor whose file-size
limit (RLIMIT_FSIZE) its outbox reaches (write() fails with EFBIG), later raised
from outside as freeing the disk. Each test counts jobs attempted / completed /
failed and receipts expected / stored / duplicated / reused; with
LLOOM_FAULT_FIGURES=<dir> set, it also writes them to <dir>/<test>.json for
scripts/faults_receipts.py, which puts them in docs/faults.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest

from executor.process.embedded_nats import EmbeddedNats
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.errors import ReceiptsUnavailable
from protocol.receipts import SignedReceipt, check_chain, verify_receipt
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.figures import record
from tests.helpers.jobs import ask
from tests.helpers.processes import EXECUTOR, Executor, StartExecutor, run
from tests.helpers.wait import eventually, within
from tests.test_daemon import write_config
from tests.test_receipts import stored_receipts

pytestmark = pytest.mark.slow

WAIT = 20.0
MiB = 1 << 20


class FullDisk:
    """Where the outbox lives and how its disk fills and frees.

    `tmpfs`: a real 256 KiB tmpfs filled to its last 16 KiB (mounting needs root; skipped
    elsewhere), freed by deleting the filler. `rlimit`: any machine; the executor starts with
    RLIMIT_FSIZE = 16 KiB (soft; Python ignores SIGXFSZ, so write() fails with EFBIG) and is
    freed by raising its limit from outside (`prlimit`). Its embedded nats-server would inherit
    the limit, so that executor uses a test-run server (`nats_url`)."""

    def __init__(self, kind: str, outbox: Path, error: str, *, filler: Path | None = None) -> None:
        self.kind, self.outbox, self.error, self.filler = kind, outbox, error, filler
        self.nats_url: str | None = None

    def argv(self, *args: str) -> list[str]:
        if self.kind == "rlimit":
            return [sys.executable, "-c", _LIMITED, str(16 << 10), EXECUTOR, *args]
        return [EXECUTOR, *args]

    def fill(self) -> None:
        if self.kind == "tmpfs":
            self.filler = fill(self.outbox.parent, leave=16 << 10)  # room for a handful of receipts

    def free(self, pid: int) -> None:
        if self.filler is not None:
            self.filler.unlink()
        else:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


# Run a command with a soft file-size limit (argv: limit, command...).
_LIMITED = (
    "import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1];"
    " resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), hard)); os.execv(sys.argv[2], sys.argv[2:])"
)


@pytest.fixture(params=["tmpfs", "rlimit"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FullDisk]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if request.param == "rlimit":
        yield FullDisk("rlimit", disk / "outbox", "File too large")
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the rlimit variant covers this path")
    yield FullDisk("tmpfs", disk / "outbox", "No space left on device")
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
async def spawn(env: dict[str, str]) -> AsyncIterator[Callable[[list[str]], Awaitable[Executor]]]:
    """Start an executor from a whole argv (a wrapper first); each is killed at teardown."""
    started: list[Executor] = []

    async def start(argv: list[str]) -> Executor:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        started.append(Executor(proc))
        return started[-1]

    yield start
    for executor in started:
        await executor.close()


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to its last `leave` bytes; the filler file is returned (delete it to free the disk)."""
    reserve = disk / "reserve"
    reserve.write_bytes(bytes(leave))
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    reserve.unlink()
    return filler


def counts(held: list[SignedReceipt], stored: list[SignedReceipt]) -> dict[str, int]:
    """Receipts expected (what clients got), stored, duplicated, lost, and seqs carried by two receipts."""
    unique = {(s.receipt.seq, s.receipt.job_id) for s in stored}
    jobs_by_seq: dict[int, set[str]] = {}
    for s in held + stored:
        jobs_by_seq.setdefault(s.receipt.seq, set()).add(s.receipt.job_id)
    stored_jobs = {s.receipt.job_id for s in stored}
    return {
        "receipts_expected": len(held), "receipts_stored": len(unique), "receipts_duplicated": len(stored) - len(unique),
        "receipts_lost": sum(r.receipt.job_id not in stored_jobs for r in held),
        "seqs_reused": sum(len(jobs) - 1 for jobs in jobs_by_seq.values()),
    }  # fmt: skip


async def status(url: str, env: dict[str, str]) -> dict[str, object]:
    result = await run(EXECUTOR, "status", "--nats", url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["receipts"]  # type: ignore[no-any-return]


async def test_a_full_outbox_disk_fails_jobs_typed_until_freed_and_after_a_restart_no_receipt_is_lost_or_reused(
    spawn: Callable[[list[str]], Awaitable[Executor]], double: OpenAIDouble, tmp_path: Path, env: dict[str, str],
    full_disk: FullDisk,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats_args: list[str] = []
        if full_disk.kind == "rlimit":
            server = await stack.enter_async_context(EmbeddedNats(jetstream=True, store_dir=str(tmp_path / "js")))
            nats_args = ["--nats", server.url]
        await _full_disk_scenario(spawn, double, tmp_path, env, full_disk, nats_args)


async def _full_disk_scenario(spawn: Callable[[list[str]], Awaitable[Executor]], double: OpenAIDouble, tmp_path: Path,
                              env: dict[str, str], full_disk: FullDisk, nats_args: list[str]) -> None:  # fmt: skip
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    cfg.write_text(cfg.read_text() + f'id = "fulldisk"\nidentity_file = "{tmp_path / "id.nk"}"\n\n'
                   f'[receipts]\noutbox_dir = "{full_disk.outbox}"\nsync_interval_secs = 0.05\n')  # fmt: skip
    executor = await spawn(full_disk.argv("--config", str(cfg), *nats_args))
    url = await executor.started() or nats_args[1]
    full_disk.fill()

    held: list[SignedReceipt] = []
    outcomes: list[str] = []
    # No retries: each attempt is one job, so the executor's counts can be checked exactly (a client
    # retries receipts_unavailable like busy, and here there is no other executor to get it).
    async with await LloomClient.connect(url, timeout=WAIT, busy_retries=0) as client:
        for _ in range(20):
            try:
                reply = await client.complete(ask())
            except ReceiptsUnavailable as e:
                assert e.retryable
                outcomes.append("unavailable")
                continue
            assert reply.receipt is not None, "a job succeeded without a receipt"
            held.append(reply.receipt)
            outcomes.append("ok")
        completed_while_full = outcomes.count("ok")
        # Jobs succeed while their receipts fit; from the first that did not, every job is refused.
        assert 0 < completed_while_full < 20 and outcomes == ["ok"] * completed_while_full + ["unavailable"] * (
            20 - completed_while_full)  # fmt: skip
        failed = await executor.wait_for("receipts cannot be written durably; refusing billable jobs until they can")
        assert full_disk.error in str(failed["error"])
        down = await status(url, env)
        assert down["durable"] is False and full_disk.error in str(down["error"])
        assert (down["failed"], down["refused"]) == (1, 20 - completed_while_full - 1)
        assert (full_disk.outbox / "receipts.jsonl").read_bytes().endswith(b"\n")

        full_disk.free(executor.proc.pid)  # space comes back: the executor notices by itself
        await executor.wait_for("receipts outbox writable again; taking jobs")
        assert (await status(url, env))["durable"] is True
        for _ in range(5):
            reply = await client.complete(ask())
            assert reply.receipt is not None
            held.append(reply.receipt)

    executor.proc.send_signal(signal.SIGTERM)
    assert await executor.exit_code() == 0
    again = await spawn([EXECUTOR, "--config", str(cfg), *nats_args])
    assert (await again.started() or nats_args[1]) == url
    assert again.logged("cut a torn last line off the receipts outbox") is None
    async with await LloomClient.connect(url, timeout=WAIT) as client:
        for _ in range(2):
            reply = await client.complete(ask())
            assert reply.receipt is not None
            held.append(reply.receipt)

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()

        async def all_stored() -> list[SignedReceipt] | None:
            info = await js.stream_info(subj.RECEIPTS_STREAM)
            stored = await stored_receipts(js) if info.state.messages else []
            return stored if len({s.receipt.job_id for s in stored}) >= len(held) else None

        stored = await eventually(all_stored, timeout=WAIT, what="every receipt a client got in the stream")
    finally:
        await nc.close()
    figures = counts(held, stored)
    record(f"full_disk_{full_disk.kind}", {"jobs_attempted": 27, "jobs_completed": len(held),
                                           "jobs_failed_typed": 20 - completed_while_full,
                                           "completed_before_the_disk_filled": completed_while_full, **figures})  # fmt: skip
    assert figures == {"receipts_expected": len(held), "receipts_stored": len(held), "receipts_duplicated": 0,
                       "receipts_lost": 0, "seqs_reused": 0}  # fmt: skip
    assert sorted(s.receipt.seq for s in stored) == list(range(1, len(held) + 1))
    assert check_chain([(s, verify_receipt(s)) for s in stored]) == []


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_executor_memory_stays_flat_while_receipts_wait_for_jetstream(
    start_executor: StartExecutor, double: OpenAIDouble, tmp_path: Path, env: dict[str, str]
) -> None:
    """~20,000 jobs (at most ~40 s of them) against a server without JetStream: every receipt waits,
    in the outbox file; the executor's RSS after a 2,000-job warm-up grows by less than 20 MiB
    (it grew ~1.8 KB a job, ~32 MiB here, while waiting receipts were held in memory)."""
    cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
    # Replies kept for re-sending after an outage (up to 16 MiB by default) are another,
    # separately bounded, buffer: kept out of this measurement of the receipts' memory.
    cfg.write_text(cfg.read_text() + "max_concurrent_jobs = 64\nresult_retention_bytes = 0\n")
    warmup, target, budget_s, concurrency = 2000, 20000, 40.0, 32
    async with EmbeddedNats() as no_jetstream:
        executor: Executor = await start_executor("--config", str(cfg), "--nats", no_jetstream.url)
        await executor.started()
        pid = executor.proc.pid
        done = 0
        async with await LloomClient.connect(no_jetstream.url, timeout=WAIT) as client:

            async def worker(stop_at: int, until: float) -> None:
                nonlocal done
                while done < stop_at and time.monotonic() < until:
                    done += 1
                    assert (await client.complete(ask())).receipt is not None

            forever = time.monotonic() + 3600
            await within(asyncio.gather(*(worker(warmup, forever) for _ in range(concurrency))), "the warm-up", 60)
            before, t0 = rss(pid), time.monotonic()
            await asyncio.gather(*(worker(target, t0 + budget_s) for _ in range(concurrency)))
            elapsed = time.monotonic() - t0
            after = rss(pid)
            waiting = await status(no_jetstream.url, env)
    measured = done - warmup
    record("memory_flat", {"jobs": done, "jobs_measured": measured, "seconds": round(elapsed, 1),
                           "rss_before_mib": round(before / MiB, 1), "rss_after_mib": round(after / MiB, 1),
                           "bytes_per_job": round((after - before) / measured, 1), "receipts_waiting": waiting["unpublished"],
                           "in_memory": waiting["in_memory"], "memory_window": waiting["memory_window"]})  # fmt: skip
    assert measured >= 5000, f"only {measured} jobs in {budget_s}s: too few to judge growth"
    assert waiting["unpublished"] == done and waiting["in_memory"] <= waiting["memory_window"] == 4096
    assert after - before < 20 * MiB, f"RSS grew {(after - before) / MiB:.1f} MiB over {measured} jobs"
