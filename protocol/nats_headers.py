"""NATS message headers parsed as nats-py parses them, without its per-character check of every name.

nats-py (2.16) rejects a header name holding whitespace with `any(c.isspace() for c in key)`, a
generator step per character: about 80 of them for a job's headers, the largest single cost of
receiving a job after the parser itself. One precompiled regex search gives the same answer
(`\\s` on a str is `str.isspace`), so `connect_nats` gives each connection this function in place
of the library's (an attribute of that connection object only: nothing global changes).
`tests/test_nats_headers.py` checks the two agree, character by character and on malformed blocks.
"""

from __future__ import annotations

import re

_CRLF = b"\r\n"
_WHITESPACE = re.compile(r"\s")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Name: Value\\r\\n` lines to a dict: what nats-py's `Client._parse_header_lines` returns."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:  # also an empty line
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:  # a non-ASCII name is skipped, as nats-py does
            continue
        if _WHITESPACE.search(key) is not None:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install(nc: object) -> None:
    """Make connection `nc` parse headers with `parse_header_lines` (its own attribute, looked up first)."""
    nc._parse_header_lines = parse_header_lines  # type: ignore[attr-defined]
