"""The seam where API keys, rate limits and budgets plug in (built elsewhere), and its no-op default.

Every request that runs a job goes through it, in this order:

    grant = await admission.authorize(request)          # 401 Unauthorized / 429 TooManyRequests
    await admission.hold(grant, estimated_cost)         # 402 PaymentRequired; nothing has run yet
    ... the job runs ...
    await admission.settle(grant, receipt or None)      # always, once: the signed receipt bills it

`estimated_cost` (USD, a Decimal) is the most the job can cost at the dearest live offer of its
model for its estimated prompt and `max_tokens` (256 when unset); it is computed only when
`wants_estimate` is true, so the default admission costs nothing per request. An admission
refuses by raising the `executor.gateway.errors` type whose status it means.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Protocol

from aiohttp import web

from protocol.receipts import SignedReceipt


class Admission(Protocol):
    wants_estimate: bool

    async def authorize(self, request: web.Request) -> Any: ...

    async def hold(self, grant: Any, estimated_cost: Decimal | None) -> None: ...

    async def settle(self, grant: Any, receipt: SignedReceipt | None) -> None: ...


class OpenAdmission:
    """No keys configured: everyone who can reach the port may use the gateway (the log says so at start)."""

    wants_estimate = False

    async def authorize(self, request: web.Request) -> None:
        return None

    async def hold(self, grant: Any, estimated_cost: Decimal | None) -> None:
        return None

    async def settle(self, grant: Any, receipt: SignedReceipt | None) -> None:
        return None


OPEN = OpenAdmission()
