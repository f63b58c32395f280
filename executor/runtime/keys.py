"""Backend API keys rotated without a restart: a watched `api_key_file`, and SIGHUP.

`KeyRotation` owns one task that looks, every `check_every_s`, at the modification
time (and size) of each configured `api_key_file`; when one changed it reads the new
key, hands it to its backend (`set_api_key`: new requests use it, calls in flight
keep the old one) and registers it with the process's `SecretMasker` before anything
could log it. `reload(config)` does the same from a freshly read config (the daemon
calls it on SIGHUP), for keys given inline (`api_key = "${VAR}"` re-expanded) and
in files alike. Only the keys change: other settings need a restart.

Backends are matched to config entries by position: `[llm_client]` is the single
backend; a pool's members are matched to `[[executors.backends]]` by name. A backend
without `set_api_key` (a plugin, the local model) is left alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from executor.backends.base import Backend
from executor.config import ExecutorConfig
from executor.secrets import SecretMasker, read_key_file

log = structlog.get_logger(logger_name=__name__)


@dataclass(frozen=True, slots=True)
class _Target:
    name: str  # "llm_client" or the pool member's name, for logs
    api_key: str | None
    api_key_file: str | None
    set_key: Callable[[str | None], None]


def _targets(backend: Backend, config: ExecutorConfig) -> list[_Target]:
    members = getattr(backend, "members", None)
    found: list[_Target] = []
    if members is not None:
        entries = {e.name: e for e in config.executors.backends}
        for member in members:
            entry = entries.get(member.name)
            setter = getattr(member.backend, "set_api_key", None)
            if entry is not None and callable(setter):
                found.append(_Target(member.name, entry.api_key, entry.api_key_file, setter))
        return found
    setter = getattr(backend, "set_api_key", None)
    if callable(setter):
        llm = config.llm_client
        found.append(_Target("llm_client", llm.api_key, llm.api_key_file, setter))
    return found


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.expanduser(path))
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class KeyRotation:
    def __init__(
        self, backend: Backend, config: ExecutorConfig, masker: SecretMasker, *, check_every_s: float = 2.0
    ) -> None:
        self._backend = backend
        self._masker = masker
        self.check_every_s = check_every_s
        self._targets = _targets(backend, config)
        self._stamps = {t.api_key_file: _stamp(t.api_key_file) for t in self._targets if t.api_key_file}
        self._task: asyncio.Task[None] | None = None
        # Target name -> the key it uses now (so a reload that changes nothing changes nothing).
        self._current: dict[str, str] = {}
        for t in self._targets:
            try:
                key = read_key_file(t.api_key_file) if t.api_key_file else t.api_key
            except OSError:
                key = None
            if key:
                self._current[t.name] = key
        self.rotations = 0

    async def start(self) -> None:
        if self._task is None and self._targets:
            self._task = asyncio.create_task(self._watch(), name="api-key-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def reload(self, config: ExecutorConfig) -> None:
        """Apply the keys of a freshly loaded config (SIGHUP)."""
        self._targets = _targets(self._backend, config)
        for target in self._targets:
            if target.api_key_file:
                self._stamps[target.api_key_file] = _stamp(target.api_key_file)
                self._apply_file(target)
            else:
                self._apply(target, target.api_key)

    def check_files(self) -> None:
        """Read again every key file whose modification time or size changed."""
        for target in self._targets:
            path = target.api_key_file
            if path is None:
                continue
            stamp = _stamp(path)
            if stamp is not None and stamp != self._stamps.get(path):
                self._stamps[path] = stamp
                self._apply_file(target)

    def _apply_file(self, target: _Target) -> None:
        assert target.api_key_file is not None
        try:
            key = read_key_file(target.api_key_file)
        except OSError as e:
            log.warning("api_key_file cannot be read; keeping the current key", backend=target.name,
                        file=target.api_key_file, error=e.strerror)  # fmt: skip
            return
        self._apply(target, key)

    def _apply(self, target: _Target, key: str | None) -> None:
        if not key:
            log.warning("empty API key ignored; keeping the current key", backend=target.name)
            return
        if self._current.get(target.name) == key:
            return
        self._masker.add(key)  # before anything could log it
        target.set_key(key)
        self._current[target.name] = key
        self.rotations += 1
        log.info("backend API key updated", backend=target.name)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_every_s)
            self.check_files()
