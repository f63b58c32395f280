"""Opening a NATS connection the way every long-lived Lloom peer needs it, with the operator's credentials.

`NatsConnectOptions` is the one description of how to reach a secured bus: a
user and password, a token, an nkey seed file or a `.creds` (JWT) file; TLS with
a CA file, a client certificate and key, a host name to check and "handshake
first"; the per-user inbox prefix the server's permissions expect; the connect
timeout. The executor reads it from its `[nats]` table, both CLIs from flags and
`LLOOM_NATS_*` variables (protocol/cli_common.py), `LloomClient.connect` takes
it as `options=`.

Two phases with different rules. Connecting: a few quick attempts within one
overall deadline, then a `ConnectionError` that names the URL (with any
password masked, see `redact_url`) and the real cause. A certificate the CA
does not vouch for, or credentials the server refuses, end the attempt at once:
retrying cannot fix them. (nats.py on its own would hang for ever after a
failed TLS handshake: its clean-up awaits `StreamWriter.wait_closed()` on a
socket whose protocol `start_tls` replaced, which never completes; so the
connect runs in a task that is cancelled on such an error or at the deadline,
and a caller may cancel it any time, e.g. on SIGTERM.) Connected: reconnect for
ever, so a node or client rides out a server restart instead of giving up, and
ping the server every few seconds, so one that stops answering (paused, cut off)
is left for another node of the cluster within 6-9 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
import nats.errors
from msgspec import Meta
from nats.aio.client import Client as NATS

from protocol import nats_headers

ErrorReporter = Callable[[Exception], Awaitable[None]]
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# A server that stops answering with the socket still open (paused, cut off by a partition) is
# left once more than MAX_OUTSTANDING_PINGS pings, PING_INTERVAL_S apart, went unanswered (6-9 s),
# for another node of the cluster; nats.py's own defaults (2 min, 2) keep a peer on it for minutes.
PING_INTERVAL_S = 3.0
MAX_OUTSTANDING_PINGS = 2
# How nats.py reports the server's `-ERR 'Permissions Violation for ...'` (lower-cased) to the error callback.
PERMISSIONS_VIOLATION = "permissions violation"
MASK = "***"


class NatsConnectOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to authenticate to NATS and protect the link; every field is optional.

    Use at most one way to authenticate: `user` + `password`, `token`,
    `nkey_file` (an nkey user seed, `SU...`) or `creds_file` (a JWT `.creds`
    file as `nsc` writes it). Secrets are better given by file or environment
    than on a command line.
    """

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_file: str | None = None
    creds_file: str | None = None
    # The CA that signed the server's certificate (default: the system's trust store).
    tls_ca: str | None = None
    # A client certificate and its key, for servers that verify clients (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    # The name the server's certificate must carry (default: the URL's host).
    tls_hostname: str | None = None
    # TLS before the server's INFO (servers configured with `handshake_first`).
    tls_handshake_first: bool = False
    # Where this connection's reply subjects live; the shipped permissions give each user
    # its own (`_INBOX_<user>`), so no one else can read its replies (docs/security.md).
    # It starts with `_INBOX`: executors answer no other reply subject (subjects.is_reply_inbox).
    inbox_prefix: Annotated[str, Meta(pattern=r"^_INBOX[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")] | None = None
    connect_timeout_secs: Annotated[float, Meta(gt=0, le=600)] = DEFAULT_CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        ways = [n for n in ("user", "token", "nkey_file", "creds_file") if getattr(self, n)]
        if len(ways) > 1:
            raise ValueError(f"use one way to authenticate to NATS, not {' and '.join(ways)}")
        if self.password and not self.user:
            raise ValueError("a NATS password needs a user")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a TLS client certificate needs its key (tls_cert and tls_key go together)")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_handshake_first)

    def secrets(self) -> list[str]:
        """The values that must never be printed."""
        return [s for s in (self.password, self.token) if s]


def merge_options(base: NatsConnectOptions, **overrides: Any) -> NatsConnectOptions:
    """`base` with every override that is not None (later sources win: file < environment < flags).

    Choosing a way to authenticate drops the way `base` had: `--token` after a
    configured user and password means the token alone.
    """
    changes = {k: v for k, v in overrides.items() if v is not None}
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    if any(k in changes for k in _WAYS):
        for way in (*_WAYS, "password"):
            fields[way] = None
    fields.update(changes)
    try:
        return msgspec.convert(fields, NatsConnectOptions)
    except msgspec.ValidationError as e:
        raise ValueError(str(e)) from e


