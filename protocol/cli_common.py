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
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
        self._options = {o.dest: o for o in options}

    def add_to(self, parser: argparse.ArgumentParser, *without_subcommand: str) -> None:
        """Declare every option on the top-level parser; `without_subcommand` names those that apply when
        no subcommand is given (for a tool with a default command)."""
        for option in self._options.values():
            parser.add_argument(option.flag, default=argparse.SUPPRESS, **option.kwargs)
        parser.set_defaults(**{_TAKES: frozenset(without_subcommand)})

    def parent(self, *names: str) -> argparse.ArgumentParser:
        """A parent parser (`add_parser(..., parents=[...])`) for a subcommand that takes the options `names`."""
        parent = argparse.ArgumentParser(add_help=False)
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


def run(body: Callable[[], int]) -> int:
    """Run a tool's body to its exit code; Ctrl-C ends it with `cancelled` and 130 instead of a traceback."""
    try:
        return body()
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
