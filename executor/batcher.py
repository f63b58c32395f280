"""Coalescing concurrent embedding jobs into one backend call (the seed's "Request Batching").

Embedding endpoints take an array of inputs, and a server computes a batch for
little more than one input costs it (one forward pass, one HTTP exchange). So
jobs for the same model and dimensions that arrive together share a call:

- a batch opens with its first job and leaves at the end of that event-loop
  turn (or `window_s` later, when configured), taking every job that arrived
  meanwhile, up to `max_inputs` inputs;
- while `max_calls` calls for that model are already running, the batch keeps
  filling and leaves as soon as one of them returns (or once it is full: a full
  batch gains nothing by waiting): at low load a job waits for nothing, under
  load batches grow by themselves;
- each job gets its own vectors and a share of the call's prompt tokens in
  proportion to the length of its inputs (exact when it went alone);
- a call that fails because of its input (not the backend) is split up, each
  job alone, so one bad job cannot fail its neighbours; a job that is
  cancelled leaves the call running for the others.
"""

from __future__ import annotations

import asyncio

import msgspec

from executor.backends.base import EmbeddingBackend, Embeddings
from protocol.errors import BackendError, LloomError

_Key = tuple[str, int | None]  # model, dimensions


class Share(msgspec.Struct, frozen=True):
    embeddings: Embeddings  # this job's vectors and prompt tokens
    batched_with: int  # jobs that shared the backend call (1: alone)
    apportioned: bool  # prompt tokens are a share of the call's, not counted for this job alone


class _Job:
    __slots__ = ("future", "inputs")

    def __init__(self, inputs: list[str], future: asyncio.Future[Share]) -> None:
        self.inputs = inputs
        self.future = future


class _Batch:
    __slots__ = ("due", "jobs", "size")

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.size = 0
        self.due = False  # its window has passed: it leaves when a call slot is free


class EmbeddingBatcher:
    def __init__(
        self, backend: EmbeddingBackend, *, window_s: float = 0.0, max_inputs: int = 256, max_calls: int = 2
    ) -> None:
        self.backend = backend
        self.window_s = window_s
        self.max_inputs = max_inputs
        self.max_calls = max_calls
        self._open: dict[_Key, _Batch] = {}
        self._running: dict[_Key, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.jobs = 0

    def status(self) -> dict[str, object]:
        return {"calls": self.calls, "jobs": self.jobs, "jobs_per_call": round(self.jobs / self.calls, 2) if self.calls else None}

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Share:
        loop = asyncio.get_running_loop()
        key = (model, dimensions)
        batch = self._open.get(key)
        if batch is not None and batch.size + len(inputs) > self.max_inputs:
            self._send(key)  # full: it goes now, whatever the window, and this job opens the next
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch()
            if self.window_s > 0:
                loop.call_later(self.window_s, self._due, key, batch)
            else:
                loop.call_soon(self._due, key, batch)
        job = _Job(inputs, loop.create_future())
        batch.jobs.append(job)
        batch.size += len(inputs)
        if batch.size >= self.max_inputs:
            self._send(key)
        return await job.future

    def _due(self, key: _Key, batch: _Batch) -> None:
        if self._open.get(key) is not batch:
            return  # already sent (it filled up)
        batch.due = True
        if self._running.get(key, 0) < self.max_calls:
            self._send(key)

    def _send(self, key: _Key) -> None:
        batch = self._open.pop(key)
        self._running[key] = self._running.get(key, 0) + 1
        task = asyncio.get_running_loop().create_task(self._call(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, key: _Key, batch: _Batch) -> None:
        model, dimensions = key
        try:
            await self._serve(model, dimensions, batch.jobs)
        finally:
            self._running[key] -= 1
            waiting = self._open.get(key)
            if waiting is not None and waiting.due:
                self._send(key)  # what piled up while the call ran

    async def _serve(self, model: str, dimensions: int | None, jobs: list[_Job]) -> None:
        inputs = [text for job in jobs for text in job.inputs]
        self.calls += 1
        self.jobs += len(jobs)
        try:
            result = await self.backend.embed(model, inputs, dimensions)
        except LloomError as e:
            if len(jobs) > 1 and not isinstance(e, BackendError):
                # The input was refused, not the backend: find whose, each job alone.
                await asyncio.gather(*(self._serve(model, dimensions, [job]) for job in jobs))
                return
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        except BaseException:  # the batcher is closing (or a bug): nobody waits for ever
            for job in jobs:
                job.future.cancel()
            raise
        shares = _apportion(result.prompt_tokens, [sum(len(t) for t in job.inputs) for job in jobs])
        start = 0
        for job, tokens in zip(jobs, shares, strict=True):
            end = start + len(job.inputs)
            if not job.future.done():  # a cancelled job's vectors are dropped; the others' stand
                part = Embeddings(model=result.model, vectors=result.vectors[start:end], prompt_tokens=tokens,
                                  estimated=result.estimated)  # fmt: skip
                job.future.set_result(Share(part, len(jobs), len(jobs) > 1))
            start = end

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, in whole tokens that add up to it (largest remainder)."""
    weight = sum(weights)
    if weight == 0:
        weights, weight = [1] * len(weights), len(weights)
    exact = [total * w / weight for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
