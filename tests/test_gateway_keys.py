"""API keys, rate limits and budgets of the gateway (executor/gateway/keys.py), end to end.

Real nats-server with JetStream, real executors on the OpenAI double, real gateways with
`KeyAdmission`; keys made with the `lloom-gateway keys` command; spend settled from the
signed receipts and reported by `lloom receipts report --by-key`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from executor.gateway import keys_cli
from executor.gateway.errors import PaymentRequired
from executor.gateway.keys import KeyAdmission
from executor.gateway.keystore import KeyStore, RedactKeys, hash_key, parse_key
from executor.gateway.ratelimit import RateLimiter
from executor.process.embedded_nats import EmbeddedNats
from protocol import settlements
from protocol.cli import main as lloom_main
from protocol.client import LloomClient
from protocol.connection import connect_nats
from protocol.messages import ChatRequest, Message, Role
from tests.helpers.gateway import Network, offer
from tests.helpers.wait import eventually

MODEL = "gw-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "say hi"}], "max_tokens": 4}


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


async def keys(url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `lloom-gateway keys ...` against `url`; its exit code and what it printed."""
    code = await keys_cli.run(keys_cli.parse_args(["--nats", url, *argv]))
    return code, capsys.readouterr().out


async def create(url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out = await keys(url, capsys, "create", *argv)
    assert code == 0, out
    return out.strip().splitlines()[-1]


async def keyed(client: LloomClient) -> KeyAdmission:
    admission = KeyAdmission(KeyStore(client.nc), gateway="gw-test")
    await admission.start()
    return admission


async def post(http: aiohttp.ClientSession, url: str, key: str | None, body: dict = CHAT) -> tuple[int, dict, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_keys_are_created_listed_and_revoked_through_the_cli_and_stored_hashed(
    js_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    key = await create(js_server.url, capsys, "--name", "alice", "--budget", "2.50", "--rpm", "30")
    key_id = parse_key(key)
    assert key_id is not None
    code, out = await keys(js_server.url, capsys, "list", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row == {"id": key_id, "name": "alice", "created_ms": row["created_ms"], "revoked": False, "rpm": 30,
                   "budget": "2.50", "spend": "0", "held": "0"}  # fmt: skip
    # The bucket holds the hash, never the key.
    nc = await connect_nats(js_server.url, name="t")
    try:
        entry = await (await nc.jetstream().key_value("LLOOM_GATEWAY_KEYS")).get(f"key.{key_id}")
        assert key.encode() not in entry.value and hash_key(key).encode() in entry.value
    finally:
        await nc.close()
    assert (await keys(js_server.url, capsys, "revoke", key_id))[0] == 0
    code, out = await keys(js_server.url, capsys, "list")
    assert code == 0 and "revoked" in out and key not in out
    code, _ = await keys(js_server.url, capsys, "revoke", "000000000000")
    assert code == 1


async def test_a_good_key_is_served_and_missing_bad_and_revoked_keys_get_401(
    net: Network, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway(admission=keyed)
    good = await create(net.nats_url, capsys, "--name", "good")
    other = await create(net.nats_url, capsys, "--name", "other")
    forged = other[: -4] + ("AAAA" if not other.endswith("AAAA") else "BBBB")  # right id, wrong secret
    async with aiohttp.ClientSession() as http:
        status, body, _ = await post(http, gw.url, good)
        assert status == 200 and body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 "
        for key, code in ((None, "missing_api_key"), ("sk-not-ours", "invalid_api_key"),
                          (forged, "invalid_api_key")):  # fmt: skip
            status, body, _ = await post(http, gw.url, key)
            assert (status, body["error"]["code"], body["error"]["type"]) == (401, code, "authentication_error")
        assert (await keys(net.nats_url, capsys, "revoke", parse_key(other)))[0] == 0
        status, body, _ = await post(http, gw.url, other)
        assert (status, body["error"]["code"]) == (401, "revoked_api_key")
    assert net.doubles["exe-a"].completed == 1


async def test_a_key_over_its_rate_limit_gets_429_with_retry_after(
    net: Network, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway(admission=keyed)
    key = await create(net.nats_url, capsys, "--name", "slow", "--rpm", "2")
    async with aiohttp.ClientSession() as http:
        assert (await post(http, gw.url, key))[0] == 200
        assert (await post(http, gw.url, key))[0] == 200
        status, body, headers = await post(http, gw.url, key)
    assert (status, body["error"]["type"]) == (429, "rate_limit_error")
    # 2 per minute: the next token is back within 30 s.
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert net.doubles["exe-a"].completed == 2


async def test_a_key_over_budget_gets_402_and_no_job_runs(net: Network, capsys: pytest.CaptureFixture[str]) -> None:
    # 1000 USD per 1M tokens each way: the estimate of 2 prompt + 4 completion tokens is 0.006 USD.
    await net.executor("exe-a", offer(MODEL, "1000", "1000"))
    gw = await net.gateway(admission=keyed)
    poor = await create(net.nats_url, capsys, "--name", "poor", "--budget", "0.001")
    async with aiohttp.ClientSession() as http:
        status, body, _ = await post(http, gw.url, poor)
    assert (status, body["error"]["type"], body["error"]["code"]) == (402, "insufficient_quota", "budget_exhausted")
    assert "0.001" in body["error"]["message"]
    assert net.doubles["exe-a"].completed == 0 and net.doubles["exe-a"].in_flight == 0
    code, out = await keys(net.nats_url, capsys, "list", "--json")
    assert json.loads(out)[0]["spend"] == "0" and json.loads(out)[0]["held"] == "0"


async def test_a_served_job_is_held_then_settled_from_its_signed_receipt(
    net: Network, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    await net.executor("exe-a", offer(MODEL, "1000", "2000"))
    gw = await net.gateway(admission=keyed)
    key = await create(net.nats_url, capsys, "--name", "payer", "--budget", "1")
    async with aiohttp.ClientSession() as http:
        status, body, _ = await post(http, gw.url, key)
        assert status == 200, body
        cost = Decimal(body["usage"]["cost"])  # the signed receipt's cost
        assert cost == (2 * 1000 + 4 * 2000) / Decimal(1_000_000)
        # The whole budget minus what was spent: a request estimated above it is refused.
        status, body, _ = await post(http, gw.url, key, {**CHAT, "max_tokens": 1_000})
        assert status == 402
    await gw.admission.drain()  # type: ignore[attr-defined]  # settling runs after the answer
    code, out = await keys(net.nats_url, capsys, "list", "--json")
    [row] = json.loads(out)
    assert (Decimal(row["spend"]), Decimal(row["held"])) == (cost, 0)


async def test_two_gateways_settling_one_key_at_once_lose_no_spend(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL, "1000", "1000"))
    client = await LloomClient.connect(net.nats_url, timeout=15, client_id="gw-test")
    try:
        replies = await asyncio.gather(*(client.complete(ChatRequest(
            model=MODEL, messages=[Message(Role.USER, "x " * (i + 1))], max_tokens=3))
            for i in range(20)))  # fmt: skip
    finally:
        await client.close()
    receipts = [r.receipt for r in replies]
    a_nc = await connect_nats(net.nats_url, name="gw-a")
    b_nc = await connect_nats(net.nats_url, name="gw-b")
    try:
        a, b = KeyAdmission(KeyStore(a_nc), gateway="gw-a"), KeyAdmission(KeyStore(b_nc), gateway="gw-b")
        await a.start()
        await b.start()
        record, key = await a.store.create("shared", rpm=None, budget=Decimal(10))
        request = type("Req", (), {"headers": {"Authorization": f"Bearer {key}"}})()

        async def one(admission: KeyAdmission, receipt) -> None:  # type: ignore[no-untyped-def]
            grant = await admission.authorize(request)  # type: ignore[arg-type]
            await admission.hold(grant, Decimal("0.01"))
            await admission.settle(grant, receipt)

        await asyncio.gather(*(one(a if i % 2 else b, r) for i, r in enumerate(receipts)))
        await asyncio.gather(a.drain(), b.drain())
        final, _ = await a.store.get(record.id)
        assert final.spend == sum(r.receipt.cost for r in receipts) and final.spend > 0
        assert final.holds == {}
        settled = await settlements.read_all(a_nc)
        assert len(settled) == 20 and {s.gateway for s in settled.values()} == {"gw-a", "gw-b"}
    finally:
        await a_nc.close()
        await b_nc.close()


async def test_receipts_report_sums_spend_per_key(net: Network, capsys: pytest.CaptureFixture[str]) -> None:
    await net.executor("exe-a", offer(MODEL, "1000", "1000"))
    gw = await net.gateway(admission=keyed)
    alice = await create(net.nats_url, capsys, "--name", "alice")
    bob = await create(net.nats_url, capsys, "--name", "bob")
    costs: dict[str, Decimal] = {alice: Decimal(0), bob: Decimal(0)}
    async with aiohttp.ClientSession() as http:
        for key, n in ((alice, 3), (bob, 1)):
            for _ in range(n):
                status, body, _ = await post(http, gw.url, key)
                assert status == 200
                costs[key] += Decimal(body["usage"]["cost"])
        # One job through a plain client (no key) is in the report too, as (no key).
        client = await LloomClient.connect(net.nats_url, timeout=15)
        try:
                await client.complete(ChatRequest(model=MODEL, messages=[Message(Role.USER, "y")],
                                              max_tokens=2))  # fmt: skip
        finally:
            await client.close()

    def report() -> dict:
        code = lloom_main(["receipts", "report", "--stream", "--by-key", "--json", "--any-key",
                           "--nats", net.nats_url])  # fmt: skip
        assert code == 0
        return json.loads(capsys.readouterr().out)

    out = await eventually(lambda: asyncio.to_thread(report_if_complete, report), timeout=20,
                           what="all five receipts in the report")  # fmt: skip
    by_key = out["key"]
    assert by_key[f"{parse_key(alice)} (alice)"]["jobs"] == 3
    assert Decimal(by_key[f"{parse_key(alice)} (alice)"]["cost_usd"]) == costs[alice]
    assert Decimal(by_key[f"{parse_key(bob)} (bob)"]["cost_usd"]) == costs[bob]
    assert by_key["(no key)"]["jobs"] == 1


def report_if_complete(report: Callable[[], dict]) -> dict | None:
    out = report()
    return out if sum(row["jobs"] for row in out.get("key", {}).values()) == 5 else None


def test_keys_never_reach_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    from executor.gateway.keystore import new_key
    from executor.process.logs import redact_secrets

    key_id, key = new_key()
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "refused %s for %s", (key, "alice"), None)
    assert RedactKeys().filter(record)
    assert key not in record.getMessage() and f"lloom_{key_id}_***" in record.getMessage()
    event = redact_secrets(None, "info", {"event": f"header was {key}", "note": key})
    assert key not in json.dumps(event) and f"lloom_{key_id}_***" in event["note"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_hold_its_gateway_never_settled_stops_counting_after_its_ttl(js_server: EmbeddedNats) -> None:
    clock = Clock()
    nc = await connect_nats(js_server.url, name="gw")
    try:
        crashed = KeyAdmission(KeyStore(nc, clock=clock), gateway="gw-crashed", hold_ttl_s=60)
        alive = KeyAdmission(KeyStore(nc, clock=clock), gateway="gw-alive", hold_ttl_s=60)
        await crashed.start()
        _, key = await crashed.store.create("ttl", rpm=None, budget=Decimal(1))
        request = type("Req", (), {"headers": {"Authorization": f"Bearer {key}"}})()
        await crashed.hold(await crashed.authorize(request), Decimal("0.8"))  # type: ignore[arg-type]
        # ... and that gateway dies here, never settling.
        with pytest.raises(PaymentRequired):
            await alive.hold(await alive.authorize(request), Decimal("0.5"))  # type: ignore[arg-type]
        clock.now += 61
        grant = await alive.authorize(request)  # type: ignore[arg-type]
        await alive.hold(grant, Decimal("0.5"))
        record, _ = await alive.store.get(grant.key_id)
        assert list(record.holds) == [grant.hold_id]  # the dead hold was dropped with this write
    finally:
        await nc.close()


def test_the_rate_limit_refills_at_rpm_per_minute_after_a_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    assert [limiter.take("k", 3) for _ in range(3)] == [None, None, None]
    assert limiter.take("k", 3) == pytest.approx(20.0)  # one token every 20 s
    clock.now += 10
    assert limiter.take("k", 3) == pytest.approx(10.0)
    clock.now += 10
    assert limiter.take("k", 3) is None
    assert limiter.take("other", 3) is None and limiter.take("k", None) is None


async def test_two_gateways_share_a_key_and_its_spend_over_http_unary_and_streamed(
    net: Network, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    await net.executor("exe-a", offer(MODEL, "1000", "3000"))
    gateways = [await net.gateway(admission=keyed), await net.gateway(admission=keyed)]
    key = await create(net.nats_url, capsys, "--name", "shared", "--budget", "10")
    headers = {"Authorization": f"Bearer {key}"}

    async def unary(http: aiohttp.ClientSession, url: str) -> Decimal:
        status, body, _ = await post(http, url, key)
        assert status == 200, body
        return Decimal(body["usage"]["cost"])

    async def streamed(http: aiohttp.ClientSession, url: str) -> Decimal:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            events = (await r.read()).decode().split("\n\n")
        [usage] = [json.loads(e[6:])["usage"] for e in events if e.startswith("data: {") and '"usage":{' in e]
        return Decimal(usage["cost"])

    async with aiohttp.ClientSession() as http:
        costs = await asyncio.gather(*(kind(http, gw.url) for gw in gateways for kind in (unary, streamed)
                                       for _ in range(5)))  # fmt: skip
    assert len(costs) == 20 and all(c > 0 for c in costs)
    for gw in gateways:
        await gw.admission.drain()  # type: ignore[attr-defined]
    code, out = await keys(net.nats_url, capsys, "list", "--json")
    [row] = json.loads(out)
    assert (Decimal(row["spend"]), Decimal(row["held"])) == (sum(costs), 0)
    assert net.doubles["exe-a"].completed == 20


async def test_an_unreadable_key_record_is_refused_with_503_not_guessed(
    net: Network, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway(admission=keyed)
    key = await create(net.nats_url, capsys, "--name", "mangled")
    nc = await connect_nats(net.nats_url, name="t")
    try:
        kv = await nc.jetstream().key_value("LLOOM_GATEWAY_KEYS")
        await kv.put(f"key.{parse_key(key)}", b'{"id": "x", "surprise": true}')
    finally:
        await nc.close()
    async with aiohttp.ClientSession() as http:
        status, body, headers = await post(http, gw.url, key)
    assert (status, body["error"]["code"]) == (503, "keys_unavailable") and "Retry-After" in headers
    assert net.doubles["exe-a"].completed == 0
