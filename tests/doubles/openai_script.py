"""Scripted answers for the OpenAI test double: tool calls, reasoning, a chosen text.

A test puts `Answer`s in `OpenAIDouble.answers`; each chat request takes the next one
(plain requests get the double's `tok0 tok1 ...` when the list is empty). The double
renders an answer in OpenAI's wire format, unary or streamed: tool calls in one
message, or in a stream as pieces by `index` (the first with id and name, then the
arguments in fragments; `interleave` alternates the pieces of parallel calls as
vLLM and OpenAI do), reasoning under `reasoning_content` (or `reasoning`) in pieces
of its own, `usage.completion_tokens_details.reasoning_tokens`. `cut_after_tool_pieces`
resets the connection after that many tool-call pieces. Log probabilities are
rendered by the double itself when a request asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScriptedCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class Answer:
    content: str | None = None  # None: the double's usual tokens (none at all when there are tool calls)
    tool_calls: tuple[ScriptedCall, ...] = ()
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"  # or "reasoning", as some servers name it
    interleave: bool = False
    fragment: int = 4  # characters of arguments per streamed piece
    cut_after_tool_pieces: int | None = None
    finish_reason: str | None = None  # default: tool_calls with calls, else stop
    extra: dict[str, Any] = field(default_factory=dict)  # more keys of the unary message

    def texts(self, default: list[str]) -> list[str]:
        """The content pieces (one per token) of this answer."""
        if self.content is not None:
            return [w + " " for w in self.content.split(" ")] if self.content else []
        return [] if self.tool_calls else default

    def reasoning_pieces(self) -> list[str]:
        return [w + " " for w in self.reasoning.split(" ")] if self.reasoning else []

    def finish(self, default: str) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else default)

    def message(self, text: str) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": text or (None if self.tool_calls else "")}
        if self.reasoning:
            msg[self.reasoning_field] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]  # fmt: skip
        return {**msg, **self.extra}

    def tool_pieces(self) -> list[dict[str, Any]]:
        """The streamed pieces of the tool calls, in the order they are sent."""
        per_call = []
        for index, c in enumerate(self.tool_calls):
            first = {"index": index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
            rest = [{"index": index, "function": {"arguments": c.arguments[k:k + self.fragment]}}
                    for k in range(0, len(c.arguments), self.fragment)]  # fmt: skip
            per_call.append([first, *rest])
        if not self.interleave:
            return [p for pieces in per_call for p in pieces]
        out = []
        for k in range(max((len(p) for p in per_call), default=0)):
            out += [pieces[k] for pieces in per_call if k < len(pieces)]
        return out
