"""Where an executor answers NATS micro discovery: `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`.

To NATS tooling (`nats micro ls/info/stats`, every library's micro client) each executor
is an instance of the service `lloom-executor` (ADR-32). `MicroResponder` subscribes to
the three verbs for all services, for our service name and for our instance id, and
answers each request from what the node already knows: its models (one endpoint per job
subject it subscribes: complete, embed and text per model, in the `lloom-executors` queue
group, and its direct subject) and the counts the node keeps per subject
(`ExecutorNode.endpoints`, executor/jobs/endpoints.py).

Jobs are not served through nats.py's `micro` package: it runs one handler at a time per
endpoint and would serialize them. The job path stays the node's; this module only
describes it, with the spec's messages (protocol/micro.py).

The instance id is the executor id. The spec asks for an id unique per running instance;
the executor id already is one (configured per executor, or host name plus a random
suffix), it is a single subject token, and it is the id of everything else this
executor does on the wire (its direct subject, status, receipts, log lines), so
`$SRV.INFO.lloom-executor.<id>` names the same executor `lloom-executor status` shows.
`started` tells one run from the next when the id is configured.

Replies go only to inbox reply subjects (`subjects.is_reply_inbox`), like every Lloom
responder, and error texts are masked like every other reply of the node.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from executor.jobs.node import ExecutorNode
from protocol import subjects as subj
from protocol.connection import subscriptions_live
from protocol.errors import LloomError
from protocol.micro import (
    EndpointInfo,
    EndpointStats,
    InfoResponse,
    PingResponse,
    StatsResponse,
    average_ns,
    micro_time,
)

log = structlog.get_logger(logger_name=__name__)

DESCRIPTION = "Lloom executor: runs LLM jobs (chat, embeddings, text) for the models of its endpoints"
# The kind of job each subject carries, by endpoint name.
_KINDS = {"complete": "chat", "embed": "embeddings", "text": "text", "direct": "chat"}
_encode = msgspec.json.Encoder().encode


def package_version() -> str:
    """This installation's version of lloom (semantic versioning, as the spec asks)."""
    try:
        return version("lloom")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0+unknown"


class MicroResponder:
    """Answers micro discovery for one node; `start`/`stop` are idempotent."""

    def __init__(self, nc: NATS, node: ExecutorNode, *, service_version: str | None = None) -> None:
        self._nc = nc
        self._node = node
        self.version = service_version or package_version()
        self.started = datetime.now(UTC)
        self._subs: list[Subscription] = []

    async def __aenter__(self) -> MicroResponder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._subs:
            return
        self.started = datetime.now(UTC)
        handlers = {"PING": self._on_ping, "INFO": self._on_info, "STATS": self._on_stats}
        for verb, handler in handlers.items():
            for subject in subj.micro_subjects(verb, self._node.id):
                self._subs.append(await self._nc.subscribe(subject, cb=handler))
        await subscriptions_live(self._nc)  # when start() returns, discovery finds this executor
        log.info("answering NATS micro discovery", service=subj.MICRO_SERVICE, id=self._node.id,
                 version=self.version)  # fmt: skip

    async def stop(self) -> None:
        """Stop answering (the executor is leaving); a request already received is still answered."""
        subs, self._subs = self._subs, []
        if not subs or self._nc.is_closed:
            return
        for sub in subs:
            await sub.drain()

    # -- the replies --

    def _metadata(self) -> dict[str, str]:
        # Metadata values are strings: the served models as a JSON list, unambiguous whatever
        # characters a model name holds. They change when the served models do (unlike the
        # spec's fixed metadata), as the endpoints do.
        models = msgspec.json.encode(sorted(self._node.models)).decode()
        return {"executor_id": self._node.id, "models": models, "protocol": subj.PREFIX}

    def _endpoints(self) -> list[tuple[str, str, str, str | None]]:
        """(name, subject, queue group, model) of every subject the node takes jobs on, now."""
        out: list[tuple[str, str, str, str | None]] = []
        for model in sorted(self._node.models):
            out += [("complete", subj.complete_subject(model), subj.QUEUE_GROUP, model),
                    ("embed", subj.embed_subject(model), subj.QUEUE_GROUP, model),
                    ("text", subj.text_subject(model), subj.QUEUE_GROUP, model)]  # fmt: skip
        out.append(("direct", subj.direct_subject(self._node.id), "", None))  # a plain subscription: no group
        return out

    def ping(self) -> PingResponse:
        return PingResponse(name=subj.MICRO_SERVICE, id=self._node.id, version=self.version,
                            metadata=self._metadata())  # fmt: skip

    def info(self) -> InfoResponse:
        endpoints = [
            EndpointInfo(name=name, subject=subject, queue_group=group,
                         metadata={"kind": _KINDS[name]} | ({} if model is None else {"model": model}))
            for name, subject, group, model in self._endpoints()
        ]  # fmt: skip
        return InfoResponse(name=subj.MICRO_SERVICE, id=self._node.id, version=self.version,
                            metadata=self._metadata(), description=DESCRIPTION, endpoints=endpoints)  # fmt: skip

    def stats(self) -> StatsResponse:
        counts = self._node.endpoints
        endpoints = []
        for name, subject, group, _model in self._endpoints():
            ep = counts.get(subject)
            requests, errors, ns = (0, 0, 0) if ep is None else (ep.requests, ep.errors, ep.processing_ns)
            endpoints.append(EndpointStats(
                name=name, subject=subject, queue_group=group, num_requests=requests, num_errors=errors,
                last_error="" if ep is None else self._error_text(ep.last_error), processing_time=ns,
                average_processing_time=average_ns(ns, requests),
            ))  # fmt: skip
        return StatsResponse(name=subj.MICRO_SERVICE, id=self._node.id, version=self.version,
                             metadata=self._metadata(), started=micro_time(self.started), endpoints=endpoints)  # fmt: skip

    def _error_text(self, err: LloomError | None) -> str:
        """As the caller saw it: `<Nats-Service-Error-Code>:<code>: <message>`, secrets masked."""
        if err is None:
            return ""
        masker = self._node.masker
        message = err.message if masker is None else masker.mask(err.message)
        return f"{err.status}:{err.code.value}: {message[:200]}"

    # -- the handlers --

    async def _on_ping(self, msg: Msg) -> None:
        await self._answer(msg, self.ping())

    async def _on_info(self, msg: Msg) -> None:
        await self._answer(msg, self.info())

    async def _on_stats(self, msg: Msg) -> None:
        await self._answer(msg, self.stats())

    async def _answer(self, msg: Msg, reply: msgspec.Struct) -> None:
        if not msg.reply or not subj.is_reply_inbox(msg.reply):
            return  # a reply-to aimed at anything but an inbox could be the attack
        try:
            await self._nc.publish(msg.reply, _encode(reply))
        except nats.errors.Error as e:  # the connection may be going away; discovery is best effort
            log.debug("micro discovery reply not sent", subject=msg.subject, error=str(e))
