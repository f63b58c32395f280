"""Bounded waits: the one place tests wait for something to happen.

Prefer waiting on the thing itself (an event, a log line, a subscription, a
catalogue change) with `within`. `eventually` is for conditions nothing
announces (another process's death, a stream emptied by acks, a key written
in the background): it polls the condition until it holds or a deadline
passes, and a missed deadline fails the test with what was awaited, instead
of a hang or a fixed sleep that is too short on a loaded machine.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

# Upper bound for any one thing to happen (a start, an exit, an answer); tests take far
# less, this only turns a hang into a failure with a message.
WAIT_S = 10.0
# How often `eventually` looks again: short against any deadline, long enough not to spin.
POLL_S = 0.02


async def within(aw: Awaitable[T], what: str, timeout: float = WAIT_S) -> T:
    """Await `aw`, failing the test with `what` if it takes longer than `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout}s")


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = POLL_S,
) -> T:
    """The first truthy value of `condition()` (sync or async), polled every `interval`.

    Fails the test naming `what` (a string, or a function giving one with the
    latest details) when `timeout` passes first, even if an async condition hangs."""
    try:
        async with asyncio.timeout(timeout) as deadline:
            while True:
                value = condition()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value  # type: ignore[return-value]
                await asyncio.sleep(interval)  # the polling pace; the deadline bounds the wait
    except TimeoutError:
        if not deadline.expired():
            raise  # the condition's own timeout, not ours
        pytest.fail(f"{what() if callable(what) else what}: not within {timeout}s")
