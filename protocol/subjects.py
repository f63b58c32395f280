"""Every NATS subject, header and queue group of the Lloom wire, in one place.

The protocol version is the second token (`lloom.v1....`): a breaking change to
the messages gets a new prefix, so old and new peers can share a bus without
decoding each other's traffic.

Model names (`qwen2.5:7b`, `meta-llama/Llama-3-8B`, `gpt-3.5-turbo`) contain
characters NATS gives meaning to (`.` separates tokens, `*` and `>` are
wildcards, whitespace ends a subject). `model_token` encodes a name into one
safe token reversibly: `[A-Za-z0-9_-]` pass through and every other UTF-8 byte
becomes `~XX` (uppercase hex), so `qwen2.5:7b` travels as `qwen2~2E5~3A7b`.
"""

from __future__ import annotations

import re

PREFIX = "lloom.v1"
# Executors serving a model share this queue group, so NATS gives each job to
# exactly one of them.
QUEUE_GROUP = "lloom-executors"

# Request headers (metadata stays out of the payload).
HDR_JOB_ID = "Lloom-Job-Id"
# Milliseconds the caller will wait, counted from when the executor receives
# the job: a relative budget, because peers' clocks need not agree.
HDR_TIMEOUT_MS = "Lloom-Timeout-Ms"
# Who the caller says it is (recorded in receipts; not authenticated by Lloom itself).
# At most MAX_CLIENT_ID characters of a safe alphabet (`check_client_id`).
HDR_CLIENT = "Lloom-Client"
# A per-job secret (128 random bits, hex) chosen by the caller: a cancel for the job is
# accepted only when it carries the same value as its payload. Never logged.
HDR_CANCEL_TOKEN = "Lloom-Cancel-Token"
# A sealed job (protocol/sealing.py): the value is the caller's ephemeral public curve key
# (`X...`); the payload and every reply message are sealed between it and the executor's
# announced curve key.
HDR_SEALED = "Lloom-Sealed"
# An executor refuses (bad_request) a job whose header block is larger than this.
MAX_HEADER_BYTES = 4096
MAX_CLIENT_ID = 128
# Set by clients that answer liveness pings on their reply subject.
HDR_LIVENESS = "Lloom-Liveness"
# Sent by an executor to a reply subject to ask whether the caller still waits;
# the caller answers PING_ALIVE or PING_GONE.
HDR_PING = "Lloom-Ping"
PING_ALIVE = b"alive"
PING_GONE = b"gone"
# On a request: the caller wants keepalives (and re-sent replies after an outage, see
# protocol/resume.py). On a header-only message to a reply subject: the executor (named in
# the value) is still running the job; a caller that hears none for a while fails the call.
HDR_KEEPALIVE = "Lloom-Keepalive"
# W3C trace context (https://www.w3.org/TR/trace-context/) of the caller's span, under the names
# the recommendation gives them, so the executor's spans (and its backend's) join the caller's trace.
HDR_TRACEPARENT = "traceparent"
HDR_TRACESTATE = "tracestate"
# Reply headers in the nats micro convention, so generic NATS tools see errors.
HDR_SERVICE_ERROR = "Nats-Service-Error"
HDR_SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
# On a stream's first chunk: the executor's id, so a relay (the gateway) can name it before the end.
HDR_EXECUTOR = "Lloom-Executor"
# Status header the server sets on its "no responders" reply.
HDR_STATUS = "Status"
# JetStream de-duplicates a publish by this header within the stream's duplicate window.
HDR_MSG_ID = "Nats-Msg-Id"
STATUS_NO_RESPONDERS = "503"

_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = re.compile(r"((?:~[0-9A-F]{2})+)")
MAX_MODEL_NAME = 256
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,%d}" % MAX_CLIENT_ID)
_CANCEL_TOKEN = re.compile(r"[0-9a-f]{32}")


class SubjectError(ValueError):
    """A name that cannot be placed in a subject."""


def model_token(model: str) -> str:
    """Encode a model name as one NATS subject token, reversibly."""
    if not model or len(model) > MAX_MODEL_NAME:
        raise SubjectError(f"model name must be 1..{MAX_MODEL_NAME} characters, got {len(model)}")
    if _SAFE.fullmatch(model):
        return model
    out: list[str] = []
    for ch in model:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode())
    return "".join(out)


