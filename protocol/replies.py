"""What a caller makes of replies: decoding, which failures another executor might not have,
and the error for a job nobody took (with the models served and the closest name).

Shared by the unary path (`client.py`) and streams (`stream.py`).
"""

from __future__ import annotations

import asyncio
import difflib

import msgspec

from protocol.errors import (
    DeadlineExceeded,
    ExecutorBusy,
    InternalError,
    LloomError,
    ModelNotFound,
    NoExecutors,
    ReplyForged,
    UnsupportedFeature,
)

Waiter = asyncio.Future[bytes] | asyncio.Queue[bytes | LloomError]
Target = tuple[str, str | None]  # (model, executor id or None for the model's queue group)


def fails_over(err: LloomError) -> bool:
    """Whether another executor may succeed where this one failed."""
    # ReplyForged: only forgeries came from (or in the name of) that executor; another may answer genuinely.
    # UnsupportedFeature: refused before it ran, by an executor whose offer changed since the catalogue saw it.
    return err.retryable or isinstance(err, (NoExecutors, ExecutorBusy, ModelNotFound, UnsupportedFeature,
                                             DeadlineExceeded, ReplyForged))


def no_responders(target: Target, served: list[str] | None = None) -> NoExecutors:
    """The error for a job nobody took; with `served` (the catalogue's model names), it names them and the
    one closest to the model asked for."""
    model, executor = target
    if executor:
        return NoExecutors(f"executor {executor!r} is not on the network")
    message = f"no executor serves model {model!r}"
    if served is None:
        return NoExecutors(message)
    if not served:
        return NoExecutors(f"{message} (no executor on the network serves any model)", available_models=[])
    suggestion = closest_model(model, served)
    message += f" (served: {', '.join(served)})" + (f"; did you mean {suggestion}?" if suggestion else "")
    return NoExecutors(message, available_models=served, suggestion=suggestion)


def closest_model(model: str, served: list[str]) -> str | None:
    """The served name `model` most likely meant: itself in another case, else difflib's closest, if any is close."""
    by_folded: dict[str, str] = {}
    for name in served:
        by_folded.setdefault(name.casefold(), name)
    folded = model.casefold()
    if folded in by_folded:
        # The same name is no suggestion (served, but not for what was asked, e.g. embeddings).
        return by_folded[folded] if by_folded[folded] != model else None
    close = difflib.get_close_matches(folded, list(by_folded), n=1)
    if close:
        return by_folded[close[0]]
    # A short form of one served name (`smollm2` for `smollm2-135m-instruct`): difflib's ratio
    # punishes the missing length, but a name that only one served model starts with is clear.
    starting = [name for key, name in by_folded.items() if key.startswith(folded)]
    return starting[0] if len(starting) == 1 else None


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
