"""The gateway's NATS role in the shipped permissions: a client that may also read the receipts stream.

Allowed: jobs, the catalogue, and reading receipts for /v1/generation. Denied: writing or
deleting receipts; and an ordinary client (alice) may not read the receipts stream at all.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import nats
import nats.errors
import nats.js.errors
import pytest

from protocol import subjects as subj
from protocol.connection import connect_nats
from tests.conftest import SecureBus
from tests.helpers.gateway import Network, offer
from tests.helpers.wait import eventually

MODEL = "gw-model"
DENIED = (nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)


async def test_the_gateway_role_serves_and_finds_receipts_in_the_stream(secure_bus: SecureBus, tmp_path: Path) -> None:
    net = Network(secure_bus.url, tmp_path)
    try:
        await net.executor("executor-1", offer(MODEL, "1", "1"), options=secure_bus.options("executor-1"))
        gw = await net.gateway(options=secure_bus.options("gateway"), remember_generations=0)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                job = (await r.json())["id"]

            async def found() -> dict | None:
                async with http.get(f"{gw.url}/v1/generation", params={"id": job}) as r:
                    return (await r.json())["data"] if r.status == 200 else None

            data = await eventually(found, timeout=15, what="the receipt read through the gateway role")
        assert data["verified"] is True and data["provider_name"] == "executor-1"
    finally:
        await net.aclose()


async def test_the_gateway_may_not_change_receipts_and_a_client_may_not_read_them(secure_bus: SecureBus) -> None:
    admin = await nats.connect(secure_bus.url, user="admin", password=secure_bus.passwords["admin"])
    gateway = await connect_nats(secure_bus.url, name="gw", options=secure_bus.options("gateway"))
    alice = await connect_nats(secure_bus.url, name="alice", options=secure_bus.options("alice"))
    try:
        from nats.js.api import StreamConfig

        await admin.jetstream().add_stream(StreamConfig(name=subj.RECEIPTS_STREAM, subjects=[subj.RECEIPTS_ALL]))
        info = await gateway.jetstream().stream_info(subj.RECEIPTS_STREAM)  # allowed: it reads
        assert info.config.name == subj.RECEIPTS_STREAM
        with pytest.raises(DENIED):
            await gateway.jetstream(timeout=1).delete_stream(subj.RECEIPTS_STREAM)
        with pytest.raises(DENIED):
            await gateway.jetstream(timeout=1).purge_stream(subj.RECEIPTS_STREAM)
        with pytest.raises(DENIED):
            await alice.jetstream(timeout=1).stream_info(subj.RECEIPTS_STREAM)
        # A receipt published by the gateway never lands: its permissions drop it.
        await gateway.publish(subj.receipts_subject("forger"), b"{}")
        await gateway.flush()
        assert (await admin.jetstream().stream_info(subj.RECEIPTS_STREAM)).state.messages == 0
    finally:
        for conn in (admin, gateway, alice):
            await conn.close()
