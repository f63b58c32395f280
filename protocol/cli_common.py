"""What both command-line tools (`lloom`, `lloom-executor`) share: global options and running a command.

Global options (`--nats`, `--timeout`, `--json`, ...) may come before or after the
subcommand, as with the `nats` CLI: `lloom models --nats URL` is `lloom --nats URL models`.
The top-level parser declares every one of them, and each subcommand's parser gets the
ones it uses from `GlobalOptions.parent(...)`. Neither sets a default (argparse's
SUPPRESS): a subparser's default would otherwise overwrite a value given before the
subcommand. `resolve` fills in the defaults afterwards, and refuses an option given to
a subcommand that has no use for it (`lloom --json receipts verify`) instead of
ignoring it.

`run` runs a tool's whole body to its exit code. Ctrl-C anywhere ends it with one line,
`cancelled`, on stderr and exit code 130 (128 + SIGINT, the shell's convention). Inside
`asyncio.run` the first Ctrl-C cancels the command's task, so a job in flight goes
through the client's own cancellation path, which cancels it at the executor, before
the process exits.

How to reach a secured bus (`--user`, `--creds`, `--nkey`, `--tls-ca`, `--tls-cert`,
`--tls-key`, `--tls-hostname`, `--tls-first`, `--inbox-prefix`, `--connect-timeout`) is
shared by both tools: every subcommand that takes `--nats` takes these too, and each
has an `LLOOM_NATS_*` variable. Passwords and tokens come only from the environment
(`LLOOM_NATS_PASSWORD`, `LLOOM_NATS_TOKEN`) or a config file, never from a flag, so
they do not show in `ps`. `connect_options` merges file < environment < flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.connection import NatsConnectOptions, merge_options

EXIT_CANCELLED = 130
# Namespace key under which a subcommand's parser records the global options it takes.
_TAKES = "_global_options"


@dataclass(frozen=True)
class GlobalOption:
    """One option accepted before or after the subcommand; `argparse` keywords other than `default` in `kwargs`."""

    flag: str
    default: object
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class GlobalOptions:
    """A tool's global options, declared once and given to its parsers."""

    def __init__(self, *options: GlobalOption) -> None:
        # Every tool with `--nats` also takes the options that say how to connect there.
        if any(o.flag == "--nats" for o in options):
            options = (*options, *CONNECTION_OPTIONS)
        self._options = {o.dest: o for o in options}

    def _expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        if "nats" in names:
            return names + tuple(o.dest for o in CONNECTION_OPTIONS if o.dest not in names)
        return names

    def add_to(self, parser: argparse.ArgumentParser, *without_subcommand: str) -> None:
        """Declare every option on the top-level parser; `without_subcommand` names those that apply when
        no subcommand is given (for a tool with a default command)."""
        for option in self._options.values():
            parser.add_argument(option.flag, default=argparse.SUPPRESS, **option.kwargs)
        parser.set_defaults(**{_TAKES: frozenset(self._expand(without_subcommand))})

    def parent(self, *names: str) -> argparse.ArgumentParser:
        """A parent parser (`add_parser(..., parents=[...])`) for a subcommand that takes the options `names`."""
        parent = argparse.ArgumentParser(add_help=False)
        names = self._expand(names)
        for name in names:
            option = self._options[name]
            parent.add_argument(option.flag, default=argparse.SUPPRESS, **option.kwargs)
        # A parent's defaults are copied into the child; the innermost subcommand's win.
        parent.set_defaults(**{_TAKES: frozenset(names)})
        return parent

    def resolve(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
        """Give every option the chosen subcommand takes its default if it was given nowhere."""
        takes: frozenset[str] = vars(args).pop(_TAKES, frozenset())
        for name, option in self._options.items():
            if name in takes:
                if not hasattr(args, name):
                    setattr(args, name, option.default)
            elif hasattr(args, name):
                parser.error(f"{option.flag} does not apply to this command")
        return args


# (flag, environment variable, NatsConnectOptions field, argparse keywords)
_CONNECTION: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("--user", "LLOOM_NATS_USER", "user", {"metavar": "NAME", "help": "NATS user (its password: $LLOOM_NATS_PASSWORD)"}),
    ("--creds", "LLOOM_NATS_CREDS", "creds_file", {"metavar": "FILE", "help": "NATS .creds file (JWT and nkey seed)"}),
    ("--nkey", "LLOOM_NATS_NKEY", "nkey_file", {"metavar": "FILE", "help": "NATS nkey user seed file"}),
    ("--tls-ca", "LLOOM_NATS_TLS_CA", "tls_ca", {"metavar": "FILE", "help": "CA certificate that signed the server's"}),
    ("--tls-cert", "LLOOM_NATS_TLS_CERT", "tls_cert", {"metavar": "FILE", "help": "client certificate (mutual TLS)"}),
    ("--tls-key", "LLOOM_NATS_TLS_KEY", "tls_key", {"metavar": "FILE", "help": "the client certificate's key"}),
    ("--tls-hostname", "LLOOM_NATS_TLS_HOSTNAME", "tls_hostname",
     {"metavar": "NAME", "help": "name the server's certificate must carry (default: the URL's host)"}),
    ("--tls-first", "LLOOM_NATS_TLS_FIRST", "tls_handshake_first",
     {"action": "store_true", "help": "TLS handshake before the server's INFO (server option handshake_first)"}),
    ("--inbox-prefix", "LLOOM_NATS_INBOX_PREFIX", "inbox_prefix",
     {"metavar": "PREFIX", "help": "reply subjects' prefix your NATS user may read (e.g. _INBOX_alice)"}),
    ("--connect-timeout", "LLOOM_NATS_CONNECT_TIMEOUT", "connect_timeout_secs",
     {"type": float, "metavar": "S", "help": "seconds per connection attempt (default 5)"}),
)  # fmt: skip
# Secrets: only from the environment (or the executor's config file).
_SECRET_ENV = (("LLOOM_NATS_PASSWORD", "password"), ("LLOOM_NATS_TOKEN", "token"))
CONNECTION_OPTIONS = tuple(GlobalOption(flag, None, kwargs) for flag, _, _, kwargs in _CONNECTION)


def connect_options(
    args: argparse.Namespace,
    base: NatsConnectOptions | None = None,
    environ: Mapping[str, str] | None = None,
) -> NatsConnectOptions:
    """How to connect: `base` (a config file's), then `LLOOM_NATS_*` variables, then flags.

    Raises `ValueError` naming the problem (two ways to authenticate, a key without its certificate, ...).
    """
    environ = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    for name, fieldname in _SECRET_ENV:
        if environ.get(name):
            overrides[fieldname] = environ[name]
    for flag, env, fieldname, _ in _CONNECTION:
        if value := environ.get(env):
            overrides[fieldname] = value.lower() in ("1", "true", "yes") if fieldname == "tls_handshake_first" else value
    for flag, _, fieldname, _ in _CONNECTION:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None and value is not False:
            overrides[fieldname] = value
    if "connect_timeout_secs" in overrides:
        try:
            overrides["connect_timeout_secs"] = float(overrides["connect_timeout_secs"])
        except ValueError:
            raise ValueError(f"connect timeout must be a number of seconds, got {overrides['connect_timeout_secs']!r}")
    return merge_options(base or NatsConnectOptions(), **overrides)


def run(body: Callable[[], int]) -> int:
    """Run a tool's body to its exit code; Ctrl-C ends it with `cancelled` and 130 instead of a traceback."""
    try:
        return body()
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
