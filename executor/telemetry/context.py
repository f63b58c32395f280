"""The W3C trace context a job arrived with: read from its NATS headers, checked, passed on.

Without OpenTelemetry imports (they cost the process ~5 MB even unused): the job path imports
this module whatever the configuration, and executor/telemetry/tracing.py (the spans) only
when a tracer is configured. `trace_headers` accepts only a well-formed context, `passthrough`
hands it to the backend's HTTP request when the executor itself does not trace.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from executor.backends.transport.base import TRACE_HEADERS
from protocol import subjects as subj

# version-traceid-parentid-flags; version ff and an all-zero trace or parent id are invalid (W3C).
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# list-members of printable ASCII (no CR/LF: it goes into an HTTP request as it is), at most 512 chars.
_TRACESTATE = re.compile(r"[\x20-\x7e]{0,512}")


def trace_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The W3C trace context among a job's NATS headers, as HTTP header names; None when absent or
    malformed (the recommendation says to ignore a malformed one, and it must not reach the backend)."""
    parent = headers.get(subj.HDR_TRACEPARENT)
    if parent is None or not _TRACEPARENT.fullmatch(parent):
        return None
    found = {"traceparent": parent}
    state = headers.get(subj.HDR_TRACESTATE)
    if state and _TRACESTATE.fullmatch(state):
        found["tracestate"] = state
    return found


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The trace id (32 hex digits) of a `traceparent` `trace_headers` accepted, for log lines."""
    return carrier["traceparent"][3:35]


def passthrough(carrier: dict[str, str]) -> None:
    """Without a tracer: the backend request carries the caller's context as it came."""
    TRACE_HEADERS.set(carrier)
