"""Fresh credentials for compose/docker-compose.yml: `.venv/bin/python compose/make_env.py`.

Owns the one place the compose deployment's secrets are made. It writes `compose/.env` (read by
`docker compose` for `${...}` in the compose file; mode 0600) with a random password for the NATS
routes, the admin, executor-1, alice, the gateway and laptop-1 (a leaf node's user), and the public nkeys of executor-2 and bob, and writes
their nkey seeds to `compose/secrets/` (a 0700 directory: the executor container reads
executor-2.nk through a bind mount, other users of the host cannot). Nothing here is a default to
keep: every run makes new ones, and an existing `.env` is kept unless `--force` is given.
Tests call `generate()` for a throw-away set.
"""

from __future__ import annotations

import argparse
import os
import secrets
import string
import sys
from pathlib import Path

import nkeys

HERE = Path(__file__).resolve().parent
# Every password variable of compose/nats/secure.conf (the server refuses to start without each).
PASSWORDS = ("LLOOM_NATS_ROUTE_PASSWORD", "LLOOM_NATS_ADMIN_PASSWORD", "LLOOM_NATS_EXECUTOR_1_PASSWORD",
             "LLOOM_NATS_ALICE_PASSWORD", "LLOOM_NATS_GATEWAY_PASSWORD", "LLOOM_NATS_LAPTOP_1_PASSWORD")  # fmt: skip
ALPHABET = string.ascii_letters + string.digits
NKEY_USERS = {"LLOOM_NATS_EXECUTOR_2_NKEY": "executor-2", "LLOOM_NATS_BOB_NKEY": "bob"}


def password() -> str:
    """32 letters and digits, starting with a letter: nats-server parses a variable's value as a
    config value, so one starting with a digit could be read as a number (docs/security.md)."""
    return secrets.choice(string.ascii_letters) + "".join(secrets.choice(ALPHABET) for _ in range(31))


def generate(secrets_dir: Path) -> dict[str, str]:
    """New passwords and nkeys as compose variables; the seeds go to `secrets_dir/<user>.nk`."""
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    env = {name: password() for name in PASSWORDS}
    for name, user in NKEY_USERS.items():
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        env[name] = nkeys.from_seed(bytearray(seed)).public_key.decode()
        path = secrets_dir / f"{user}.nk"
        path.write_bytes(seed + b"\n")
        # Readable by the container's user (uid 10001) through the bind mount; the 0700 directory
        # keeps everyone else on the host out.
        os.chmod(path, 0o644)
    env["LLOOM_COMPOSE_SECRETS"] = str(secrets_dir)
    return env


def main() -> int:
    p = argparse.ArgumentParser(description="Write compose/.env and compose/secrets/ with new credentials.")
    p.add_argument("--force", action="store_true", help="replace an existing compose/.env")
    args = p.parse_args()
    env_file = HERE / ".env"
    if env_file.exists() and not args.force:
        print(f"{env_file} exists (use --force to make new credentials)", file=sys.stderr)
        return 1
    env = generate(HERE / "secrets")
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# Made by compose/make_env.py: secrets for this machine only; never commit or share it.\n")
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    print(f"wrote {env_file} and {HERE / 'secrets'}/ (executor-2.nk, bob.nk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
