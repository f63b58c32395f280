"""Who may talk to the gateway over HTTP at all: Host and Origin checks, and a deadline on the body.

    app = web.Application(middlewares=[guard(config)])

The gateway usually listens on 127.0.0.1 without API keys, and the user's browser runs
pages from anywhere on the same machine. Two ways a web page could use it:

- **A cross-origin POST** (`fetch("http://127.0.0.1:8640/v1/chat/completions", {method:
  "POST", body: ..., headers: {"Content-Type": "text/plain"}})` is a "simple request": the
  browser sends it without asking first and only hides the answer. The job would run and
  be billed. Browsers send `Origin` with every cross-origin POST (and every CORS request),
  so a request whose `Origin` is not the gateway itself is refused (403) before its body
  is read.
- **DNS rebinding**: a page at `http://evil.example:8640/` whose name then resolves to
  127.0.0.1 is "same-origin" with the gateway for the browser, and can read every answer,
  `/v1/generation` and the status page. Its requests carry `Host: evil.example:8640`, so a
  gateway bound to loopback answers only `Host` names that are loopback (`127.0.0.1`,
  `localhost`, `[::1]`, ...) or listed in `[gateway] allowed_hosts` (a reverse proxy's
  public name). Bound to another address, the Host is not checked (its names are the
  operator's to know); API keys are what guards such a gateway.

Refusals are OpenAI error bodies (403 `forbidden_host` / `forbidden_origin`, errors.py's
table), sent before any work. The body deadline (`[gateway] body_timeout_secs`, against a
client that sends headers and then trickles its body) is kept where bodies are read, in
`app.Handlers._body`: 408, and no job runs.

Header values built from what the network says (executor ids come from announcements and
replies, which anyone with a key can sign) go through `header_token`, so a line break can
never reach a response header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from executor.config import GatewayConfig
from executor.gateway.errors import (
    ForbiddenHost,
    ForbiddenOrigin,
    GatewayError,
    error_response,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def header_token(value: str | None) -> str | None:
    """`value` if it is an id fit for a response header (1-64 of A-Z a-z 0-9 _ -), else None."""
    return value if value is not None and _TOKEN.fullmatch(value) else None


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """`Host` without its port: `127.0.0.1:8640` -> `127.0.0.1`, `[::1]:8640` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _refuse(err: GatewayError) -> web.Response:
    resp = error_response(err)
    resp.force_close()  # the rest of a refused request is not read: the connection cannot be reused
    return resp


class Guard:
    """The checks of one gateway; see the module docstring."""

    def __init__(self, config: GatewayConfig) -> None:
        listen_host = config.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        self.check_host = is_loopback(listen_host)
        self.allowed = frozenset(h.lower() for h in config.allowed_hosts)

    def host_ok(self, host_header: str | None) -> bool:
        if not self.check_host:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires Host; only a hand-made request lacks it
        name = _host_name(host_header)
        return is_loopback(name) or name in self.allowed

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """No Origin (not a browser's cross-origin request), or the gateway's own origin."""
        if origin is None:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (a sandboxed frame, a file:// page) and anything odd
        return parts.netloc.lower() == (host_header or "").strip().lower() and self.host_ok(parts.netloc)

    async def check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not self.host_ok(host):
            return _refuse(ForbiddenHost("this gateway answers only requests addressed to it by a loopback name"
                                         " (127.0.0.1, localhost); add the name to [gateway] allowed_hosts to use another"))  # fmt: skip
        if not self.origin_ok(request.headers.get("Origin"), host):
            return _refuse(ForbiddenOrigin("cross-origin requests are refused: a web page may not use this gateway"))
        # The body deadline is kept where bodies are read (app.Handlers._body: the only reader), which
        # arms no timer when the body came with the headers.
        return await handler(request)


def guard(config: GatewayConfig) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware of `Guard(config)`."""
    checks = Guard(config)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await checks.check(request, handler)

    return middleware
