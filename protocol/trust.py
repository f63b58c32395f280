"""Who a client believes: the executor keys it trusts, the operator keys whose endorsements it accepts.

A `Trust` is a value the client, the catalogue, routing and `lloom receipts verify`
share. It is read from a keyring file (`--trust FILE`, `LLOOM_TRUSTED_KEYS`), one
public nkey per line, `#` starting a comment:

    # executors we run ourselves
    NBX4...   gpu-box-1
    # our operator: every executor key it endorses is trusted too
    OCQ7...

- `N...` lines are executor keys, trusted as they are;
- `O...` lines are operator keys: an executor key they *endorse* is trusted. An
  `Endorsement` is the operator's Ed25519 signature over `ENDORSE_DOMAIN || executor key`;
  the executor announces it in its catalogue entry and attaches it to its receipts
  (make one with `scripts/endorse.py`).

A `Trust` with no keys at all is the open network: every key is accepted, and what
protects a caller is the binding of an executor id to the first key that announced it
(protocol/catalog.py) plus the receipt checks of protocol/verify.py. A `Trust` with keys
is a closed network: replies, catalogue entries and receipts from any other key are
refused, and routing never picks them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nkeys

from protocol.identity import Identity, IdentityError, check_public_key, verify

ENDORSE_DOMAIN = b"lloom-endorsement-v1:"
TRUST_ENV = "LLOOM_TRUSTED_KEYS"
# A keyring larger than this is a mistake (or not a keyring at all).
MAX_TRUSTED_KEYS = 100_000


class Endorsement(msgspec.Struct, frozen=True):
    """An operator's signature vouching for one executor key."""

    operator: str  # the operator's public nkey, O...
    sig: str  # base64url Ed25519 over ENDORSE_DOMAIN || executor key


class EndorsementFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What `scripts/endorse.py` writes and an executor's `[node] endorsement_file` names (JSON)."""

    executor_key: str
    operator: str
    sig: str


class TrustError(Exception):
    """A keyring or endorsement that cannot be used (unreadable, a line that is not a public key, ...)."""


def load_endorsement(path: Path | str, executor_key: str) -> Endorsement:
    """The endorsement in `path`, checked to be a valid one of `executor_key`; `TrustError` if not."""
    path = Path(path).expanduser()
    try:
        found = msgspec.json.decode(path.read_bytes(), type=EndorsementFile)
    except OSError as e:
        raise TrustError(f"{path}: cannot read the endorsement: {e.strerror}") from e
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TrustError(f"{path}: not an endorsement: {e}") from e
    if found.executor_key != executor_key:
        raise TrustError(f"{path}: endorses key {found.executor_key}, but this executor's key is {executor_key}")
    endorsement = Endorsement(operator=found.operator, sig=found.sig)
    if not endorsement_valid(endorsement, executor_key):
        raise TrustError(f"{path}: the signature is not {found.operator}'s over this executor's key")
    return endorsement


def endorse(operator: Identity, executor_key: str) -> Endorsement:
    """The operator's endorsement of `executor_key` (which must be an executor's N... key)."""
    check_public_key(executor_key)
    return Endorsement(operator=operator.public_key, sig=operator.sign(ENDORSE_DOMAIN + executor_key.encode()))


@functools.lru_cache(maxsize=4096)
def endorsement_valid(endorsement: Endorsement, executor_key: str) -> bool:
    # Cached: every reply and announcement of an endorsed executor carries the same endorsement.
    return verify(endorsement.operator, ENDORSE_DOMAIN + executor_key.encode(), endorsement.sig,
                  prefix=nkeys.PREFIX_BYTE_OPERATOR)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Trust:
    """The executor and operator keys a client trusts; none at all means an open network.

    `verify=False` turns reply verification off, for networks whose executors issue
    no receipts (`[receipts] enabled = false`): replies are then believed as they come."""

    executor_keys: frozenset[str] = field(default_factory=frozenset)
    operator_keys: frozenset[str] = field(default_factory=frozenset)
    verify: bool = True

    @property
    def closed(self) -> bool:
        """Whether a keyring decides (True), rather than trust on first use (False)."""
        return bool(self.executor_keys or self.operator_keys)

    def trusts(self, executor_key: str, endorsement: Endorsement | None = None) -> bool:
        if not self.closed or executor_key in self.executor_keys:
            return True
        return (
            endorsement is not None
            and endorsement.operator in self.operator_keys
            and endorsement_valid(endorsement, executor_key)
        )

    @classmethod
    def of(cls, keys: Iterable[str], *, verify: bool = True) -> Trust:
        """A keyring from public keys (N... executors, O... operators); `TrustError` on anything else."""
        executors, operators = set(), set()
        for key in keys:
            kind = _kind(key)
            (executors if kind == "executor" else operators).add(key)
        return cls(frozenset(executors), frozenset(operators), verify)

    @classmethod
    def parse(cls, text: str, *, source: str = "keyring", verify: bool = True) -> Trust:
        keys = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key = line.split()[0]  # anything after the key is a label
            try:
                _kind(key)
            except TrustError as e:
                raise TrustError(f"{source}:{number}: {e}") from None
            keys.append(key)
            if len(keys) > MAX_TRUSTED_KEYS:
                raise TrustError(f"{source}: more than {MAX_TRUSTED_KEYS} keys")
        return cls.of(keys, verify=verify)

    @classmethod
    def from_file(cls, path: Path | str, *, verify: bool = True) -> Trust:
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not a text file"
            raise TrustError(f"{path}: cannot read the trusted keys: {why}") from e
        return cls.parse(text, source=str(path), verify=verify)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, *, verify: bool = True) -> Trust:
        """The keyring named by `LLOOM_TRUSTED_KEYS` (a file path), or the open network if unset."""
        path = environ.get(TRUST_ENV)
        return cls.from_file(path, verify=verify) if path else cls(verify=verify)


def _kind(key: str) -> str:
    try:
        if key.startswith("N"):
            check_public_key(key)
            return "executor"
        if key.startswith("O"):
            check_public_key(key, nkeys.PREFIX_BYTE_OPERATOR)
            return "operator"
    except IdentityError as e:
        raise TrustError(f"{key[:12]}...: {e}") from None
    raise TrustError(f"{key[:12]!r} is not an executor (N...) or operator (O...) public key")


OPEN = Trust()
