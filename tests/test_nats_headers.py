"""protocol/nats_headers.py parses exactly as nats-py does, and a connection made by connect_nats uses it."""

from __future__ import annotations

import nats
import pytest
from nats.aio.client import Client as NATS

from executor.process.embedded_nats import EmbeddedNats
from protocol.connection import connect_nats
from protocol.nats_headers import parse_header_lines

BLOCKS = [
    b"Lloom-Job-Id: abc\r\nLloom-Client: c1\r\n\r\n",
    b"A:1\r\nB:\t2 \r\nC:  \r\n",  # no space after the colon, a tab, an empty value
    b"Bad Name: x\r\nGood: y\r\n",  # whitespace inside a name: skipped
    b"Tab\tName: x\r\n\x1cSep: y\r\nSep\x1f: z\r\n",  # ASCII separators count as whitespace in str.isspace
    b"No-Colon\r\n\r\n: empty name\r\n",
    "Caf\u00e9: x\r\nOk: caf\u00e9\r\n".encode(),  # a non-ASCII name skipped; a UTF-8 value kept
    b"Bad-Utf8: \xff\xfe\r\n",  # replaced, not raised
    b"Dup: 1\r\nDup: 2\r\n",  # the last wins
    b"Colons: a:b:c\r\n",
    b"",
]


@pytest.mark.parametrize("raw", BLOCKS)
def test_it_parses_every_block_as_nats_py_does(raw: bytes) -> None:
    assert parse_header_lines(raw) == NATS._parse_header_lines(raw)


def test_every_ascii_character_in_a_name_is_judged_as_nats_py_judges_it() -> None:
    for code in range(128):
        raw = b"X" + bytes([code]) + b"Y: v\r\n"
        assert parse_header_lines(raw) == NATS._parse_header_lines(raw), repr(chr(code))


async def test_a_connection_from_connect_nats_receives_headers_through_it(nats_server: EmbeddedNats) -> None:
    nc = await connect_nats(nats_server.url, name="hdr-test")
    plain = await nats.connect(nats_server.url)
    try:
        assert nc._parse_header_lines is parse_header_lines
        assert plain._parse_header_lines is not parse_header_lines  # only our connections: nothing global
        sub = await nc.subscribe("hdr.test")
        await nc.flush()  # the server knows the subscription before anything is published
        await plain.publish("hdr.test", b"x", headers={"Lloom-Job-Id": "j1", "Lloom-Client": "caf\u00e9"})
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {"Lloom-Job-Id": "j1", "Lloom-Client": "caf\u00e9"}
    finally:
        await plain.close()
        await nc.close()
