"""The gateway as OpenAI's SDKs see it: a real gateway on a free port, real NATS, real executors.

Clients are the official `openai` package (sync and async) and LiteLLM's SDK; the backend is
the OpenAI double, which answers `tok0 tok1 ...` with exact usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import openai
import pytest

from executor.process.embedded_nats import EmbeddedNats
from tests.doubles.openai_double import Fault
from tests.helpers.gateway import Network, offer
from tests.helpers.wait import eventually, within

MODEL = "gw-model"


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


def sdk(url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]


async def test_async_sdk_chat_completion_unary_names_the_executor_and_its_receipt(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL, "1.00", "2.00"))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "say hi"}], max_tokens=4)
        reply = raw.parse()
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 4)
    assert raw.headers["x-lloom-executor"] == "exe-a"
    assert raw.headers["x-lloom-receipt"].startswith("exe-a#")
    assert raw.headers["x-lloom-job-id"] == reply.id
    # The cost is the signed receipt's: (2 * 1.00 + 4 * 2.00) / 1e6 USD.
    assert reply.usage.model_extra["cost"] == "0.00001"


async def test_async_sdk_streams_chunks_then_done_with_usage_when_asked(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a story"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(8))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


async def test_a_stream_through_the_queue_group_names_its_executor_in_the_headers(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True)
        chunks = [c async for c in raw.parse()]
    assert raw.headers["x-lloom-executor"] == "exe-a"
    assert raw.headers["x-lloom-job-id"] == chunks[0].id
    assert [c.model_extra.get("provider") for c in chunks if c.choices and c.choices[0].finish_reason] == ["exe-a"]


async def test_sync_sdk_unary_and_streaming(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()

    def use() -> tuple[str, str]:  # the sync client blocks: it runs in a thread, the gateway on this loop
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client:
            unary = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=2)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True) if c.choices)
            return unary.choices[0].message.content or "", streamed

    assert await asyncio.to_thread(use) == ("tok0 tok1 ", "tok0 tok1 tok2 ")


# -- every error status as the SDK raises it ------------------------------------------------


async def test_errors_reach_the_sdk_as_its_own_exception_types_with_the_right_status(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL), max_concurrent_jobs=1)
    gw = await net.gateway(max_body_mb=0.01)
    ask = [{"role": "user", "content": "x"}]
    async with sdk(gw.url) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL, messages=ask, extra_body={"temprature": 0})
        assert bad.value.status_code == 400 and "temprature" in bad.value.message
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gw-modle", messages=ask)
        assert MODEL in missing.value.message  # the served models are listed
        with pytest.raises(openai.UnprocessableEntityError):  # tools asked of a model whose executor announces none
            await client.chat.completions.create(model=MODEL, messages=ask, tools=[TOOL])
        with pytest.raises(openai.APIStatusError) as big:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 20_000}])
        assert big.value.status_code == 413
        # The backend answers 429 with Retry-After: the SDK sees a RateLimitError that says when to come back.
        net.doubles["exe-a"].faults.append(Fault.status(429, "slow down", headers={"Retry-After": "7"}))
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=MODEL, messages=ask)
        assert limited.value.response.headers["retry-after"] == "7"
        # The one slot taken by a stalled job: a second job finds the executor busy -> 503 with Retry-After.
        net.doubles["exe-a"].faults.append(Fault.stall())
        net.doubles["exe-a"].started.clear()
        stalled = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=ask))
        await net.doubles["exe-a"].started.wait()
        with pytest.raises(openai.APIStatusError) as busy:
            await client.chat.completions.create(model=MODEL, messages=ask)
        assert busy.value.status_code == 503 and int(busy.value.response.headers["retry-after"]) >= 1
        stalled.cancel()
        await asyncio.gather(stalled, return_exceptions=True)


async def test_no_executor_within_max_price_is_503_and_model_list_names_prices(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL, "3.00", "6.00"))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        with pytest.raises(openai.APIStatusError) as none:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 extra_body={"provider": {"max_price": {"prompt": 1, "completion": 1}}})
        assert none.value.status_code == 503 and "max_price" in none.value.message


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


# -- routing ---------------------------------------------------------------------------------


async def two_priced(net: Network) -> None:
    await net.executor("cheap", offer(MODEL, "0.10", "0.20"))
    await net.executor("dear", offer(MODEL, "5.00", "10.00"))


async def served_by(client: openai.AsyncOpenAI, model: str = MODEL, **extra: object) -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1, extra_body=extra or None)
    return raw.headers["x-lloom-executor"]


async def test_provider_sort_price_and_floor_suffix_pick_the_cheapest(net: Network) -> None:
    await two_priced(net)
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        for _ in range(4):  # ties are broken at random: the choice must hold every time
            assert await served_by(client, provider={"sort": "price"}) == "cheap"
            assert await served_by(client, f"{MODEL}:floor") == "cheap"


async def test_provider_only_ignore_order_and_max_price_choose_among_executors(net: Network) -> None:
    await two_priced(net)
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        for _ in range(3):
            assert await served_by(client, provider={"only": ["dear"]}) == "dear"
            assert await served_by(client, provider={"ignore": ["cheap"]}) == "dear"
            assert await served_by(client, provider={"order": ["dear", "cheap"]}) == "dear"
            assert await served_by(client, provider={"max_price": {"prompt": 1, "completion": 1}}) == "cheap"


async def test_nitro_suffix_routes_through_the_catalogue(net: Network) -> None:
    await two_priced(net)
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        assert await served_by(client, f"{MODEL}:nitro") in {"cheap", "dear"}


async def test_models_list_falls_back_to_the_next_model_when_the_first_has_no_executor(net: Network) -> None:
    await net.executor("exe-b", offer("backup-model"))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        reply = await client.chat.completions.create(model="gone-model", messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=1, extra_body={"models": ["backup-model"]})
        assert reply.model == "backup-model"
        # Streams fall back too (before their first chunk).
        stream = await client.chat.completions.create(model="gone-model", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=2, stream=True, extra_body={"models": ["backup-model"]})
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "tok0 tok1 "


async def test_a_request_with_tools_goes_only_to_executors_announcing_tools(net: Network) -> None:
    await net.executor("plain", offer(MODEL))
    await net.executor("tooled", offer(MODEL, "0", "0", "tools"))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[TOOL], max_tokens=2)
            assert raw.headers["x-lloom-executor"] == "tooled"
    sent = net.doubles["tooled"].requests
    assert sent and all(r.get("tools") for r in sent[-4:])  # the tools reached the backend


async def test_json_schema_response_format_reaches_an_executor_announcing_it(net: Network) -> None:
    await net.executor("exe-j", offer(MODEL, "0", "0", "json_schema"))
    gw = await net.gateway()
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
    async with sdk(gw.url) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     response_format=schema, max_tokens=2)
    assert reply.choices[0].message.content
    assert net.doubles["exe-j"].requests[-1]["response_format"]["json_schema"]["name"] == "answer"


# -- the other endpoints ------------------------------------------------------------------------


async def test_embeddings_and_text_completions(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        emb = await client.embeddings.create(model=MODEL, input=["one", "two words"])
        text = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=3)
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 8
    assert emb.usage.prompt_tokens > 0
    assert text.choices[0].text and text.usage.completion_tokens > 0


async def test_models_list_has_openrouter_shape_with_per_token_prices(net: Network) -> None:
    await net.executor("cheap", offer(MODEL, "0.10", "0.20", "tools", context=8192))
    await net.executor("dear", offer(MODEL, "5.00", "10.00", "json_schema"))
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        models = await client.models.list()
        one = await client.models.retrieve(MODEL)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
    [card] = [m for m in models.data if m.id == MODEL]
    extra = card.model_extra
    assert extra["pricing"]["prompt"] == "0.0000001" and extra["pricing"]["completion"] == "0.0000002"
    assert extra["context_length"] == 8192 and extra["top_provider"]["context_length"] == 8192
    assert {"tools", "tool_choice", "response_format", "max_tokens"} <= set(extra["supported_parameters"])
    assert extra["lloom"]["executors"] == ["cheap", "dear"]
    assert one.id == MODEL and card.object == "model"


async def test_generation_returns_the_receipt_that_verifies_from_this_gateway_and_another(net: Network) -> None:
    from protocol.receipts import signed_receipt_decoder, verify_receipt

    await net.executor("exe-a", offer(MODEL, "1", "1"))
    gw1 = await net.gateway()
    gw2 = await net.gateway(remember_generations=0)  # has none in memory: reads the stream
    async with sdk(gw1.url) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=2)
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw1.url}/v1/generation", params={"id": reply.id}) as r:
            assert r.status == 200
            local = (await r.json())["data"]

        async def stored() -> dict | None:
            async with http.get(f"{gw2.url}/v1/generation", params={"id": reply.id}) as r:
                return (await r.json())["data"] if r.status == 200 else None

        remote = await eventually(stored, timeout=10, what="the receipt in the stream")
        async with http.get(f"{gw2.url}/v1/generation", params={"id": "nosuchjob"}) as r:
            assert r.status == 404
    for data in (local, remote):
        assert data["id"] == reply.id and data["provider_name"] == "exe-a" and data["verified"] is True
        assert data["total_cost"] == "0.000003" and data["tokens_completion"] == 2
        signed = signed_receipt_decoder.decode(msgspec.json.encode(data["receipt"]))
        verify_receipt(signed)
        assert signed.receipt.job_id == reply.id
    assert gw2.generations.scanned > 0


# -- disconnects, two gateways ----------------------------------------------------------------


async def test_a_client_that_disconnects_cancels_its_job_at_the_backend(net: Network) -> None:
    import aiohttp

    await net.executor("exe-a", offer(MODEL))
    double = net.doubles["exe-a"]
    double.faults.append(Fault.stall())
    gw = await net.gateway()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(f"{gw.url}/v1/chat/completions", json=body))
        await within(double.started.wait(), "the job reached the backend")
        request.cancel()  # the HTTP client goes away
        await asyncio.gather(request, return_exceptions=True)
    await within(double.disconnected.wait(), "the backend call was cancelled")
    assert double.disconnects == 1


async def test_a_streaming_client_that_disconnects_cancels_its_job(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    double = net.doubles["exe-a"]
    double.fault = Fault.slow(0.2)
    gw = await net.gateway()
    async with sdk(gw.url) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
        async for _ in stream:
            break
        await stream.close()
    await within(double.disconnected.wait(), "the backend stream was cancelled")


async def test_two_gateways_serve_side_by_side(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gws = [await net.gateway(), await net.gateway()]
    async with sdk(gws[0].url) as c1, sdk(gws[1].url) as c2:
        replies = await asyncio.gather(*(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2) for c in (c1, c2) * 5))
    assert [r.choices[0].message.content for r in replies] == ["tok0 tok1 "] * 10
    assert len({r.id for r in replies}) == 10


ROOT = Path(__file__).resolve().parent.parent


# LiteLLM's SDK as a second client. litellm cannot join the test extra (its dependency tree
# conflicts with our pins): it runs in its own venv (scripts/litellm_venv.py, created by .ci/run),
# in a subprocess that prints what the SDK returned, unary then streamed.
LITELLM_CLIENT = """
import json, sys
import litellm
url, model = sys.argv[1], sys.argv[2]
ask = dict(model="openai/" + model, api_base=url, api_key="unused", messages=[{"role": "user", "content": "x"}])
unary = litellm.completion(max_tokens=2, **ask)
streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(max_tokens=3, stream=True, **ask))
print(json.dumps({"unary": unary.choices[0].message.content, "id": unary.id, "streamed": streamed}))
"""


def litellm_python() -> Path:
    """The LiteLLM venv's python; in CI its absence fails the test, elsewhere it skips saying how to make it."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("litellm_venv", ROOT / "scripts" / "litellm_venv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    python = module.venv_python()
    if python is None:
        why = f"LiteLLM's venv is missing ({module.venv_dir()}): create it with `python3 scripts/litellm_venv.py`"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return python


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_litellm_sdk_as_a_client(net: Network) -> None:
    import json
    import os

    python = litellm_python()
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else its import fetches a price list online
           "LITELLM_TELEMETRY": "False", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(python), "-c", LITELLM_CLIENT, f"{gw.url}/v1", MODEL, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await within(proc.communicate(), "litellm's calls finished", timeout=150)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert got["unary"] == "tok0 tok1 "
    assert got["streamed"] == "tok0 tok1 tok2 "
    assert got["id"]


