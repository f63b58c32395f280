"""Executor identities: Ed25519 keys in the NATS nkeys encoding, and signatures with them.

An executor's identity is its public nkey (`N...`, the server prefix). It signs
what it announces (and later its receipts) with the matching seed; anyone can
check a signature from the public key alone, which travels in the signed
message itself. The seed lives in a file only its owner can read, so a
restarted executor keeps its identity.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys


class IdentityError(Exception):
    """A key that cannot be used (unreadable, malformed)."""


class Identity:
    """A signing key pair."""

    def __init__(self, seed: bytes) -> None:
        try:
            self._kp = nkeys.from_seed(bytearray(seed))
        except nkeys.NkeysError as e:
            raise IdentityError(f"not an nkey seed: {type(e).__name__}") from e
        self.public_key: str = self._kp.public_key.decode()
        self.seed = bytes(seed)

    @classmethod
    def generate(cls, prefix: int = nkeys.PREFIX_BYTE_SERVER) -> Identity:
        """A new key pair: an executor's (`N...`) by default, an operator's with `nkeys.PREFIX_BYTE_OPERATOR`."""
        return cls(nkeys.encode_seed(os.urandom(32), prefix))

    @classmethod
    def load_or_create(cls, path: Path, prefix: int = nkeys.PREFIX_BYTE_SERVER) -> Identity:
        """Read the seed at `path`, or create one there (mode 0600) on first use (of the kind `prefix`)."""
        try:
            return cls(path.read_bytes().strip())
        except FileNotFoundError:
            pass
        except OSError as e:
            raise IdentityError(f"{path}: cannot read the identity seed: {e.strerror}") from e
        identity = cls.generate(prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.seed + b"\n")
        return identity

    def sign(self, data: bytes) -> str:
        """The signature of `data`, base64url without padding (fits a NATS header)."""
        return base64.urlsafe_b64encode(self._kp.sign(data)).rstrip(b"=").decode()


def _raw_public_key(public_key: str, prefix: int = nkeys.PREFIX_BYTE_SERVER) -> bytes:
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (ValueError, TypeError) as e:
        raise IdentityError("public key is not base32") from e
    if len(raw) != 35 or raw[0] != prefix:
        raise IdentityError("not an executor public key (N...)" if prefix == nkeys.PREFIX_BYTE_SERVER
                            else "not an operator public key (O...)")  # fmt: skip
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if int.from_bytes(nkeys.crc16_checksum(body), "little") != crc:
        raise IdentityError("public key checksum mismatch")
    return body[1:]


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key: str, prefix: int) -> nacl.signing.VerifyKey:
    # Decoding a key costs as much as a twentieth of a verification; catalogues see the same keys again and again.
    return nacl.signing.VerifyKey(_raw_public_key(public_key, prefix))


def check_public_key(public_key: str, prefix: int = nkeys.PREFIX_BYTE_SERVER) -> str:
    """`public_key` if it is a well-formed public nkey of the kind `prefix` names; `IdentityError` if not."""
    _raw_public_key(public_key, prefix)
    return public_key


def verify(public_key: str, data: bytes, signature: str, *, prefix: int = nkeys.PREFIX_BYTE_SERVER) -> bool:
    """Whether `signature` is `public_key`'s signature of `data`; malformed input is False.

    `public_key` must be an executor key (`N...`) unless `prefix` names another kind."""
    try:
        sig = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        _verify_key(public_key, prefix).verify(data, sig)
    except (IdentityError, ValueError, TypeError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True
