"""Metrics and traces of the executor (docs/observability.md): recorder, instruments, endpoint, spans, setup."""
