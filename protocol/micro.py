"""The replies of NATS micro discovery (ADR-32, the NATS "Service API"), as msgspec Structs.

Every executor answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (and the same narrowed to
its service name and id, see `subjects.micro_subjects`) like any NATS micro service, so
`nats micro ls/info/stats` and the micro clients of every NATS library see executors. The
field names and the `type` values are the spec's: each reply is tagged with its
`io.nats.micro.v1.*` type, `metadata` is always present (string to string), an endpoint
reports the `queue_group` it uses ("" when it has none) and its stats always carry
`last_error` ("" when none) and `data` (null), because nats.py's `from_dict` reads those keys
unconditionally.

Times: `processing_time` and `average_processing_time` are nanoseconds; `started` is UTC in
ISO 8601 with exactly six fraction digits and a `Z` (`micro_time`), the one format both the
Go tools and nats.py's `strptime("%Y-%m-%dT%H:%M:%S.%fZ")` accept.

Decoding: these replies come from any NATS service on the bus, and the spec lets services add
fields, so unknown fields are ignored (the rule every inbound Struct states).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


class EndpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One subject the service takes requests on."""

    name: str
    subject: str
    queue_group: str  # "" when the endpoint is a plain (not queue) subscription
    metadata: dict[str, str] = {}


class EndpointStats(msgspec.Struct, frozen=True, kw_only=True):
    """What one endpoint has served since the service started."""

    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str = ""
    processing_time: int = 0  # nanoseconds, all requests together
    average_processing_time: int = 0  # processing_time // num_requests (0 before the first)
    data: Any = None  # the spec's free-form extra stats: null from executors


class PingResponse(msgspec.Struct, frozen=True, kw_only=True, tag=PING_TYPE, tag_field="type"):
    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}


class InfoResponse(msgspec.Struct, frozen=True, kw_only=True, tag=INFO_TYPE, tag_field="type"):
    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}
    description: str = ""
    endpoints: list[EndpointInfo] = []


class StatsResponse(msgspec.Struct, frozen=True, kw_only=True, tag=STATS_TYPE, tag_field="type"):
    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}
    started: str  # micro_time()
    endpoints: list[EndpointStats] = []


def micro_time(when: datetime) -> str:
    """`when` in UTC as the spec's ISO string, always with six fraction digits."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def average_ns(total_ns: int, requests: int) -> int:
    """The spec's average: the total divided by the requests, truncated; 0 before the first."""
    return total_ns // requests if requests else 0


ping_decoder = msgspec.json.Decoder(PingResponse)
info_decoder = msgspec.json.Decoder(InfoResponse)
stats_decoder = msgspec.json.Decoder(StatsResponse)
