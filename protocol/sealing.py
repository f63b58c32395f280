"""Sealed jobs: X25519 curve keys in the nkeys encoding, and the boxes that seal a job both ways.

An executor that takes sealed jobs has a curve key pair, derived from its Ed25519
identity seed (so it needs no second file and survives restarts with the identity);
its public curve key (`X...`) travels in its signed announcement, which binds it to
the executor's identity. A client seals a job to that key with a fresh (ephemeral)
key pair of its own, names its ephemeral public key in the `Lloom-Sealed` header,
and the executor seals every reply message of the job with the same pair of keys.
`nacl.public.Box` (X25519, XSalsa20-Poly1305) authenticates as well as encrypts: only
the holder of the executor's curve secret can read the request or write a reply that
opens, so neither a bystander nor the bus operator can read or forge either.

Curve keys use the encoding NATS auth callout uses for `xkeys` (nkeys.py 0.2.1 has no
curve support, so it is here): base32 without padding of the prefix byte `X`
(23 << 3), the 32 key bytes and the CRC-16 of both, little-endian, as nkeys encodes
every other kind of key. Seeds are not encoded: the secret is derived, never stored.
"""

from __future__ import annotations

import base64
import functools

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nkeys

PREFIX_BYTE_CURVE = 23 << 3  # base32 "X", as in nkeys' Go implementation
# Domain separation: the curve secret is a hash of the identity seed, never the signing key itself.
_DERIVE_PERSON = b"lloom-curve-v1"


class SealError(Exception):
    """A curve key that is not one, or a sealed message that does not open with the keys at hand."""


def encode_curve_key(raw: bytes) -> str:
    """The `X...` text of a 32-byte X25519 public key."""
    if len(raw) != 32:
        raise SealError(f"a curve key is 32 bytes, got {len(raw)}")
    body = bytes([PREFIX_BYTE_CURVE]) + raw
    return base64.b32encode(body + nkeys.crc16_checksum(body)).rstrip(b"=").decode()


@functools.lru_cache(maxsize=4096)
def decode_curve_key(text: str) -> bytes:
    """The 32 raw bytes of an `X...` public curve key; `SealError` for anything else."""
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (ValueError, TypeError) as e:
        raise SealError("curve key is not base32") from e
    if len(raw) != 35 or raw[0] != PREFIX_BYTE_CURVE:
        raise SealError("not a public curve key (X...)")
    body, crc = raw[:-2], raw[-2:]
    if nkeys.crc16_checksum(body) != crc:
        raise SealError("curve key checksum mismatch")
    return body[1:]


def check_curve_key(text: str) -> str:
    decode_curve_key(text)
    return text


class CurveKeyPair:
    """An executor's curve key pair: opens sealed requests, seals their replies."""

    __slots__ = ("_secret", "public_key")

    def __init__(self, secret: nacl.public.PrivateKey) -> None:
        self._secret = secret
        self.public_key: str = encode_curve_key(bytes(secret.public_key))

    @classmethod
    def derive(cls, identity_seed: bytes) -> CurveKeyPair:
        """The pair belonging to an identity (its nkey seed text, `SN...`): the same seed, the same pair."""
        try:
            _, raw_seed = nkeys.decode_seed(bytearray(identity_seed))
        except nkeys.NkeysError as e:
            raise SealError(f"not an nkey seed: {type(e).__name__}") from e
        secret = nacl.hash.blake2b(bytes(raw_seed), digest_size=32, person=_DERIVE_PERSON[:16],
                                   encoder=nacl.encoding.RawEncoder)  # fmt: skip
        return cls(nacl.public.PrivateKey(secret))

    @classmethod
    def generate(cls) -> CurveKeyPair:
        return cls(nacl.public.PrivateKey.generate())

    def box_for(self, client_key: str) -> SealedBox:
        """The box of one job, from the client's ephemeral public key (the `Lloom-Sealed` header)."""
        return SealedBox(nacl.public.Box(self._secret, nacl.public.PublicKey(decode_curve_key(client_key))))


class SealedBox:
    """Seals and opens the messages of one job (either side: the key is the same both ways)."""

    __slots__ = ("_box",)

    def __init__(self, box: nacl.public.Box) -> None:
        self._box = box

    def seal(self, plaintext: bytes) -> bytes:
        """Random nonce, then ciphertext and tag: 40 bytes more than `plaintext`."""
        return bytes(self._box.encrypt(plaintext))

    def open(self, sealed: bytes) -> bytes:
        try:
            return self._box.decrypt(sealed)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, nacl.exceptions.TypeError) as e:
            raise SealError("the message does not open with this job's keys (tampered, or sealed to another key)") from e


class ClientSeal:
    """A client's side of one sealed job: a fresh key pair, sealed to the executor's curve key."""

    __slots__ = ("box", "header")

    def __init__(self, executor_key: str) -> None:
        ephemeral = nacl.public.PrivateKey.generate()
        self.header = encode_curve_key(bytes(ephemeral.public_key))  # the `Lloom-Sealed` header's value
        self.box = SealedBox(nacl.public.Box(ephemeral, nacl.public.PublicKey(decode_curve_key(executor_key))))
