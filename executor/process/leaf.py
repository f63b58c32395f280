"""The embedded nats-server as a leaf node of a hub: its config, and watching the link come and go.

`lloom-executor --hub nats-leaf://hub:7422` (or `[hub] url`) adds a `leafnodes` remote to
the embedded server. Local clients keep their local bus; the hub's clients see this
executor's announcements and send it jobs; the server itself reconnects to the hub
whenever the link drops, so a lost hub never stops local service.

What crosses the link, and where the JetStream data lives (docs/deployment.md says why):

- The local server runs JetStream in its own domain (`leaf_domain`), so its receipts
  stream, job queue and buckets stay on this machine, and the hub's JetStream (if any)
  stays the hub's: the JetStream API never answers across the link by accident.
- `LINK_DENY` keeps JetStream, key-value, receipts, queue and queued-result subjects
  off the link in both directions: a receipt is stored once, in the local stream the
  outbox writes to (reachable even while the hub is away), never a second time by a
  hub stream listening on the same subjects; no one on the hub can reach this
  machine's store (`$JS.<domain>.API` is denied too), and nothing of the hub's lands in it.
- Everything else of the account crosses: jobs, replies, cancels, resumes, catalogue
  announcements and queries. The hub's permissions for the leaf's user narrow that further.

`HubLink` reads the server's log lines (`EmbeddedNats(on_log=...)`) and turns them into
the executor's own log events, each once per change: "joined hub" when a link is up
(`Leafnode connection created` and no refusal within `confirm_s`), "the hub refused this
leaf's credentials", "the hub closed the leaf link with an error" (any other refusal, e.g.
an account's leaf connection limit), "TLS to the hub failed", "cannot reach the hub yet",
"lost the hub link".
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from executor.config import ConfigError, HubConfig
from protocol import subjects as subj
from protocol.connection import redact_url

log = structlog.get_logger(logger_name=__name__)

# Subjects that never cross the leaf link, either way (see the module docstring).
LINK_DENY = ["$JS.>", "$KV.>", subj.RECEIPTS_ALL, subj.JOBS_ALL, f"{subj.PREFIX}.results.>"]
# How often the server tries the hub again after the link dropped (nats-server's `reconnect`).
RECONNECT_S = 1
# A link counts as joined when no refusal follows its creation within this long.
CONFIRM_S = 0.5

CREATED = "Leafnode connection created"
CLOSED = "Leafnode connection closed"
_REFUSED = ("Authorization Violation", "authentication error", "Authentication Timeout")
# States in which the hub (or TLS) said no: the close that follows is not a lost link.
_REFUSALS = ("refused", "rejected", "tls")


def leaf_domain(hub: HubConfig, node_id: str | None) -> str:
    """This server's JetStream domain: `[hub] domain`, else `lloom-leaf-<node id or host name>`."""
    if hub.domain:
        return hub.domain
    name = re.sub(r"[^A-Za-z0-9_-]", "-", node_id or socket.gethostname())[:48] or "node"
    return f"lloom-leaf-{name}"


def _remote_url(hub: HubConfig) -> str:
    """The hub URL with `user:password@` when given separately (nats-server reads them only from the URL)."""
    assert hub.url is not None
    if not hub.user:
        return hub.url
    parts = urlsplit(hub.url)
    userinfo = quote(hub.user, safe="") + (f":{quote(hub.password, safe='')}" if hub.password else "")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc.rpartition('@')[2]}"))


def server_conf(hub: HubConfig) -> str:
    """The `leafnodes` block for the embedded server's config file (which is private: mode 0600)."""
    remote: dict[str, object] = {"url": _remote_url(hub), "deny_imports": LINK_DENY, "deny_exports": LINK_DENY}
    if hub.credentials:
        remote["credentials"] = str(Path(hub.credentials).expanduser())
    if hub.nkey_file:
        try:
            remote["nkey"] = Path(hub.nkey_file).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"[hub] nkey_file {hub.nkey_file}: cannot read it: {e.strerror}") from e
    if hub.tls_ca or hub.tls_cert:
        tls: dict[str, str] = {}
        if hub.tls_ca:
            tls["ca_file"] = str(Path(hub.tls_ca).expanduser())
        if hub.tls_cert and hub.tls_key:
            tls["cert_file"] = str(Path(hub.tls_cert).expanduser())
            tls["key_file"] = str(Path(hub.tls_key).expanduser())
        remote["tls"] = tls
    # JSON is valid nats-server config syntax, and quotes every value safely.
    return f"leafnodes {{\n  reconnect: {RECONNECT_S}\n  remotes: [{json.dumps(remote, ensure_ascii=False)}]\n}}\n"


