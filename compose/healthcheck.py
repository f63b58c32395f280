"""An executor container's health check: is the executor's connection on one of the cluster's nodes?

    python3 healthcheck.py executor-1 8222 8223 8224      # exit 0 if connected, 1 if not

Owns only this question. It reads each node's monitoring endpoint (`/connz`, on 127.0.0.1) and
looks for the connection the executor names `lloom-executor <id>`. Asked of every node, because
after a node's loss the executor reconnects to another one. `lloom-executor status` would say
more, but asking it needs publish rights on `lloom.v1.status`, which the shipped permissions give
to the admin only, and the admin's password has no place in an executor's container.
Standard library only: it runs in the lloom image, bind-mounted by docker-compose.yml.
"""

from __future__ import annotations

import json
import sys
import urllib.request


def connected(name: str, port: int) -> bool:
    url = f"http://127.0.0.1:{port}/connz?limit=4096"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            connections = json.load(r).get("connections") or []
    except (OSError, ValueError):  # that node is down or not answering: ask the next
        return False
    return any(c.get("name") == name for c in connections)


def main(argv: list[str]) -> int:
    executor_id, ports = argv[0], [int(p) for p in argv[1:]]
    return 0 if any(connected(f"lloom-executor {executor_id}", p) for p in ports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
