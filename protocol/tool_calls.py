"""Whole tool calls from the pieces a stream brings (`StreamChunk.tool_calls`).

A streamed tool call arrives as `ToolCallDelta`s keyed by `index`: the first piece
of a call carries its `id` and function name, the following ones fragments of its
JSON arguments; the pieces of parallel calls may interleave. `ToolCallAccumulator`
puts them back together in index order; `calls(finish_reason)` hands back complete
`ToolCall`s, or raises `StreamInterrupted` when the stream ended mid call (no end,
or a call that never got its id or name).
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.chat_types import FunctionCall, ToolCall, ToolCallDelta
from protocol.errors import StreamInterrupted


class _Partial:
    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class ToolCallAccumulator:
    """Collects tool-call pieces; see the module docstring."""

    def __init__(self) -> None:
        self._calls: dict[int, _Partial] = {}
        self.pieces: list[ToolCallDelta] = []  # every piece as it came (the receipt hashes them)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, pieces: Iterable[ToolCallDelta]) -> None:
        for piece in pieces:
            self.pieces.append(piece)
            call = self._calls.get(piece.index)
            if call is None:
                call = self._calls[piece.index] = _Partial()
            if piece.id:
                call.id = piece.id
            fn = piece.function
            if fn is not None:
                if fn.name:
                    call.name = fn.name
                if fn.arguments:
                    call.arguments.append(fn.arguments)

    def calls(self, finished: bool = True) -> list[ToolCall]:
        """The complete calls in index order; `finished`: whether the stream reached its end."""
        out = []
        for index in sorted(self._calls):
            call = self._calls[index]
            args = "".join(call.arguments)
            if not finished or call.id is None or call.name is None:
                what = call.name or "a function"
                raise StreamInterrupted(
                    f"the stream ended mid tool call: call {index} ({what}) has"
                    f" {'no id' if call.id is None else 'no name' if call.name is None else 'no end'}"
                    f" after {len(args)} characters of arguments"
                )
            out.append(ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=args)))
        return out
