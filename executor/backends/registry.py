"""From `[llm_client] backend = "..."` to a `Backend` object.

Built-in presets map to the OpenAI-compatible backend; `local` runs a
llama-server child process (`local.py`); `auto` probes local servers and falls
back to `local`; any other name is looked up in the `lloom.backends` entry-point group,
so a package can add a backend without editing this one:

    # in the plugin's pyproject.toml
    [project.entry-points."lloom.backends"]
    mybackend = "my_pkg.backend:from_config"

    # my_pkg/backend.py
    def from_config(config: LlmClientConfig, session: aiohttp.ClientSession) -> Backend: ...

The factory receives the validated `[llm_client]` table and the process's one
HTTP session, and returns an object implementing `executor.backends.base.Backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

import aiohttp

from executor.backends.autodetect import AutoDetectBackend
from executor.backends.base import Backend
from executor.backends.local import from_config as local_from_config
from executor.backends.openai_compat import from_config as openai_from_config
from executor.backends.presets import PRESETS
from executor.backends.breaker import CircuitBreaker
from executor.backends.pool import BackendPool, Member
from executor.config import ConfigError, ExecutorsConfig, LlmClientConfig

ENTRY_POINT_GROUP = "lloom.backends"
BackendFactory = Callable[[LlmClientConfig, aiohttp.ClientSession], Backend]


def plugin_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    return ["auto", "local", *PRESETS, *sorted(set(plugin_entry_points()) - set(PRESETS))]


def create_backend(config: LlmClientConfig, session: aiohttp.ClientSession) -> Backend:
    name = config.backend
    if name == "auto":
        return AutoDetectBackend(session, config)
    if name == "local":
        return local_from_config(config, session)
    if name in PRESETS:
        return openai_from_config(config, session)
    ep = plugin_entry_points().get(name)
    if ep is None:
        raise ConfigError(
            f"[llm_client] backend = {name!r} is unknown; choose one of {', '.join(available_backends())}"
            f" or install a package that registers it under the {ENTRY_POINT_GROUP!r} entry point"
        )
    try:
        factory: BackendFactory = ep.load()
    except Exception as e:  # a broken plugin must say which one it is
        raise ConfigError(f"backend plugin {name!r} ({ep.value}) failed to load: {e}") from e
    backend = factory(config, session)
    if not isinstance(backend, Backend):
        raise ConfigError(f"backend plugin {name!r} ({ep.value}) returned {type(backend).__name__}, not a Backend")
    return backend


def create_pool(config: ExecutorsConfig, session: aiohttp.ClientSession) -> BackendPool:
    """The `[[executors.backends]]` members as one `BackendPool`."""
    lb = config.load_balancing
    weights = {w.backend: w.weight for w in lb.weights}
    members = []
    for entry in config.backends:
        member_config = LlmClientConfig(
            backend=entry.type,
            base_url=entry.base_url,
            api_key=entry.api_key,
            api_key_file=entry.api_key_file,
            timeout_secs=entry.timeout_secs,
            max_connections=entry.max_connections,
            transport=entry.transport,
            models=entry.models,
        )
        try:
            backend = create_backend(member_config, session)
        except ConfigError as e:
            raise ConfigError(f"[[executors.backends]] {entry.name!r}: {e}") from e
        breaker = CircuitBreaker(lb.failure_threshold, lb.breaker_cooldown_secs)
        members.append(Member(entry.name, backend, entry.models, weights.get(entry.name, 1), breaker))
    return BackendPool(
        members, balancing=lb, retry=config.retry, fallbacks={f.model: f for f in config.fallbacks}
    )
