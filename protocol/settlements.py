"""Settlements: which gateway API key each signed receipt was billed to.

Receipts are signed by executors, which never see a gateway's API keys (a key is the
gateway's business, and an executor could lie about one anyway). So the gateway that
settles a job appends one `Settlement` to the JetStream stream `LLOOM_SETTLEMENTS`
(subject `lloom.v1.settlements.<key id>`), naming the receipt by its executor key and seq.
`lloom receipts report --by-key` reads it and joins it to the receipts it verified: the
cost per key is the cost of verified receipts, never a number the gateway made up.

A stream rather than a KV bucket: settlements are an append-only audit (one per job,
never changed), and a stream keeps every one of them with de-duplication by
`Nats-Msg-Id` (the receipt's `<executor key>:<seq>`), so a gateway's retry cannot bill
twice. The running total a budget is checked against lives in the keys bucket
(executor/gateway/keystore.py); this stream is what it can be audited against.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from protocol import subjects as subj
from protocol.jetstream import ensure_stream

STREAM = subj.SETTLEMENTS_STREAM


class Settlement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    key_id: str
    key_name: str
    job_id: str
    executor_id: str
    executor_key: str
    receipt_seq: int
    cost: Decimal  # USD, the receipt's cost
    held: Decimal  # USD held for the job before it ran (the estimate)
    gateway: str  # the gateway's client id
    at_ms: int


settlement_decoder = msgspec.json.Decoder(Settlement)
_encode = msgspec.json.encode


def msg_id(executor_key: str, seq: int) -> str:
    return f"{executor_key}:{seq}"


def stream_config() -> StreamConfig:
    # Deletes and purges denied: an audit trail that its writers cannot rewrite.
    return StreamConfig(name=STREAM, subjects=[subj.SETTLEMENTS_ALL], storage=StorageType.FILE,
                        deny_delete=True, deny_purge=True, duplicate_window=600.0)  # fmt: skip


async def ensure(js: JetStreamContext) -> None:
    await ensure_stream(js, stream_config())


async def publish(js: JetStreamContext, s: Settlement, *, timeout: float = 5.0) -> None:
    await js.publish(subj.settlement_subject(s.key_id), _encode(s), timeout=timeout,
                     headers={subj.HDR_MSG_ID: msg_id(s.executor_key, s.receipt_seq)})  # fmt: skip


async def read_all(nc: NATS, *, timeout: float = 5.0) -> dict[tuple[str, int], Settlement]:
    """Every settlement, by (executor key, receipt seq); empty when the stream does not exist."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        return {}
    out: dict[tuple[str, int], Settlement] = {}
    if info.state.messages == 0:
        return out
    # `stream=` spares a lookup of the stream by subject (which the gateway role may not make).
    sub = await js.subscribe(subj.SETTLEMENTS_ALL, stream=STREAM, ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            try:
                s = settlement_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass  # not ours to bill: the report counts receipts, and this names none
            else:
                out[(s.executor_key, s.receipt_seq)] = s
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()
