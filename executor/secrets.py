"""Secrets masked by value: every configured secret, whatever its shape, never leaves the process in clear.

Masking by key name (`api_key=...`, executor/process/logs.py) and by shape (`sk-...`,
`Bearer ...`) misses a key called `hunter2-key-XYZ` that a backend repeats inside an
error body. So the process registers the value of every secret it is configured with
(backend API keys, the contents of `api_key_file`s, the user and password inside a
`base_url` or `nats_url`) once in a `SecretMasker`, which replaces each occurrence by
`***`. The masker is a structlog processor (every string in every log event), the node
passes every error message through it before the message goes on the wire, and the
status a node reports is masked too. A key rotated at run time is added when it is read.

Values shorter than `MIN_SECRET_LEN` are not registered: masking `abc` everywhere would
mangle logs more than it protects (such a key is no secret anyway).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from executor.config import ExecutorConfig

MIN_SECRET_LEN = 6
MASK = "***"
# LM Studio's placeholder key: not a secret, and masking it would hide a helpful hint.
_NOT_SECRETS = frozenset({"not-needed"})


class SecretMasker:
    """The set of secret values of this process, and `mask` to blank them out of any text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        new = {s for s in secrets if s and len(s) >= MIN_SECRET_LEN and s not in _NOT_SECRETS} - self._secrets
        if new:
            self._secrets |= new
            # Longest first, so a secret containing another is masked whole.
            self._pattern = re.compile("|".join(re.escape(s) for s in sorted(self._secrets, key=len, reverse=True)))

    def __len__(self) -> int:
        return len(self._secrets)

    def mask(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

    def mask_bytes(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        text = data.decode("utf-8", "replace")
        masked = self.mask(text)
        return data if masked == text else masked.encode()

    def _mask_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {k: self._mask_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._mask_value(v) for v in value)
        if isinstance(value, BaseException):
            return self.mask(str(value))  # an exception's text repeats what it was given
        return value

    def __call__(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        """The structlog processor: mask every string value of the event (nested ones too)."""
        if self._pattern is None:
            return event
        return {key: self._mask_value(value) for key, value in event.items()}


def url_secrets(url: str | None) -> list[str]:
    """The secrets inside a URL's userinfo, raw and percent-decoded: the password and `user:password`,
    or, without a password, the user part itself (`nats://TOKEN@host` carries a token there). A user
    name next to a password is not a secret, and masking a word like `operator` everywhere would
    mangle logs."""
    if not url or "@" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    if not userinfo:
        return []
    found = [userinfo, unquote(userinfo)]
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    return found


def redact_url(url: str) -> str:
    """`url` with any userinfo shown as `***` (`http://***@host:8000/v1`)."""
    if "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f"{MASK}@{parts.netloc.rpartition('@')[2]}"))


def read_key_file(path: str) -> str:
    """An `api_key_file`'s key: its content without surrounding whitespace."""
    return Path(path).expanduser().read_text().strip()


def config_secrets(config: ExecutorConfig) -> Iterator[str]:
    """Every secret value the config holds or points to (a key file that cannot be read is skipped here)."""
    llm = config.llm_client
    backends = [(llm.api_key, llm.api_key_file, llm.base_url)]
    backends += [(b.api_key, b.api_key_file, b.base_url) for b in config.executors.backends]
    for api_key, key_file, base_url in backends:
        if api_key:
            yield api_key
        if key_file:
            try:
                yield read_key_file(key_file)
            except OSError:
                pass
        yield from url_secrets(base_url)
    yield from url_secrets(config.node.nats_url)
    # The bus's own credentials ([nats]): a password or token given in the config or its environment.
    for secret in (config.nats.password, config.nats.token):
        if secret:
            yield secret
    if config.hub.password:
        yield config.hub.password
    yield from url_secrets(config.hub.url)
