"""A real Prometheus for telemetry tests: Debian's `prometheus` binary on a free port, scraping
the targets a test names every second, and one-value PromQL queries against its HTTP API; the
shipped dashboard's queries, and the ports this process listens on."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.wait import eventually

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "Prometheus is not installed: apt-get install -y prometheus (Debian's package)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """(the binary, a working directory) for a Prometheus the test starts once it knows its target."""
    yield prometheus_binary(), tmp_path / "prometheus"


async def start_prometheus(stack: AsyncExitStack, binary: str, workdir: Path, target: str,
                           job: str = "lloom-executor") -> str:  # fmt: skip
    """Prometheus scraping `target` every second; returns its HTTP API's base URL once it is ready."""
    workdir.mkdir()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
    )
    listen = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={listen}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def stop() -> None:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()

    stack.push_async_callback(stop)
    http = await stack.enter_async_context(aiohttp.ClientSession())
    base = f"http://{listen}"

    async def ready() -> bool:
        if proc.returncode is not None:
            pytest.fail(f"prometheus exited {proc.returncode}: {(await proc.stderr.read()).decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            async with http.get(f"{base}/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(ready, timeout=60, what="prometheus ready")
    return base


async def promql(base: str, query: str) -> float | None:
    """The single value of an instant query, or None while it has no result."""
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/v1/query", params={"query": query}) as r:
        body = await r.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def listening_ports() -> set[int]:
    """The TCP ports this process listens on: its sockets' inodes looked up in /proc/net/tcp(6)."""
    mine = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in mine:  # TCP_LISTEN, ours
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def dashboard_queries(*, gateway: bool) -> list[str]:
    """The PromQL expressions of compose/grafana/lloom-dashboard.json, variables filled in: the
    executor's panels, or the gateway's (those of the `$gateway` variable; tests/test_gateway_telemetry.py)."""
    dashboard = json.loads((ROOT / "compose" / "grafana" / "lloom-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"] if ("$gateway" in t["expr"]) == gateway]
    assert len(exprs) >= (8 if gateway else 15)
    return [e.replace("$instance", ".*").replace("$gateway", ".*").replace("$model", ".*")
            .replace("$__rate_interval", "1m") for e in exprs]


def outside_address() -> str | None:
    """An address of this machine other than loopback (where another host would connect), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address
