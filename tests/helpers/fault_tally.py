"""Counting one fault scenario: jobs attempted / completed / failed typed / lost / run twice, and receipts.

`Tally` runs each job with a marker in its prompt, so the OpenAI double (`requests`,
`completed_requests`) tells how often each job reached the backend and ran to the end.
A call that neither answers nor fails within its deadline plus `GRACE_S` is lost; an
untyped exception counts as lost too. `Tally.receipts` waits until every executor's
outbox is empty (from its status), then reads the cluster's receipts stream and compares
it with the receipts callers hold. `record` appends the figures to the JSON-lines file
named by `LLOOM_CLUSTER_FAULTS_FIGURES` (scripts/faults_cluster.py reads it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.errors import LloomError
from protocol.receipts import SignedReceipt
from protocol.status import ExecutorStatus, status_decoder
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.cluster import Cluster
from tests.helpers.jobs import ask
from tests.helpers.wait import eventually

DEADLINE_S = 20.0  # each job's own deadline (the client's timeout)
GRACE_S = 5.0  # past its deadline, a call that has neither answered nor failed is lost
SETTLE_S = 30.0  # bound for the cluster to settle (a reconnect, an outbox emptied); turns a hang into a failure


@dataclass
class Tally:
    """What happened to one scenario's jobs and receipts."""

    scenario: str
    backend: OpenAIDouble
    attempted: int = 0
    completed: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    untyped: list[str] = field(default_factory=list)
    held: list[SignedReceipt] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def job(self, name: str) -> str:
        marker = f"{self.scenario} / {name}"
        self.markers.append(marker)
        self.attempted += 1
        return marker

    def _failed(self, e: BaseException) -> None:
        if isinstance(e, LloomError):
            self.typed[e.code.value] += 1
            if isinstance(e.receipt, SignedReceipt):
                self.held.append(e.receipt)
        elif isinstance(e, TimeoutError):
            self.lost += 1
        else:
            self.lost += 1
            self.untyped.append(repr(e))

    async def unary(self, client: LloomClient, name: str) -> None:
        marker = self.job(name)
        try:
            async with asyncio.timeout(DEADLINE_S + GRACE_S):
                reply = await client.complete(ask(text=marker), timeout=DEADLINE_S)
        except Exception as e:  # noqa: BLE001 - every way a call ends is counted
            self._failed(e)
            return
        self.completed += 1
        if reply.receipt is not None:
            self.held.append(reply.receipt)

    async def stream(self, client: LloomClient, name: str, chunks: int, *, read_gap_s: float = 0.0) -> None:
        marker = self.job(name)
        seqs: list[int] = []
        try:
            async with asyncio.timeout(DEADLINE_S + GRACE_S):
                async with client.stream(ask(text=marker), timeout=DEADLINE_S) as stream:
                    async for chunk in stream:
                        seqs.append(chunk.seq)
                        if read_gap_s:
                            await asyncio.sleep(read_gap_s)  # the behaviour: a reader slower than the stream
                    end = stream.end
        except Exception as e:  # noqa: BLE001
            self._failed(e)
            return
        if seqs != list(range(chunks)):
            self.lost += 1  # a stream returned short or out of order, without an error: data lost
            self.untyped.append(f"stream returned chunks {seqs[:3]}..{seqs[-3:]} of {chunks}")
            return
        self.completed += 1
        if end is not None and end.receipt is not None:
            self.held.append(end.receipt)

    def backend_counts(self) -> dict[str, int]:
        mine = set(self.markers)
        calls = Counter(_marker(r) for r in self.backend.requests)
        done = Counter(_marker(r) for r in self.backend.completed_requests)
        return {
            "retried": sum(1 for m in mine if calls[m] > 1),  # reached the backend more than once
            "run_twice": sum(1 for m in mine if done[m] > 1),  # ran to the end more than once
        }

    async def receipts(self, cluster: Cluster, executors: list[str]) -> dict[str, int]:
        """Once every executor's outbox is empty: receipts expected (held), stored, duplicated, missing."""
        async def emptied() -> bool:
            return all([await _unpublished(cluster, e) == 0 for e in executors])

        await eventually(emptied, timeout=SETTLE_S, what="every executor's outbox emptied into the stream")
        stored = await cluster.receipts()
        keys = Counter((s.receipt.executor_id, s.receipt.seq) for s in stored)
        stored_jobs = {s.receipt.job_id for s in stored}
        held_jobs = {s.receipt.job_id for s in self.held}
        return {
            "receipts_expected": len(self.held),
            "receipts_stored": len(keys),
            "receipts_duplicated": sum(n - 1 for n in keys.values()),
            "receipts_missing": len(held_jobs - stored_jobs),
            # Work billed whose answer no caller took (a run whose caller had moved on): not lost, not
            # duplicated, but paid for twice when the job ran again elsewhere.
            "receipts_unclaimed": len(stored_jobs - held_jobs),
        }

    def record(self, **figures: object) -> dict[str, object]:
        row = {"scenario": self.scenario, "attempted": self.attempted, "completed": self.completed,
               "failed_typed": sum(self.typed.values()), "lost": self.lost, "typed": dict(self.typed),
               "untyped": self.untyped[:3], **self.backend_counts(), **self.figures, **figures}  # fmt: skip
        out = os.environ.get("LLOOM_CLUSTER_FAULTS_FIGURES")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def _marker(body: dict[str, object]) -> str:
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else {}
    return str(last.get("content", "")) if isinstance(last, dict) else ""


async def executor_status(cluster: Cluster, executor_id: str) -> ExecutorStatus:
    async with cluster.admin() as nc:
        return status_decoder.decode((await nc.request(subj.status_subject(executor_id), b"", timeout=2)).data)


async def _unpublished(cluster: Cluster, executor_id: str) -> int:
    try:
        receipts = (await executor_status(cluster, executor_id)).receipts
    except Exception:  # noqa: BLE001 - not answering yet (reconnecting): ask again
        return -1
    return receipts.unpublished if receipts else 0


async def idle(cluster: Cluster, executor_id: str) -> bool:
    return (await executor_status(cluster, executor_id)).in_flight == 0


def since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def assert_goals(row: dict[str, object], receipts: dict[str, int]) -> None:
    """The issue's goals: nothing lost, every call ended, nothing run twice, every receipt stored once."""
    assert row["lost"] == 0, row
    assert row["completed"] + row["failed_typed"] == row["attempted"], row  # type: ignore[operator]
    assert row["run_twice"] == 0, row
    assert receipts["receipts_missing"] == 0, receipts
    assert receipts["receipts_duplicated"] == 0, receipts
