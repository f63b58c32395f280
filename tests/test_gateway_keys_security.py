"""Who may touch the API keys bucket and the settlements stream under the shipped permissions.

Allowed: the `gateway` user (it checks keys, holds and settles budgets, appends settlements)
and admin. Denied: a client (alice) and an executor may neither read a key's hash nor raise
its budget, nor read or forge settlements.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import aiohttp
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest

from executor.gateway.keys import KeyAdmission
from executor.gateway.keystore import KeyStore, KeyStoreError
from protocol import settlements
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.connection import connect_nats
from tests.conftest import SecureBus
from tests.helpers.gateway import Network, offer

MODEL = "gw-model"
DENIED = (nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)
BUCKET = subj.GATEWAY_KEYS_BUCKET


async def test_a_gateway_checks_holds_and_settles_keys_on_the_secure_bus(secure_bus: SecureBus, tmp_path: Path) -> None:
    net = Network(secure_bus.url, tmp_path)
    admin = await nats.connect(secure_bus.url, user="admin", password=secure_bus.passwords["admin"])
    try:
        await net.executor("executor-1", offer(MODEL, "1", "1"), options=secure_bus.options("executor-1"))

        async def keyed(client: LloomClient) -> KeyAdmission:
            admission = KeyAdmission(KeyStore(client.nc), gateway="gateway")
            await admission.start()  # the gateway role creates the bucket and the stream
            return admission

        gw = await net.gateway(options=secure_bus.options("gateway"), admission=keyed)
        record, key = await KeyStore(admin).create("carol", rpm=None, budget=Decimal(1))
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gw.url}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
                assert r.status == 200, await r.text()
                cost = Decimal((await r.json())["usage"]["cost"])
        await gw.admission.drain()  # type: ignore[attr-defined]  # settling runs after the answer
        after, _ = await KeyStore(admin).get(record.id)
        assert after.spend == cost > 0 and after.holds == {}
        [settled] = (await settlements.read_all(admin)).values()
        assert (settled.key_id, settled.cost) == (record.id, cost)
    finally:
        await admin.close()
        await net.aclose()


@pytest.mark.parametrize("outsider", ["alice", "executor-1"])
async def test_clients_and_executors_cannot_read_key_hashes_raise_budgets_or_forge_settlements(
    secure_bus: SecureBus, outsider: str) -> None:  # fmt: skip
    gateway = await connect_nats(secure_bus.url, name="gw", options=secure_bus.options("gateway"))
    other = await connect_nats(secure_bus.url, name=outsider, options=secure_bus.options(outsider))
    try:
        admission = KeyAdmission(KeyStore(gateway), gateway="gateway")
        await admission.start()
        record, _key = await admission.store.create("dave", rpm=5, budget=Decimal("0.5"))
        # The gateway (allowed) reads the record; the outsider cannot open the bucket, read the
        # entry through the stream API, or list the keys.
        assert (await KeyStore(gateway).get(record.id))[0].sha256 == record.sha256
        assert [r.id for r in await KeyStore(gateway).list()] == [record.id]  # `lloom-gateway keys list`
        with pytest.raises((KeyStoreError, *DENIED)):
            await KeyStore(other).list()
        with pytest.raises((KeyStoreError, *DENIED)):
            await KeyStore(other).get(record.id)
        with pytest.raises(DENIED):
            await other.request(f"$JS.API.STREAM.MSG.GET.KV_{BUCKET}",
                                msgspec.json.encode({"last_by_subj": f"$KV.{BUCKET}.key.{record.id}"}), timeout=1)  # fmt: skip
        with pytest.raises(DENIED):
            await other.request(f"$JS.API.DIRECT.GET.KV_{BUCKET}.$KV.{BUCKET}.key.{record.id}", b"", timeout=1)
        # Raising its budget by writing the entry: the publish is dropped, the record unchanged.
        rich = msgspec.structs.replace(record, budget=Decimal(1_000_000))
        await other.publish(f"$KV.{BUCKET}.key.{record.id}", msgspec.json.encode(rich))
        await other.flush()
        with pytest.raises(DENIED):
            await other.jetstream(timeout=1).publish(f"$KV.{BUCKET}.key.{record.id}", msgspec.json.encode(rich))
        assert (await KeyStore(gateway).get(record.id))[0].budget == Decimal("0.5")
        # Settlements: the gateway appends one; the outsider can neither read them nor forge one.
        await settlements.publish(gateway.jetstream(), settlements.Settlement(
            key_id=record.id, key_name="dave", job_id="job-1", executor_id="executor-1", executor_key="NX",
            receipt_seq=1, cost=Decimal("0.1"), held=Decimal("0.2"), gateway="gateway", at_ms=1))  # fmt: skip
        assert [s.job_id for s in (await settlements.read_all(gateway)).values()] == ["job-1"]
        with pytest.raises(DENIED):
            await settlements.read_all(other, timeout=1)
        with pytest.raises(DENIED):
            await other.jetstream(timeout=1).publish(subj.settlement_subject(record.id), b"{}")
        assert (await gateway.jetstream().stream_info(settlements.STREAM)).state.messages == 1
        # Nobody but admin deletes them.
        with pytest.raises(DENIED):
            await gateway.jetstream(timeout=1).delete_stream(f"KV_{BUCKET}")
    finally:
        await gateway.close()
        await other.close()
