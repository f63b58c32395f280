"""The live status page of the network: `GET /`, `GET /status.json` and `GET /status/events`.

    app = make_app(client, config, extra_routes=[status_page.register])

`register(app, client=None)` (the client defaults to the app's `LloomClient`) adds:

- `GET /`: a page a person reads at a glance (executors, models, prices, health, load,
  throughput and latency); its CSS and script are package data served from `/status/static/`,
  nothing from another origin.
- `GET /status.json`: one `StatusSnapshot` (snapshot.py).
- `GET /status/events`: Server-Sent Events, one `snapshot` event with the current
  snapshot at once and one more whenever it changes, so the page updates without a reload.

One `StatusFeed` per application follows the catalogue (`Catalog.wait_changed`, and a
once-a-second look, because executors that go silent expire without a change event) and
keeps the last snapshot encoded once for every watcher. Executor ids and model names come
from announcements, that is, from anyone on the bus: the page's script puts them in the
document with `textContent` only, never as HTML.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from executor.gateway.app import CLIENT_KEY
from executor.gateway.status_page.feed import FEED_KEY, StatusFeed
from protocol.client import LloomClient

_STATIC = {
    "status.css": "text/css",
    "status.js": "text/javascript",
}
# No script or style from anywhere else, nothing inline: a model name that slipped into
# the markup still could not run.
_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def register(app: web.Application, client: LloomClient | None = None) -> None:
    if client is None:
        client = app[CLIENT_KEY]
    feed = StatusFeed(client)
    app[FEED_KEY] = feed
    page = _asset("index.html")
    assets = {name: (_asset(name), kind) for name, kind in _STATIC.items()}
    headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=headers)

    async def static(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        return web.Response(body=found[0], content_type=found[1], charset="utf-8", headers=headers)

    async def snapshot(request: web.Request) -> web.Response:
        return web.Response(body=await feed.current(), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # fmt: skip
        await resp.prepare(request)
        async for data in feed.watch():
            await resp.write(data)
        return resp

    app.router.add_get("/", index)
    app.router.add_get("/status.json", snapshot)
    app.router.add_get("/status/events", events)
    app.router.add_get("/status/static/{name}", static)
    app.on_shutdown.append(lambda _app: feed.close())