_WAYS = ("user", "token", "nkey_file", "creds_file")


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*)(?::(?P<pw>[^@/\s]*))?@")


def redact_url(text: str) -> str:
    """Mask the secret in every `scheme://user:password@` (and `scheme://token@`) of `text`.

    `nats://alice:pw@host` becomes `nats://alice:***@host`; a lone user part is a token to
    NATS (`nats://s3cret@host`), so it becomes `nats://***@host`. Every message or log line
    that may carry a server URL goes through here.
    """

    def mask(m: re.Match[str]) -> str:
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
        return f"{m.group('scheme')}{MASK}@"

    return _USERINFO.sub(mask, text)


def redact(text: str, options: NatsConnectOptions | None = None) -> str:
    """`redact_url`, and every secret of `options` masked wherever it appears."""
    text = redact_url(text)
    for secret in options.secrets() if options else []:
        text = text.replace(secret, MASK)
    return text


def split_servers(servers: str | list[str]) -> list[str]:
    if isinstance(servers, str):
        return [u.strip() for u in servers.split(",") if u.strip()]  # a cluster seed list
    return list(servers)


def tls_context(options: NatsConnectOptions) -> ssl.SSLContext | None:
    """The TLS context the options ask for, or None for nats.py's default (system CAs, for `tls://`)."""
    if not (options.tls_ca or options.tls_cert):
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.tls_ca)
        if options.tls_cert:
            ctx.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConnectionError(f"cannot use the NATS TLS files: {e}") from e
    return ctx