def model_from_token(token: str) -> str:
    """Decode a token made by `model_token`; anything it could not have made is an error."""
    if "~" not in token:
        return token
    buf = bytearray()
    for i, part in enumerate(_ESCAPES.split(token)):
        buf += bytes.fromhex(part.replace("~", "")) if i % 2 else part.encode()
    try:
        model = buf.decode()
        if model_token(model) == token:  # rejects stray `~` and non-canonical escapes
            return model
    except (UnicodeDecodeError, SubjectError):
        pass
    raise SubjectError(f"malformed model token {token!r}")


def is_id(value: str) -> bool:
    """Whether `value` is a valid executor or job id (see `check_id`)."""
    return _ID.fullmatch(value) is not None


def check_id(kind: str, value: str) -> str:
    """Executor and job ids are single tokens of a restricted alphabet."""
    if not _ID.fullmatch(value):
        raise SubjectError(f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def check_client_id(value: str) -> str:
    """A client id (the `Lloom-Client` header, recorded in receipts) is short and printable."""
    if not _CLIENT_ID.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + f"... ({len(value)} characters)"
        raise SubjectError(f"client id {shown!r} must be 1-{MAX_CLIENT_ID} characters of A-Z a-z 0-9 _ . : @ / + = -")
    return value


def check_cancel_token(value: str) -> str:
    if not _CANCEL_TOKEN.fullmatch(value):
        raise SubjectError("cancel token must be 32 lowercase hex digits")
    return value


def headers_size(headers: dict[str, str]) -> int:
    """Bytes of a NATS header block: `NATS/1.0\\r\\n`, `Key: Value\\r\\n` per header, then a blank line."""
    return 10 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()) + 2


# A reply subject is an inbox: `_INBOX.<token>...` or a per-user prefix `_INBOX_<user>.<token>...`.
_REPLY_INBOX = re.compile(r"_INBOX[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+")


def is_reply_inbox(subject: str) -> bool:
    """Whether a reply-to is an inbox a peer may answer into.

    NATS checks a publisher's permission on the subject only, never on the reply-to it sets;
    and a responder's `allow_responses` lets it publish to whatever reply-to it received,
    over its deny list. So a client that sets `$JS.API.STREAM.DELETE.LLOOM_JOBS` as the
    reply-to of a job would have the executor's reply delete the stream. Every responder
    (executor and client alike) answers only reply subjects that are inboxes.
    """
    return len(subject) <= 256 and _REPLY_INBOX.fullmatch(subject) is not None


def complete_subject(model: str) -> str:
    """Jobs for `model`, load-balanced over every executor serving it."""
    return f"{PREFIX}.complete.{model_token(model)}"


def embed_subject(model: str) -> str:
    """Embedding jobs for `model`, load-balanced like completions (same queue group)."""
    return f"{PREFIX}.embed.{model_token(model)}"


def text_subject(model: str) -> str:
    """Legacy text-completion jobs for `model` (same queue group)."""
    return f"{PREFIX}.text.{model_token(model)}"


def direct_subject(executor_id: str) -> str:
    """Jobs for one executor, whatever model they name."""
    return f"{PREFIX}.exec.{check_id('executor id', executor_id)}.complete"


def cancel_subject(job_id: str) -> str:
    """Where a caller says it no longer wants job `job_id`."""
    return f"{PREFIX}.cancel.{check_id('job id', job_id)}"


CANCEL_ALL = f"{PREFIX}.cancel.*"

# A client that reconnected to NATS asks every executor to re-send what it still holds
# for the listed jobs; each re-sends only to the reply subject the job came with.
RESUME = f"{PREFIX}.resume"

# Signed announcements and heartbeats of every executor (see protocol/announcements.py).
CATALOG_ANNOUNCE = f"{PREFIX}.catalog.announce"
# A request every executor answers with its current announcement.
CATALOG_QUERY = f"{PREFIX}.catalog.query"