class HubLink:
    """Follows the leaf link through the embedded server's log; `joined` is set while it is up.

    `on_line` is called for every server log line, on the event loop (from the server's log
    reader); `stop()` cancels the pending confirmation."""

    def __init__(self, hub: HubConfig, domain: str, *, confirm_s: float = CONFIRM_S) -> None:
        assert hub.url is not None
        self.hub = redact_url(_remote_url(hub))
        self.domain = domain
        self.confirm_s = confirm_s
        self.joined = asyncio.Event()
        self.joins = 0  # how many times the link came up (1 + reconnections)
        self.state = "connecting"  # connecting | joined | refused | rejected | tls | unreachable | lost
        self._confirm: asyncio.Task[None] | None = None

    def on_line(self, line: str) -> None:
        if CREATED in line:
            self._cancel_confirm()
            self._confirm = asyncio.get_running_loop().create_task(self._confirm_join(), name="hub-link-confirm")
        elif "Leafnode Error" in line:
            self._cancel_confirm()
            self._down("refused" if any(r in line for r in _REFUSED) else "rejected", line)
        elif "TLS leafnode handshake error" in line:
            self._cancel_confirm()
            self._down("tls", line)
        elif CLOSED in line:
            self._cancel_confirm()
            if self.state not in _REFUSALS:  # the close that follows the hub's error is not news
                self._down("lost", line)
        elif "Error trying to connect as leafnode" in line:
            self._down("unreachable", line)

    async def _confirm_join(self) -> None:
        await asyncio.sleep(self.confirm_s)  # a refused link is closed by the hub within a round trip
        self._confirm = None
        self.joins += 1
        self.state = "joined"
        self.joined.set()
        log.info("joined hub", hub=self.hub, domain=self.domain, joins=self.joins)

    def _down(self, state: str, line: str) -> None:
        self.joined.clear()
        if state == self.state or (state == "unreachable" and self.state in ("lost", *_REFUSALS)):
            return  # said once per change (the outage or refusal goes on); the server retries every second
        self.state = state
        detail = line.split(" - ", 2)[-1] if " - lid:" in line else line.split("] ", 1)[-1]
        detail = redact_url(detail)
        if state == "refused":
            log.error("the hub refused this leaf's credentials", hub=self.hub, error=detail,
                      hint="check [hub] credentials / user / nkey_file with the hub's operator; local clients are still served")  # fmt: skip
        elif state == "tls":
            log.error("TLS to the hub failed; the embedded server retries", hub=self.hub, error=detail,
                      hint="check [hub] tls_ca (the CA of the hub's certificate), tls_cert and tls_key")  # fmt: skip
        elif state == "rejected":
            log.error("the hub closed the leaf link with an error; the embedded server retries", hub=self.hub,
                      error=detail, hint="ask the hub's operator (account limits, leafnode settings)")  # fmt: skip
        elif state == "unreachable":
            log.warning("cannot reach the hub yet; the embedded server keeps trying", hub=self.hub, error=detail)
        else:
            log.warning("lost the hub link; the embedded server reconnects by itself, local clients are still served",
                        hub=self.hub, reason=detail)  # fmt: skip

    @property
    def confirming(self) -> bool:
        """A created link is waiting out `confirm_s` before it counts as joined."""
        return self._confirm is not None

    def _cancel_confirm(self) -> None:
        if self._confirm is not None:
            self._confirm.cancel()
            self._confirm = None

    def stop(self) -> None:
        self._cancel_confirm()


class Leaf:
    """What the embedded server needs to run as a leaf of `hub`: its domain, config block and link watcher."""

    def __init__(self, hub: HubConfig, node_id: str | None) -> None:
        self.domain = leaf_domain(hub, node_id)
        self.conf = server_conf(hub)
        self.link = HubLink(hub, self.domain)

    def server_options(self) -> dict[str, object]:
        """Keyword arguments for `EmbeddedNats`."""
        return {"jetstream_domain": self.domain, "conf_extra": self.conf, "on_log": self.link.on_line}
