"""Credentials made for a test run: a certificate authority with server and client certificates, and a
NATS operator/account/user JWT chain with `.creds` files (what `openssl` and `nsc` would make).

Nothing here touches the network; tests/test_security_bus.py starts the servers that use them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Pki:
    """A test certificate authority with a server certificate (127.0.0.1, localhost) and a client one."""

    def __init__(self, directory: Path, name: str = "Lloom test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
            path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            path.with_suffix(".key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip

        def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
            return (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ca = (
            builder(name, ca_name, ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        write(directory / "ca", ca_key, ca)
        for leaf, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                builder(leaf, ca_name, key)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )  # fmt: skip
            write(directory / leaf, key, cert)
        self.ca = str(directory / "ca.pem")
        self.server_cert, self.server_key = str(directory / "server.pem"), str(directory / "server.key")
        self.client_cert, self.client_key = str(directory / "client.pem"), str(directory / "client.key")

    def server_args(self, *, verify_clients: bool = False) -> list[str]:
        args = ["--tls", "--tlscert", self.server_cert, "--tlskey", self.server_key]
        if verify_clients:
            args += ["--tlsverify", "--tlscacert", self.ca]
        return args


class JwtChain:
    """An operator, an account and users as JWTs, made here with nkeys (what `nsc` would make).

    A server in operator mode (`operator:` + `resolver: MEMORY`) trusts the account the
    operator signed, and the account signs its users; a user's `.creds` file holds its JWT
    and its nkey seed.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        _, self.operator, self.operator_pub = self.new_keys(nkeys.PREFIX_BYTE_OPERATOR)
        _, self.account, self.account_pub = self.new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
        operator_jwt = self._jwt(self.operator, {"iss": self.operator_pub, "sub": self.operator_pub, "name": "test",
                                                 "nats": {"type": "operator", "version": 2}})  # fmt: skip
        limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
                  "leaf": -1}  # leaf nodes too (tests/test_leaf_hub.py)
        account_jwt = self._jwt(self.operator, {"iss": self.operator_pub, "sub": self.account_pub, "name": "LLOOM",
                                                "nats": {"limits": limits, "type": "account", "version": 2}})  # fmt: skip
        self.config = directory / "operator.conf"
        self.config.write_text(f'operator: "{operator_jwt}"\nresolver: MEMORY\n'
                               f'resolver_preload: {{\n  {self.account_pub}: "{account_jwt}"\n}}\n')  # fmt: skip

    @staticmethod
    def new_keys(prefix: int) -> tuple[bytes, nkeys.KeyPair, str]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        pair = nkeys.from_seed(bytearray(seed))
        return seed, pair, pair.public_key.decode()

    @staticmethod
    def _jwt(signer: nkeys.KeyPair, claims: dict[str, object]) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        claims = {"iat": int(time.time()), "jti": "", **claims}
        claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode()
        head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = b64(json.dumps(claims).encode())
        return f"{head}.{body}.{b64(signer.sign(f'{head}.{body}'.encode()))}"

    def creds(self, name: str, *, subscribe: list[str], signer: nkeys.KeyPair | None = None) -> str:
        """A `.creds` file for user `name`, allowed to subscribe to `subscribe` (and publish anything)."""
        seed, _, public = self.new_keys(nkeys.PREFIX_BYTE_USER)
        issuer = signer or self.account
        user_jwt = self._jwt(issuer, {
            "iss": issuer.public_key.decode(), "sub": public, "name": name,
            "nats": {"pub": {}, "sub": {"allow": subscribe}, "subs": -1, "data": -1, "payload": -1,
                     "type": "user", "version": 2},
        })  # fmt: skip
        path = self.directory / f"{name}.creds"
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")  # fmt: skip
        return str(path)
