"""Make an operator key, and endorse executor keys with it (protocol/trust.py).

    python scripts/endorse.py operator-key operator.nk        # a new operator seed (mode 0600); prints O...
    python scripts/endorse.py endorse operator.nk NBX4... > endorsement.json
    python scripts/endorse.py public-key ~/.local/share/lloom/gpu-1.nk   # an executor's N... key from its seed

The executor names the endorsement in its config (`[node] endorsement_file`), announces
it and attaches it to its receipts; a client (or `lloom receipts verify`) whose keyring
(`--trust FILE`) lists the operator's O... key trusts every key the operator endorsed.
Keep the operator seed offline: whoever holds it can make any key trusted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec
import nkeys

from protocol.identity import Identity, IdentityError
from protocol.trust import EndorsementFile, TrustError, endorse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="endorse.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("operator-key", help="create an operator seed file and print its public key")
    new.add_argument("seed_file", type=Path)
    e = sub.add_parser("endorse", help="print the operator's endorsement of an executor key (JSON)")
    e.add_argument("seed_file", type=Path, help="the operator's seed file")
    e.add_argument("executor_key", help="the executor's public key, N...")
    pk = sub.add_parser("public-key", help="print the public key of a seed file")
    pk.add_argument("seed_file", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "operator-key":
            if args.seed_file.exists():
                print(f"endorse.py: {args.seed_file} exists; not overwriting an operator key", file=sys.stderr)
                return 2
            print(Identity.load_or_create(args.seed_file, nkeys.PREFIX_BYTE_OPERATOR).public_key)
            return 0
        identity = Identity(args.seed_file.read_bytes().strip())
        if args.command == "public-key":
            print(identity.public_key)
            return 0
        if not identity.public_key.startswith("O"):
            print(f"endorse.py: {args.seed_file} is not an operator seed (its key is {identity.public_key})",
                  file=sys.stderr)  # fmt: skip
            return 2
        made = endorse(identity, args.executor_key)
        doc = EndorsementFile(executor_key=args.executor_key, operator=made.operator, sig=made.sig)
        sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
        return 0
    except (OSError, IdentityError, TrustError) as err:
        print(f"endorse.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
