"""structlog set-up for the executor process: one pipeline, configured by the CLI only.

Processors: level filter (per-logger `targets` when configured), context vars,
log level, timestamp, secret redaction (by key name and shape here, then by value:
the process's `SecretMasker`, executor/secrets.py), then a renderer: console on a
terminal, JSON otherwise. Modules call `structlog.get_logger(logger_name=__name__)`; importing one
configures nothing.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from executor.config import LoggingConfig
from executor.secrets import SecretMasker

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Whole names or their last `_` part: `api_key`, `nats_token`, `Authorization`; not `prompt_tokens`.
_SECRET_KEYS = re.compile(r"(?:^|_)(?:api_?key|authorization|token|secret|password|passwd|credentials?|seed)$", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+")
_SK = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")
# The gateway's API keys (executor/gateway/keystore.py): the id may show, the secret never.
_LLOOM_KEY = re.compile(r"\b(lloom_[0-9a-f]{12}_)[A-Za-z0-9_-]{43}")


def redact_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Mask values of secret-looking keys and bearer tokens inside any string."""
    for key, value in event.items():
        if _SECRET_KEYS.search(key) and value:
            event[key] = "***"
        elif isinstance(value, str) and ("Bearer" in value or "sk-" in value or "lloom_" in value):
            event[key] = _LLOOM_KEY.sub(r"\1***", _SK.sub("sk-***", _BEARER.sub(r"\1***", value)))
    return event


def _target_filter(level: int, targets: list[str]) -> structlog.types.Processor:
    def keep(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        name = event.get("logger_name", "")
        floor = level if any(name.startswith(t) for t in targets) else logging.INFO
        if _LEVELS.get(method, logging.INFO) < floor:
            raise structlog.DropEvent
        return event

    return keep


def redaction(masker: SecretMasker | None) -> list[structlog.types.Processor]:
    """The processors that keep secrets out of every event (tests capture logs through these too)."""
    return [redact_secrets] if masker is None else [redact_secrets, masker]


def configure_logging(config: LoggingConfig, *, stream: Any = None, masker: SecretMasker | None = None) -> None:
    stream = stream or sys.stderr
    level = _LEVELS[config.level]
    processors: list[structlog.types.Processor] = []
    if config.targets:
        processors.append(_target_filter(level, config.targets))
        level = min(level, logging.INFO)
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    processors += [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *redaction(masker),
        structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(),
    ]
    structlog.configure(
        processors=processors,
        # Calls below the level are no-ops before any processor runs: free on the hot path.
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