def _connect_kwargs(options: NatsConnectOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if options.user:
        kwargs["user"], kwargs["password"] = options.user, options.password or ""
    if options.token:
        kwargs["token"] = options.token
    if options.nkey_file:
        kwargs["nkeys_seed"] = options.nkey_file
    if options.creds_file:
        kwargs["user_credentials"] = options.creds_file
    for path in (options.nkey_file, options.creds_file):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConnectionError(f"cannot read the NATS credentials file {path}: {e.strerror}") from e
    ctx = tls_context(options)
    if ctx is None and options.tls_handshake_first:
        ctx = ssl.create_default_context()
    if ctx is not None:
        kwargs["tls"] = ctx
    if options.tls_hostname:
        kwargs["tls_hostname"] = options.tls_hostname
    if options.tls_handshake_first:
        kwargs["tls_handshake_first"] = True
    if options.inbox_prefix:
        kwargs["inbox_prefix"] = options.inbox_prefix
    return kwargs


def _is_final(e: BaseException) -> bool:
    """An error another attempt at the same server cannot fix: a certificate or the credentials."""
    if isinstance(e, ssl.SSLCertVerificationError | ssl.SSLError):
        return True
    text = str(e).lower()
    return "authorization violation" in text or "authentication" in text


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted ({e.verify_message}); give the CA that signed it (--tls-ca)"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed ({e.reason or e}); check the CA, the client certificate and the URL scheme"
    text = str(e) or type(e).__name__
    if "authorization violation" in text.lower():
        return "the server refused the credentials (Authorization Violation)"
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "no answer in time (is it a NATS server? does it need TLS?)"
    return text

Reconnected = Callable[[], Awaitable[None]]


async def connect_nats(
    servers: str | list[str],
    *,
    name: str,
    options: NatsConnectOptions | None = None,
    on_error: ErrorReporter | None = None,
    on_reconnected: Reconnected | None = None,
    initial_attempts: int = 3,
    connect_timeout: float | None = None,
) -> NATS:
    """Connect, or raise `ConnectionError` within about `initial_attempts` connect timeouts.

    `on_error` hears asynchronous errors once connected (such as a permissions
    violation); `on_reconnected` is awaited after each reconnect (subscriptions restored
    by then). Cancelling the caller cancels the attempt.
    """
    options = options or NatsConnectOptions()
    timeout = connect_timeout if connect_timeout is not None else options.connect_timeout_secs
    servers = split_servers(servers)
    shown = redact(", ".join(servers), options)
    kwargs = _connect_kwargs(options)
    failures: list[BaseException] = []
    final = asyncio.Event()
    nc = NATS()
    nats_headers.install(nc)  # every message with headers (each job) parses them at C speed

    async def error_cb(e: Exception) -> None:
        if nc.is_connected or nc.is_reconnecting:
            if on_error is not None:
                await on_error(e)
            return
        failures.append(e)
        if _is_final(e):
            final.set()

    attempt = asyncio.ensure_future(
        nc.connect(
            servers,
            name=name,
            error_cb=error_cb,
            reconnected_cb=on_reconnected,
            max_reconnect_attempts=initial_attempts,
            reconnect_time_wait=0.5,
            connect_timeout=timeout,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            **kwargs,
        )
    )
    refused = asyncio.ensure_future(final.wait())
    try:
        # Each attempt is bounded by `timeout`; the whole by all of them plus the waits between.
        done, _ = await asyncio.wait(
            {attempt, refused}, timeout=(timeout + 0.5) * (initial_attempts + 1), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refused.cancel()
        await asyncio.gather(refused, return_exceptions=True)
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await attempt
            # nats.py may have left its half-open transport; closing is bounded, never awaited for ever.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(1.0):
                    await nc.close()
    if attempt in done and attempt.exception() is None:
        # From now on, never give up on the cluster: nats.py reads these per attempt.
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 1.0
        return nc
    error = attempt.exception() if attempt in done else None
    cause: BaseException | None = next((f for f in failures if _is_final(f)), None) or (
        failures[-1] if failures else error
    )
    if cause is None:
        cause = TimeoutError()
    why = redact(_describe(cause), options)
    raise ConnectionError(f"cannot connect to NATS at {shown}: {why}") from (
        error if isinstance(error, Exception) else None
    )


class Violations:
    """An error reporter that keeps the permissions violations the server reports, then passes every error on.

    NATS refuses a subscription or a publish asynchronously (`-ERR 'Permissions
    Violation ...'`); a peer that flushes after subscribing knows, when the flush
    returns, whether its subscriptions were refused.
    """

    def __init__(self, then: ErrorReporter | None = None) -> None:
        self._then = then
        self.refused: list[str] = []

    async def __call__(self, e: Exception) -> None:
        if PERMISSIONS_VIOLATION in str(e):
            self.refused.append(str(e))
        if self._then is not None:
            await self._then(e)

    async def check_inbox(
        self, nc: NATS, subscribed: str | None = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    ) -> None:
        """Raise `ConnectionError` if the server refuses this connection its reply subjects.

        `subscribed`: the inbox subscription already made; without it, one is made to find out.
        """
        probe = None
        if subscribed is None:
            subscribed = nc.new_inbox()
            probe = await nc.subscribe(subscribed)
        try:
            # The server answers a refused SUB before the PING that follows it (two flushes: see
            # subscriptions_live; one can return before the SUB was even sent).
            await nc.flush(timeout=timeout)
            await nc.flush(timeout=timeout)
        except (nats.errors.Error, TimeoutError) as e:
            raise ConnectionError(f"the NATS server did not answer a flush: {e or type(e).__name__}") from e
        if probe is not None:
            await probe.unsubscribe()
        if any("subscription" in r and subscribed.lower() in r for r in self.refused):
            prefix = subscribed.split(".", 1)[0]
            raise ConnectionError(
                f"the NATS server does not let this user read its replies ({prefix}.>): connect with the inbox "
                "prefix its permissions allow (--inbox-prefix, $LLOOM_NATS_INBOX_PREFIX, [nats] inbox_prefix or "
                "NatsConnectOptions.inbox_prefix; the shipped config's is _INBOX_<user>, see docs/security.md)"
            )


async def close_nats(nc: NATS) -> None:
    """Drain (flush what is still to be said), or just close when draining is refused."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except (nats.errors.Error, OSError, RuntimeError):  # e.g. reconnecting: nothing can be delivered anyway
        try:
            await nc.close()
        except (nats.errors.Error, OSError, RuntimeError):
            # nats.py may fail writing to a socket that is already gone (server down at
            # shutdown); the connection is over either way, and the process must exit 0.
            pass


async def subscriptions_live(nc: NATS) -> None:
    """Return once the server knows every subscription made so far on `nc`.

    One `flush()` is not enough with nats-py 2.16: `subscribe()` queues its SUB for the
    flusher task, while `flush()` writes its PING straight to the socket, so the PONG can
    come back before the SUB was even sent. By the time that first PONG is read the
    flusher has written the queued SUBs, so a second PING is ordered after them.
    """
    await nc.flush()
    await nc.flush()