# Every executor answers with its operational status (`lloom-executor status`).
STATUS_ALL = f"{PREFIX}.status"


def status_subject(executor_id: str) -> str:
    return f"{PREFIX}.exec.{check_id('executor id', executor_id)}.status"


def info_subject(executor_id: str) -> str:
    """Where one executor answers with its current announcement."""
    return f"{PREFIX}.exec.{check_id('executor id', executor_id)}.info"


# NATS micro discovery (ADR-32): every executor answers `$SRV.<VERB>`, `$SRV.<VERB>.<name>` and
# `$SRV.<VERB>.<name>.<id>` as a service of this name whose id is its executor id
# (protocol/micro.py has the replies, executor/catalog/micro.py answers them).
MICRO_PREFIX = "$SRV"
MICRO_SERVICE = "lloom-executor"
MICRO_VERBS = ("PING", "INFO", "STATS")


def micro_subject(verb: str, name: str | None = None, service_id: str | None = None) -> str:
    """`$SRV.<verb>`, narrowed to one service name, then to one instance of it."""
    if verb not in MICRO_VERBS:
        raise SubjectError(f"micro verb must be one of {', '.join(MICRO_VERBS)}, got {verb!r}")
    if name is None:
        if service_id is not None:
            raise SubjectError("a micro service id needs its service name")
        return f"{MICRO_PREFIX}.{verb}"
    check_id("micro service name", name)
    if service_id is None:
        return f"{MICRO_PREFIX}.{verb}.{name}"
    return f"{MICRO_PREFIX}.{verb}.{name}.{check_id('micro service id', service_id)}"


def micro_subjects(verb: str, executor_id: str) -> tuple[str, str, str]:
    """The three subjects on which an executor answers `verb`: all services, ours by name, ours by id."""
    return (micro_subject(verb), micro_subject(verb, MICRO_SERVICE),
            micro_subject(verb, MICRO_SERVICE, executor_id))  # fmt: skip


# Signed usage receipts, kept by JetStream in the stream RECEIPTS_STREAM. One message
# holds one or more receipts, one JSON document per line (see protocol/receipts.py).
RECEIPTS_ALL = f"{PREFIX}.receipts.>"
RECEIPTS_STREAM = "LLOOM_RECEIPTS"
# How many receipts a receipts message holds (readers may count without parsing).
HDR_RECEIPTS = "Lloom-Receipts"
# The seq range "first-last" of the receipts in a receipts message (when consecutive), so
# what the stream holds can be read from headers alone (a headers-only consumer).
HDR_RECEIPT_SEQS = "Lloom-Receipt-Seqs"
# On a receipts message re-published because the stream had lost it: who re-published it.
HDR_HEALED_BY = "Lloom-Healed-By"

# API keys of the OpenAI-compatible gateways (executor/gateway/keystore.py), one KV entry per key
# (`key.<id>`: its hash, limits, spend and open holds), shared by every gateway on the bus.
GATEWAY_KEYS_BUCKET = "LLOOM_GATEWAY_KEYS"
# What each gateway billed to which key (protocol/settlements.py): one message per settled job,
# joined to the signed receipts by `lloom receipts report --by-key`.
SETTLEMENTS_STREAM = "LLOOM_SETTLEMENTS"
SETTLEMENTS_ALL = f"{PREFIX}.settlements.>"


def settlement_subject(key_id: str) -> str:
    return f"{PREFIX}.settlements.{check_id('key id', key_id)}"


# The durable queue (protocol/durable.py): jobs waiting per model, and results announced per job.
JOBS_ALL = f"{PREFIX}.jobs.>"


def jobs_subject(model: str) -> str:
    return f"{PREFIX}.jobs.{model_token(model)}"


def result_subject(job_id: str) -> str:
    """Where an executor announces a stored result (core NATS: a hint; the bucket is the record)."""
    return f"{PREFIX}.results.{check_id('job id', job_id)}"


def max_deliveries_advisory(stream: str) -> str:
    """JetStream's advisory for a message of `stream` that reached its consumer's max_deliver."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"


def receipts_subject(executor_id: str) -> str:
    return f"{PREFIX}.receipts.{check_id('executor id', executor_id)}"