# -- the admission seam (keys, limits and budgets plug in here) and the deadline -------------------


class Gate:
    """An admission that refuses by the key it is shown, and records what it was asked."""

    wants_estimate = True

    def __init__(self) -> None:
        self.holds: list[object] = []
        self.settled: list[object] = []

    async def authorize(self, request):  # type: ignore[no-untyped-def]
        from executor.gateway.errors import TooManyRequests, Unauthorized

        key = request.headers.get("Authorization", "")
        if key == "Bearer bad":
            raise Unauthorized("unknown API key")
        if key == "Bearer hasty":
            raise TooManyRequests("over 10 requests per minute", retry_after_s=30)
        return key

    async def hold(self, grant, estimated_cost):  # type: ignore[no-untyped-def]
        from executor.gateway.errors import PaymentRequired

        if grant == "Bearer broke":
            raise PaymentRequired("budget spent")
        self.holds.append(estimated_cost)

    async def settle(self, grant, receipt):  # type: ignore[no-untyped-def]
        self.settled.append(receipt)


async def test_admission_refusals_reach_the_sdk_and_a_served_job_is_held_then_settled(net: Network) -> None:
    from decimal import Decimal

    from executor.gateway.server import GatewayServer
    from executor.config import GatewayConfig
    from protocol.client import LloomClient

    await net.executor("exe-a", offer(MODEL, "1", "2"))
    gate = Gate()
    client = await LloomClient.connect(net.nats_url, timeout=15)
    server = GatewayServer(client, GatewayConfig(listen="127.0.0.1:0"), admission=gate)
    await server.start()
    ask = [{"role": "user", "content": "x"}]
    try:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model=MODEL, messages=ask)
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="hasty", max_retries=0) as c:
            with pytest.raises(openai.RateLimitError) as limited:
                await c.chat.completions.create(model=MODEL, messages=ask)
            assert limited.value.response.headers["retry-after"] == "30"
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="broke", max_retries=0) as c:
            with pytest.raises(openai.APIStatusError) as broke:
                await c.chat.completions.create(model=MODEL, messages=ask)
            assert broke.value.status_code == 402
        assert gate.holds == [] and gate.settled == []  # nothing ran for any of them
        assert net.doubles["exe-a"].requests == []
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="good", max_retries=0) as c:
            await c.chat.completions.create(model=MODEL, messages=ask, max_tokens=2)
            stream = await c.chat.completions.create(model=MODEL, messages=ask, max_tokens=2, stream=True)
            [_ async for _ in stream]
        # Held at the dearest price for the estimated prompt + max_tokens, settled with each signed receipt.
        from protocol.estimate import estimate_tokens

        held = (Decimal(1) * estimate_tokens("x") + Decimal(2) * 2) / 1_000_000
        assert gate.holds == [held, held]
        assert [r.receipt.cost for r in gate.settled] == [Decimal("0.000005"), Decimal("0.000005")]
    finally:
        await server.stop()
        await client.close()


