"""What executors announce about themselves, and how announcements are signed and checked.

Two messages on `lloom.v1.catalog.announce`, both signed by the executor's
identity key (signature in the `Lloom-Sig` header, over the exact payload
bytes, so nothing needs re-encoding to verify):

- `Announcement`: the full offer (models, prices, context length, features,
  category, availability, measured performance) and load. Sent on start, on
  every change, in answer to a catalogue query, and with `state = "down"` on a
  graceful stop.
- `Heartbeat`: small and frequent (default every 0.5 s): load and the revision
  of the offer. A client that sees a revision newer than the one it holds asks
  the executor for its announcement.

Both carry `(epoch, seq)`: `epoch` is the executor's start time in ms and `seq`
counts messages since, so together they only ever grow for one key. A receiver
drops anything not newer than what it has seen from that key (a replay) or sent
too long ago (stale), and anything whose signature does not verify (forged).

Prices are decimal strings on the wire, never floats: `Pricing.unit` states
them in US dollars per million tokens.
"""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Literal

import msgspec

from protocol.identity import verify
from protocol.sealing import SealError, check_curve_key
from protocol.trust import Endorsement

PRICE_UNIT = "USD per 1M tokens"
HDR_SIGNATURE = "Lloom-Sig"


class ModelCategory(enum.StrEnum):
    FAST = "fast"
    BALANCED = "balanced"
    QUALITY = "quality"


class Pricing(msgspec.Struct, frozen=True, kw_only=True):
    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    unit: Literal["USD per 1M tokens"] = PRICE_UNIT

    def __post_init__(self) -> None:
        # msgspec has no range constraint for Decimal; a negative price is a forgery or a typo.
        if self.input < 0 or self.output < 0 or not (self.input.is_finite() and self.output.is_finite()):
            raise ValueError("prices must be finite and >= 0")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (self.input * prompt_tokens + self.output * completion_tokens) / 1_000_000


class Performance(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the executor measured serving this model recently (exponentially weighted)."""

    samples: int = 0
    latency_ms: float | None = None  # whole unary job, as seen by the executor
    ttft_ms: float | None = None  # time to the first streamed token
    tokens_per_s: float | None = None  # completion tokens per second of generation
    success_rate: float | None = None


class ModelOffer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    backend: str
    pricing: Pricing = Pricing()
    context_length: int | None = None
    features: list[str] = []
    category: ModelCategory | None = None
    available: bool = True
    perf: Performance = Performance()


class Load(msgspec.Struct, frozen=True):
    in_flight: int
    capacity: int


class Announcement(msgspec.Struct, frozen=True, kw_only=True, tag="announce", tag_field="type"):
    executor_id: str
    key: str  # the public nkey: the executor's identity
    epoch: int
    seq: int
    sent_at_ms: int
    heartbeat_ms: int
    revision: int  # changes whenever `models` does
    state: Literal["up", "down"] = "up"
    load: Load
    models: list[ModelOffer]
    # An operator's endorsement of `key` (protocol/trust.py): clients that trust the
    # operator trust this executor.
    endorsement: Endorsement | None = None
    # The executor's public curve key (`X...`, protocol/sealing.py) when it takes sealed jobs;
    # signed with the rest, so it is bound to the executor's identity.
    curve_key: str | None = None

    def __post_init__(self) -> None:
        if self.curve_key is not None:
            try:
                check_curve_key(self.curve_key)
            except SealError as e:
                raise ValueError(str(e)) from None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="heartbeat", tag_field="type"):
    executor_id: str
    key: str
    epoch: int
    seq: int
    sent_at_ms: int
    heartbeat_ms: int
    revision: int
    load: Load


CatalogMessage = Announcement | Heartbeat
catalog_decoder = msgspec.json.Decoder(CatalogMessage)


class Rejected(Exception):
    """Why a catalogue message was dropped (counted by `kind`, never raised to callers).

    Kinds: unsigned, malformed, forged (the signature does not verify), replayed
    (not newer than what this key sent before), stale (sent too long ago),
    impostor (an executor id already held by another key), untrusted (a key the
    client's keyring does not trust), oversized (over the size caps), full (the
    catalogue holds as many executors as it may).
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def open_signed(payload: bytes, signature: str | None) -> Announcement | Heartbeat:
    """Decode a catalogue message and check its signature; raises `Rejected` with the reason."""
    if not signature:
        raise Rejected("unsigned")
    try:
        message = catalog_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise Rejected("malformed", str(e)) from e
    if not verify(message.key, payload, signature):
        raise Rejected("forged", f"signature does not verify for key {message.key}")
    return message
