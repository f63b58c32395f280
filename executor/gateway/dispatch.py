"""Run one chat job through a routing plan: target after target until one answers.

For each model of the plan (in fallback order) the targets come from
`routing.targets_for`; an error another executor or model might not have
(`protocol.replies.fails_over`: no executors, busy, unavailable, model not found, ...)
moves on to the next target while the deadline lasts; any other error, or the last
one, is raised. A stream moves on only before its first chunk: text already sent
cannot be taken back. Each attempt is one `LloomClient.complete` / `stream` call,
which itself retries `busy` on a queue group and verifies the reply's receipt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec

from executor.gateway.routing import Plan, Target, targets_for
from protocol.client import LloomClient
from protocol.errors import DeadlineExceeded, LloomError, NoExecutors
from protocol.messages import ChatRequest, ChatResponse, StreamChunk
from protocol.replies import fails_over
from protocol.stream import ChatStream


async def _targets(client: LloomClient, plan: Plan, request: ChatRequest) -> AsyncIterator[Target]:
    errors: list[LloomError] = []
    for model in plan.models:
        try:
            for target in await targets_for(client, plan, request, model):
                yield target
        except NoExecutors as e:
            errors.append(e)
    if errors:
        raise errors[0] if len(plan.models) == 1 else errors[-1]


def _job(request: ChatRequest, target: Target) -> ChatRequest:
    return request if target.model == request.model else msgspec.structs.replace(request, model=target.model)


async def complete(client: LloomClient, plan: Plan, request: ChatRequest, timeout: float) -> ChatResponse:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: LloomError | None = None
    try:
        async for target in _targets(client, plan, request):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                return await client.complete(_job(request, target), timeout=left, executor=target.executor)
            except LloomError as e:
                if not fails_over(e):
                    raise
                last = e
    except NoExecutors as e:
        raise last if last is not None and not isinstance(last, NoExecutors) else e from None
    if last is not None:
        raise last
    raise DeadlineExceeded("the deadline passed before any executor could be tried")


class OpenedStream:
    """A stream whose first chunk has arrived (or that ended without any): safe to answer 200 from here on."""

    def __init__(self, stream: ChatStream, chunks: AsyncIterator[StreamChunk], first: StreamChunk | None,
                 target: Target) -> None:  # fmt: skip
        self.stream = stream
        self.chunks = chunks
        self.first = first
        self.target = target

    async def aclose(self) -> None:
        await self.chunks.aclose()  # type: ignore[attr-defined]
        await self.stream.aclose()


async def open_stream(client: LloomClient, plan: Plan, request: ChatRequest, timeout: float) -> OpenedStream:
    """Start the stream on the first target that produces a chunk (or a complete empty answer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: LloomError | None = None
    try:
        async for target in _targets(client, plan, request):
            left = deadline - loop.time()
            if left <= 0:
                break
            stream = client.stream(_job(request, target), timeout=left, executor=target.executor)
            chunks = aiter(stream)
            try:
                first = await anext(chunks, None)
            except LloomError as e:
                await stream.aclose()
                if not fails_over(e):
                    raise
                last = e
                continue
            except BaseException:
                await stream.aclose()
                raise
            return OpenedStream(stream, chunks, first, target)
    except NoExecutors as e:
        raise last if last is not None and not isinstance(last, NoExecutors) else e from None
    if last is not None:
        raise last
    raise DeadlineExceeded("the deadline passed before any executor could be tried")
