"""What a caller makes of replies: decoding, and which failures another executor might not have.

Shared by the unary path (`client.py`) and streams (`stream.py`).
"""

from __future__ import annotations

import asyncio

import msgspec

from protocol.errors import DeadlineExceeded, ExecutorBusy, InternalError, LloomError, ModelNotFound, NoExecutors

Waiter = asyncio.Future[bytes] | asyncio.Queue[bytes | LloomError]
Target = tuple[str, str | None]  # (model, executor id or None for the model's queue group)


def fails_over(err: LloomError) -> bool:
    """Whether another executor may succeed where this one failed."""
    return err.retryable or isinstance(err, (NoExecutors, ExecutorBusy, ModelNotFound, DeadlineExceeded))


def no_responders(target: Target) -> NoExecutors:
    model, executor = target
    if executor:
        return NoExecutors(f"executor {executor!r} is not on the network")
    return NoExecutors(f"no executor on the network serves model {model!r}")


def decode_reply(decoder: msgspec.json.Decoder, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as e:
        raise InternalError(f"malformed reply from executor: {e}") from e


def fail(waiter: Waiter, err: LloomError) -> None:
    if isinstance(waiter, asyncio.Queue):
        waiter.put_nowait(err)
    elif not waiter.done():
        waiter.set_exception(err)
