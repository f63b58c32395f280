"""The gateway's status page over HTTP: the page and its assets, /status.json, and the live SSE feed.

(tests/test_status_page_browser.py shows the same page in a real headless browser.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from executor.gateway import status_page
from executor.process.embedded_nats import EmbeddedNats
from tests.helpers.gateway import Network, offer
from tests.helpers.wait import within

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


async def test_the_page_and_its_assets_come_from_the_gateway_alone(net: Network) -> None:
    gw = await net.gateway(extra_routes=[status_page.register])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            page = await r.text()
        assets = re.findall(r'(?:src|href)="(/status/static/[^"]+)"', page)
        assert sorted(assets) == ["/status/static/status.css", "/status/static/status.js"]
        for path in assets:
            async with http.get(f"{gw.url}{path}") as r:
                assert r.status == 200
                text = await r.text()
                # Nothing from another origin: no CDN, no fonts, no analytics.
                assert not re.search(r"https?://", text), path
                if path.endswith(".js"):
                    assert "innerHTML" not in text and "insertAdjacentHTML" not in text
        async with http.get(f"{gw.url}/status/static/../../app.py") as r:
            assert r.status == 404
        # The OpenAI API is untouched beside it.
        async with http.get(f"{gw.url}/v1/models") as r:
            assert r.status == 200


async def test_status_json_shows_executors_models_prices_and_load(net: Network) -> None:
    await net.executor("exe-a", offer("m-1", "0.50", "1.50", context=4096), offer("m-2", "2", "3"))
    gw = await net.gateway(extra_routes=[status_page.register])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/status.json") as r:
            snap = await r.json()
    [x] = snap["executors"]
    assert (x["id"], x["state"], x["in_flight"]) == ("exe-a", "up", 0) and x["capacity"] >= 1
    assert [(o["model"], o["input_price"], o["output_price"]) for o in x["offers"]] == [
        ("m-1", "0.50", "1.50"), ("m-2", "2", "3")]
    assert [(m["name"], m["executors"]) for m in snap["models"]] == [("m-1", 1), ("m-2", 1)]


async def next_snapshot(lines: aiohttp.StreamReader) -> dict:
    """The next `snapshot` event of an SSE stream (keepalive comments skipped)."""
    event = None
    while True:
        line = (await lines.readline()).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "snapshot":
            return json.loads(line[6:])


async def test_the_event_stream_pushes_an_executor_that_joins_and_one_that_leaves(
    net: Network, js_server: EmbeddedNats, tmp_path: Path) -> None:  # fmt: skip
    await net.executor("exe-a", offer("m-1"))
    gw = await net.gateway(extra_routes=[status_page.register])
    other = Network(js_server.url, tmp_path / "b")
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/status/events") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        ids = lambda snap: [x["id"] for x in snap["executors"]]  # noqa: E731
        assert ids(await within(next_snapshot(r.content), "the first snapshot")) == ["exe-a"]
        try:
            await other.executor("exe-b", offer("m-2"))

            async def until(want: list[str]) -> None:
                while ids(await next_snapshot(r.content)) != want:
                    pass

            await within(until(["exe-a", "exe-b"]), "exe-b in a pushed snapshot", timeout=10)
        finally:
            await other.aclose()
        await within(until(["exe-a"]), "exe-b gone from a pushed snapshot", timeout=15)


async def test_stopping_the_gateway_ends_open_event_streams_at_once(net: Network) -> None:
    gw = await net.gateway(extra_routes=[status_page.register], drain_secs=30)
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/status/events") as r:
        await within(next_snapshot(r.content), "the first snapshot")
        # Without the feed closing on shutdown, stop would wait the whole 30 s drain for this stream.
        await within(gw.stop(), "the gateway stopped with a watcher connected", timeout=10)


def _can_build_wheels_offline() -> bool:
    try:
        import setuptools
        from packaging.version import Version
    except ImportError:
        return False
    # setuptools builds wheels itself from 70.1 on; older needs the `wheel` package.
    if Version(setuptools.__version__) < Version("70.1"):
        try:
            import wheel  # noqa: F401
        except ImportError:
            return False
    return Version(setuptools.__version__) >= Version("68")


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels_offline(), reason="needs setuptools>=70.1 (or >=68 with wheel) in the"
                    " venv to build without downloading: pip install 'setuptools>=70.1'")
def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300)  # fmt: skip
    [wheel] = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("index.html", "status.css", "status.js"):
        assert f"executor/gateway/status_page/static/{asset}" in names
