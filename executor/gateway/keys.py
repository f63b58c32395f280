"""`KeyAdmission`: the gateway's API keys, rate limits and budgets (the `admission` seam of app.py).

    admission = KeyAdmission(KeyStore(client.nc), gateway="gateway-1")
    await admission.start()                      # opens the keys bucket and the settlements stream
    app = make_app(client, config, admission=admission)
    ...
    await admission.aclose()                     # after the server stopped: finishes pending settlements

Per request, in the order app.py calls it:

- `authorize(request)`: the `Authorization: Bearer lloom_<id>_<secret>` header names a key in
  the bucket whose SHA-256 matches (`MissingKey`, `Unauthorized`, `RevokedKey`: 401), then
  takes a token from the key's per-gateway rate limit (`TooManyRequests`: 429 with
  Retry-After). Returns a `KeyGrant` for this request.
- `hold(grant, estimated_cost)`: refuses with `PaymentRequired` (402) when the key's budget
  minus its spend and open holds cannot cover the estimate (the most the job can cost), before
  anything is sent to an executor; otherwise records the estimate as a hold in the key's
  record, shared by every gateway. Keys without a budget hold nothing (no write).
- `settle(grant, receipt | None)`: once per request, in a task this admission owns (the answer
  does not wait for it; `aclose()` finishes them): removes the hold and adds the signed
  receipt's cost to the key's spend (one optimistic-concurrency write), then appends a
  `Settlement` (protocol/settlements.py) so `lloom receipts report --by-key` can bill the
  receipt to the key. Without a receipt (the job failed before one) the hold is released.
  Until that write lands the hold still counts, so a pending settlement never lets a key
  spend past its budget.

The bucket unreachable is `KeysUnavailable` (503): nothing is admitted blind. Keys are never
logged (only their ids); a hold a crashed gateway never settles stops counting after
`hold_ttl_s`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from decimal import Decimal

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web

from executor.gateway.errors import KeysUnavailable, MissingKey, PaymentRequired, RevokedKey, TooManyRequests, Unauthorized
from executor.gateway.keystore import Hold, KeyRecord, KeyStore, KeyStoreError, UnknownKey, matches, parse_key
from executor.gateway.ratelimit import RateLimiter
from protocol import settlements
from protocol.receipts import SignedReceipt

_log = logging.getLogger("executor.gateway.keys")
_BEARER = "bearer "


class KeyGrant:
    """One admitted request: its key as read, and what it holds until settled."""

    __slots__ = ("record", "revision", "hold_id", "held", "settled")

    def __init__(self, record: KeyRecord, revision: int) -> None:
        self.record = record
        self.revision = revision
        self.hold_id: str | None = None
        self.held = Decimal(0)
        self.settled = False

    @property
    def key_id(self) -> str:
        return self.record.id


class KeyAdmission:
    wants_estimate = True

    def __init__(self, store: KeyStore, *, gateway: str, limiter: RateLimiter | None = None,
                 hold_ttl_s: float = 600.0) -> None:  # fmt: skip
        self.store = store
        self.gateway = gateway
        self.limiter = limiter or RateLimiter()
        self.hold_ttl_ms = int(hold_ttl_s * 1000)
        self._settling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open the keys bucket and the settlements stream (`KeyStoreError` if the bus refuses)."""
        await self.store.bucket()
        try:
            await settlements.ensure(self.store.nc.jetstream())
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise KeyStoreError(f"cannot open the settlements stream {settlements.STREAM}: {e}") from e

    async def authorize(self, request: web.Request) -> KeyGrant:
        header = request.headers.get("Authorization", "")
        if header[: len(_BEARER)].lower() != _BEARER:
            raise MissingKey("this gateway needs an API key: send `Authorization: Bearer lloom_...`"
                             " (`lloom-gateway keys create` makes one)")  # fmt: skip
        key = header[len(_BEARER) :].strip()
        key_id = parse_key(key)
        if key_id is None:
            raise Unauthorized("invalid API key (a Lloom key looks like lloom_<12 hex digits>_<43 characters>)")
        try:
            record, revision = await self.store.get(key_id)
        except UnknownKey:
            raise Unauthorized(f"invalid API key (key {key_id})") from None
        except KeyStoreError as e:
            raise KeysUnavailable(f"cannot check API keys now: {e}", retry_after_s=1) from None
        if not matches(record, key):
            raise Unauthorized(f"invalid API key (key {key_id})")
        if record.revoked:
            raise RevokedKey(f"API key {key_id} ({record.name}) was revoked")
        wait = self.limiter.take(key_id, record.rpm)
        if wait is not None:
            raise TooManyRequests(f"API key {key_id} is over its rate limit of {record.rpm} requests per minute"
                                  " (per gateway)", retry_after_s=wait)  # fmt: skip
        return KeyGrant(record, revision)

    async def hold(self, grant: KeyGrant, estimated_cost: Decimal | None) -> None:
        estimate = estimated_cost if estimated_cost is not None and estimated_cost > 0 else Decimal(0)
        if grant.record.budget is None:
            return  # unlimited: nothing to check, nothing to hold (settle still records spend)
        hold_id = secrets.token_hex(8)
        now = self.store.now_ms()

        def take(r: KeyRecord) -> KeyRecord:
            if r.revoked:
                raise RevokedKey(f"API key {r.id} ({r.name}) was revoked")
            remaining = r.remaining(now)
            if remaining is not None and (remaining <= 0 or estimate > remaining):
                raise PaymentRequired(
                    f"API key {r.id} ({r.name}) cannot cover this request: budget {r.budget} USD, spent {r.spend},"
                    f" held by open requests {r.held(now)}; this request may cost up to {estimate} USD"
                )
            holds = {k: h for k, h in r.holds.items() if h.expires_ms > now}
            holds[hold_id] = Hold(amount=estimate, expires_ms=now + self.hold_ttl_ms)
            return msgspec.structs.replace(r, holds=holds)

        try:
            grant.record, grant.revision = await self.store.change(grant.key_id, take,
                                                                   known=(grant.record, grant.revision))  # fmt: skip
        except KeyStoreError as e:
            raise KeysUnavailable(f"cannot hold the budget now: {e}", retry_after_s=1) from None
        grant.hold_id, grant.held = hold_id, estimate

    async def settle(self, grant: KeyGrant | None, receipt: SignedReceipt | None) -> None:
        """Bill the request in the background (the answer need not wait for two writes to the bus)."""
        if grant is None or grant.settled:
            return
        grant.settled = True
        if grant.hold_id is None and receipt is None:
            return
        # Safe for the budget while pending: the hold keeps counting until this write removes it.
        task = asyncio.create_task(self._settle(grant, receipt), name=f"settle-{grant.key_id}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Wait for every settlement under way (tests; and `aclose`)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def aclose(self) -> None:
        """Finish the settlements under way; call after the server stopped taking requests."""
        await self.drain()

    async def _settle(self, grant: KeyGrant, receipt: SignedReceipt | None) -> None:
        cost = receipt.receipt.cost if receipt is not None else Decimal(0)
        hold_id = grant.hold_id
        now = self.store.now_ms()

        def bill(r: KeyRecord) -> KeyRecord:
            holds = {k: h for k, h in r.holds.items() if k != hold_id and h.expires_ms > now}
            return msgspec.structs.replace(r, holds=holds, spend=r.spend + cost)

        try:
            if hold_id is None and cost == 0:
                pass  # nothing held, nothing spent: only the settlement below
            else:
                # The record as this request's hold left it: one write when no other request wrote since.
                await self.store.change(grant.key_id, bill, known=(grant.record, grant.revision))
        except KeyStoreError as e:
            # The receipt and the settlement below still record the cost; the hold expires by itself.
            _log.error("could not add %s USD to the spend of API key %s: %s", cost, grant.key_id, e)
        except Exception:  # a bug: logged, never lost silently in a background task
            _log.exception("settling a request of API key %s failed", grant.key_id)
        if receipt is not None:
            await self._record(grant, receipt, now)

    async def _record(self, grant: KeyGrant, receipt: SignedReceipt, now: int) -> None:
        r = receipt.receipt
        s = settlements.Settlement(key_id=grant.key_id, key_name=grant.record.name, job_id=r.job_id,
                                   executor_id=r.executor_id, executor_key=r.executor_key, receipt_seq=r.seq,
                                   cost=r.cost, held=grant.held, gateway=self.gateway, at_ms=now)  # fmt: skip
        try:
            await settlements.publish(self.store.nc.jetstream(), s)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            _log.error("could not record the settlement of job %s to API key %s: %s", r.job_id, grant.key_id, e)
