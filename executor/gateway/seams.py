"""What `[gateway]` plugs into the app's seams: the admission (API keys or open) and the extra routes.

    admission, routes = await seams_for(client, config.gateway)   # KeyStoreError if keys are on and unreachable
    GatewayServer(client, config.gateway, admission=admission, extra_routes=routes)

Shared by `lloom-gateway` (cli.py) and the executor daemon's in-process gateway, so both
turn on the same things from the same config. With `api_keys = true` and the keys bucket
unreachable it raises instead of serving without keys: a gateway meant to be closed never
opens by accident.
"""

from __future__ import annotations

from executor.config import GatewayConfig
from executor.gateway import status_page
from executor.gateway.admission import OPEN, Admission
from executor.gateway.app import RouteRegistrar
from executor.gateway.keys import KeyAdmission
from executor.gateway.keystore import KeyStore
from protocol.client import LloomClient


async def seams_for(client: LloomClient, config: GatewayConfig) -> tuple[Admission, list[RouteRegistrar]]:
    admission: Admission = OPEN
    if config.api_keys:
        keyed = KeyAdmission(KeyStore(client.nc), gateway=config.client_id or "gateway",
                             hold_ttl_s=config.hold_ttl_secs)  # fmt: skip
        await keyed.start()
        admission = keyed
    routes: list[RouteRegistrar] = [status_page.register] if config.status_page else []
    return admission, routes
