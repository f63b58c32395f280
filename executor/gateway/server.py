"""`GatewayServer`: the gateway's listening socket and its lifetime (start, drain, stop).

    server = GatewayServer(client, config)
    await server.start()            # listening; server.url is http://host:port
    ...
    await server.stop()             # stop accepting; open requests and streams get drain_secs to finish

Handler cancellation is on: a client that disconnects cancels its handler, which cancels
its job at the executor (`LloomClient` sends the cancel when its call is cancelled).
Owned by `lloom-gateway` (executor/gateway/cli.py) or by the executor daemon's exit
stack (executor/runtime/daemon.py), which stops it before the node drains.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import web

from executor.config import GatewayConfig
from executor.gateway.admission import OPEN, Admission
from executor.gateway.app import Middleware, RouteRegistrar, make_app
from executor.gateway.generation import Generations
from protocol.client import LloomClient

_log = logging.getLogger("executor.gateway")


class ListenError(ValueError):
    pass


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"listen address {listen!r} must be host:port (e.g. 127.0.0.1:8640)")
    return host.strip("[]") or "127.0.0.1", int(port)


class GatewayServer:
    def __init__(
        self,
        client: LloomClient,
        config: GatewayConfig,
        *,
        admission: Admission = OPEN,
        extra_routes: Iterable[RouteRegistrar] = (),
        observer: Middleware | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.admission = admission
        self.host, self.port = parse_listen(config.listen)
        self.generations = Generations(client.nc, remember=config.remember_generations)
        self.app = make_app(client, config, admission=admission, extra_routes=extra_routes,
                            generations=self.generations, observer=observer)  # fmt: skip
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; `OSError` if the address is taken."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.config.drain_secs)  # fmt: skip
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        if self.admission is OPEN:
            _log.warning("gateway at %s/v1 has no API keys: anyone who can reach this port can use it"
                         " (and spend what executors charge)", self.url)  # fmt: skip

    async def stop(self) -> None:
        """Stop accepting at once; let open requests and streams finish for up to drain_secs; close."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        # Then the admission's own work for the requests just finished (API keys: settlements).
        close = getattr(self.admission, "aclose", None)
        if close is not None:
            await close()
