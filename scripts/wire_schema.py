"""Write docs/wire-schema.json, the JSON Schema of every protocol v1 message.

The schema is generated from the msgspec Structs in protocol/messages.py and
checked in, so a change to the wire shows up in review; tests/test_wire_schema.py
fails when the file is stale. Usage: python scripts/wire_schema.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from protocol.announcements import Announcement, Heartbeat
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

OUT = Path(__file__).resolve().parent.parent / "docs" / "wire-schema.json"
MESSAGES = (ChatRequest, ChatResponse, StreamChunk, StreamEnd, ErrorReply, EmbeddingRequest, EmbeddingResponse,
            TextRequest, TextResponse, Announcement, Heartbeat)


def render() -> bytes:
    (schemas, components) = msgspec.json.schema_components(MESSAGES, ref_template="#/$defs/{name}")
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Lloom wire protocol v1",
        "description": "Messages on lloom.v1.* subjects; see docs/protocol.md.",
        "oneOf": list(schemas),
        "$defs": components,
    }
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


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
