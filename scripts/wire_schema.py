"""Write docs/wire-schema.json, the JSON Schema of every protocol v1 message.

The schema is generated from the msgspec Structs in protocol/messages.py and
checked in, so a change to the wire shows up in review; tests/test_wire_schema.py
fails when the file is stale. Usage: python scripts/wire_schema.py [--check]
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import msgspec

from protocol.announcements import Announcement, Heartbeat
from protocol.resume import ResumeRequest
from protocol.messages import (
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorReply,
    StreamChunk,
    StreamEnd,
    TextRequest,
    TextResponse,
)
from protocol.micro import InfoResponse, PingResponse, StatsResponse
from protocol.results import SignedResult

OUT = Path(__file__).resolve().parent.parent / "docs" / "wire-schema.json"
MESSAGES = (ChatRequest, ChatResponse, StreamChunk, StreamEnd, ErrorReply, EmbeddingRequest, EmbeddingResponse,
            TextRequest, TextResponse, Announcement, Heartbeat, SignedResult, ResumeRequest,
            PingResponse, InfoResponse, StatsResponse)  # the last three: NATS micro discovery (ADR-32)


def normalized(node: object) -> object:
    """The schema with every docstring-derived text cleaned the same way, whatever msgspec did.

    msgspec 0.23 started dedenting docstring continuation lines itself; older releases kept
    them. Cleaning here (inspect.cleandoc is idempotent) makes the file the same under both.
    Releases also list the members of an `anyOf` (a set, in JSON Schema) in different orders.
    """
    if isinstance(node, dict):
        out = {
            k: inspect.cleandoc(v) if k in ("description", "title") and isinstance(v, str) else normalized(v)
            for k, v in node.items()
        }
        if isinstance(out.get("anyOf"), list):
            out["anyOf"] = sorted(out["anyOf"], key=lambda member: json.dumps(member, sort_keys=True))
        return out
    if isinstance(node, list):
        return [normalized(v) for v in node]
    return node


def render() -> bytes:
    (schemas, components) = msgspec.json.schema_components(MESSAGES, ref_template="#/$defs/{name}")
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Lloom wire protocol v1",
        "description": "Messages on lloom.v1.* subjects; see docs/protocol.md.",
        "oneOf": list(schemas),
        "$defs": components,
    }
    # Rendered by the standard library, not a library's formatter, so a dependency release
    # cannot change the bytes of the checked-in file.
    text = json.dumps(normalized(msgspec.to_builtins(doc)), indent=2, sort_keys=True, ensure_ascii=False)
    return text.encode() + b"\n"


def main(argv: list[str]) -> int:
    current = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_bytes() != current:
            print(f"{OUT} is stale: run python scripts/wire_schema.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_bytes(current)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