async def test_a_request_past_its_deadline_is_504(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    net.doubles["exe-a"].faults.append(Fault.stall())
    gw = await net.gateway(default_timeout_secs=0.5)
    async with sdk(gw.url) as client:
        with pytest.raises(openai.APIStatusError) as late:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert late.value.status_code == 504


async def test_a_body_that_stalls_is_408_and_no_job_runs(net: Network) -> None:
    """408 is the client's own lateness (its body did not arrive); 504 is upstream's (above)."""
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway(body_timeout_secs=0.3)
    body = msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])  # fmt: skip
        await writer.drain()
        status_line = await within(reader.readline(), "the gateway's answer to a stalled body")
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"408"
    assert net.doubles["exe-a"].requests == []


async def test_stream_errors_before_and_after_the_first_chunk(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    ask = [{"role": "user", "content": "x"}]
    async with sdk(gw.url) as client:
        with pytest.raises(openai.NotFoundError):  # before any chunk: a plain HTTP error
            await client.chat.completions.create(model="gw-modle", messages=ask, stream=True)
        net.doubles["exe-a"].faults.append(Fault.reset(after_chunks=2))
        stream = await client.chat.completions.create(model=MODEL, messages=ask, stream=True)
        got: list[str] = []
        with pytest.raises(openai.APIError) as broken:  # after: an error event the SDK raises
            async for chunk in stream:
                if chunk.choices:
                    got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "tok0 tok1 "
    assert "stream" in str(broken.value.message).lower() or "backend" in str(broken.value.message).lower()
