"""Coalescing concurrent jobs into one backend call (the seed's "Request Batching").

Two OpenAI endpoints take arrays: `/v1/embeddings` (`input`) and the legacy
`/v1/completions` (`prompt`). A server computes such an array for little more
than one item costs it (one forward pass, one HTTP exchange), so jobs that
arrive together and can share a call (same model, and for completions the same
sampling parameters) do:

- a batch opens with its first job and leaves at the end of that event-loop
  turn (or `window_s` later, when configured), taking every job that arrived
  meanwhile, up to `max_inputs` inputs;
- while `max_calls` calls for that key are already running, the batch keeps
  filling and leaves as soon as one of them returns (or once it is full: a full
  batch gains nothing by waiting): at low load a job waits for nothing, under
  load batches grow by themselves;
- each job gets its own results and a share of the call's tokens in
  proportion to the length of its inputs (and, for completions, of its
  outputs): exact when it went alone, summing exactly to what was reported;
- a call that fails because of its input (not the backend) is split up, each
  job alone, so one bad job cannot fail its neighbours; a job that is
  cancelled leaves the call running for the others.

`Coalescer` is the mechanism; `Batcher` is what the node uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import msgspec

from executor.backends.base import EmbeddingBackend, Embeddings, TextBackend, TextCompletions, TextParams
from protocol.errors import BackendError, InvalidRequest, LloomError
from protocol.status import BatchingStatus

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")  # what one backend call returns
P = TypeVar("P")  # one job's part of it


class _Job(Generic[P]):
    __slots__ = ("future", "inputs")

    def __init__(self, inputs: list[str], future: asyncio.Future[tuple[P, int]]) -> None:
        self.inputs = inputs
        self.future = future


class _Batch(Generic[P]):
    __slots__ = ("due", "jobs", "size")

    def __init__(self) -> None:
        self.jobs: list[_Job[P]] = []
        self.size = 0
        self.due = False  # its window has passed: it leaves when a call slot is free


class Coalescer(Generic[K, R, P]):
    """Jobs (lists of inputs) under the same key share `call(key, inputs)`; `split` gives each its part."""

    def __init__(
        self,
        call: Callable[[K, list[str]], Awaitable[R]],
        split: Callable[[R, list[list[str]]], list[P]],
        *,
        window_s: float = 0.0,
        max_inputs: int = 256,
        max_calls: int = 2,
    ) -> None:
        self._call_backend = call
        self._split = split
        self.window_s = window_s
        self.max_inputs = max_inputs
        self.max_calls = max_calls
        self._open: dict[K, _Batch[P]] = {}
        self._running: dict[K, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.jobs = 0

    async def submit(self, key: K, inputs: list[str]) -> tuple[P, int]:
        """This job's part of a shared call, and how many jobs shared it."""
        loop = asyncio.get_running_loop()
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
        job: _Job[P] = _Job(inputs, loop.create_future())
        batch.jobs.append(job)
        batch.size += len(inputs)
        if batch.size >= self.max_inputs:
            self._send(key)
        return await job.future

    def _due(self, key: K, batch: _Batch[P]) -> None:
        if self._open.get(key) is not batch:
            return  # already sent (it filled up)
        batch.due = True
        if self._running.get(key, 0) < self.max_calls:
            self._send(key)

    def _send(self, key: K) -> None:
        batch = self._open.pop(key)
        self._running[key] = self._running.get(key, 0) + 1
        task = asyncio.get_running_loop().create_task(self._call(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, key: K, batch: _Batch[P]) -> None:
        try:
            await self._serve(key, batch.jobs)
        finally:
            self._running[key] -= 1
            waiting = self._open.get(key)
            if waiting is not None and waiting.due:
                self._send(key)  # what piled up while the call ran

    async def _serve(self, key: K, jobs: list[_Job[P]]) -> None:
        self.calls += 1
        self.jobs += len(jobs)
        try:
            result = await self._call_backend(key, [text for job in jobs for text in job.inputs])
            parts = self._split(result, [job.inputs for job in jobs])
        except LloomError as e:
            if len(jobs) > 1 and not isinstance(e, BackendError):
                # The input was refused, not the backend: find whose, each job alone.
                await asyncio.gather(*(self._serve(key, [job]) for job in jobs))
                return
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        except BaseException:  # the batcher is closing (or a bug): nobody waits for ever
            for job in jobs:
                job.future.cancel()
            raise
        for job, part in zip(jobs, parts, strict=True):
            if not job.future.done():  # a cancelled job's part is dropped; the others' stand
                job.future.set_result((part, len(jobs)))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- what the node batches -------------------------------------------------------------


class Share(msgspec.Struct, frozen=True):
    embeddings: Embeddings  # this job's vectors and prompt tokens
    batched_with: int  # jobs that shared the backend call (1: alone)
    apportioned: bool  # tokens are a share of the call's, not counted for this job alone


class TextShare(msgspec.Struct, frozen=True):
    completions: TextCompletions  # this job's one choice and its tokens
    batched_with: int
    apportioned: bool


class Batcher:
    """The node's batching: embeddings by (model, dimensions), text completions by (model, parameters)."""

    def __init__(self, backend: object, *, window_s: float = 0.0, max_inputs: int = 256, max_calls: int = 2) -> None:
        self.backend = backend
        opts = {"window_s": window_s, "max_inputs": max_inputs, "max_calls": max_calls}
        self._embeddings: Coalescer[tuple[str, int | None], Embeddings, Embeddings] = Coalescer(
            self._embed_call, _split_embeddings, **opts
        )
        self._texts: Coalescer[tuple[str, TextParams], TextCompletions, TextCompletions] = Coalescer(
            self._text_call, _split_texts, **opts
        )

    def status(self) -> BatchingStatus:
        calls = self._embeddings.calls + self._texts.calls
        jobs = self._embeddings.jobs + self._texts.jobs
        return BatchingStatus(calls=calls, jobs=jobs, jobs_per_call=round(jobs / calls, 2) if calls else None)

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Share:
        part, n = await self._embeddings.submit((model, dimensions), inputs)
        return Share(part, n, n > 1)

    async def complete_text(self, model: str, prompt: str, params: TextParams) -> TextShare:
        part, n = await self._texts.submit((model, params), [prompt])
        return TextShare(part, n, n > 1)

    async def aclose(self) -> None:
        await self._embeddings.aclose()
        await self._texts.aclose()

    async def _embed_call(self, key: tuple[str, int | None], inputs: list[str]) -> Embeddings:
        if not isinstance(self.backend, EmbeddingBackend):
            raise InvalidRequest(f"{getattr(self.backend, 'name', 'the backend')} does not compute embeddings")
        return await self.backend.embed(key[0], inputs, key[1])

    async def _text_call(self, key: tuple[str, TextParams], prompts: list[str]) -> TextCompletions:
        if not isinstance(self.backend, TextBackend):
            raise InvalidRequest(f"{getattr(self.backend, 'name', 'the backend')} does not serve text completions")
        return await self.backend.complete_texts(key[0], prompts, key[1])


def _split_embeddings(result: Embeddings, jobs: list[list[str]]) -> list[Embeddings]:
    shares = apportion(result.prompt_tokens, [sum(len(t) for t in inputs) for inputs in jobs])
    parts, start = [], 0
    for inputs, tokens in zip(jobs, shares, strict=True):
        end = start + len(inputs)
        parts.append(Embeddings(model=result.model, vectors=result.vectors[start:end], prompt_tokens=tokens,
                                estimated=result.estimated))  # fmt: skip
        start = end
    return parts


def _split_texts(result: TextCompletions, jobs: list[list[str]]) -> list[TextCompletions]:
    prompt = apportion(result.prompt_tokens, [len(inputs[0]) for inputs in jobs])
    completion = apportion(result.completion_tokens, [len(choice.text) for choice in result.choices])
    return [
        TextCompletions(model=result.model, choices=[choice], prompt_tokens=p, completion_tokens=c,
                        estimated=result.estimated)  # fmt: skip
        for choice, p, c in zip(result.choices, prompt, completion, strict=True)
    ]


def apportion(total: int, weights: list[int]) -> list[int]:
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
