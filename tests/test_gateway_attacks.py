"""The gateway's HTTP side attacked as an outsider would: from a web page in the user's browser,
from a slow or malformed client, with made-up generation ids, with content and ids that try to
break out of SSE events and headers, and with image URLs that would make the executor fetch.

Each test tries the attack next to the allowed request it imitates. Real gateway, real NATS
(JetStream), real executors on the OpenAI double (docs/security.md, "The gateway's HTTP side").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web

from executor.gateway.guard import header_token, is_loopback
from executor.process.embedded_nats import EmbeddedNats
from tests.doubles.openai_script import Answer
from tests.helpers.gateway import Network, offer
from tests.helpers.wait import eventually, within

MODEL = "gw-model"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- a web page in the user's browser -----------------------------------------------------------


async def test_a_cross_origin_post_from_a_web_page_is_refused_before_any_job_runs(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    double = net.doubles["exe-a"]
    # What `fetch(url, {method: "POST", body, headers: {"Content-Type": "text/plain"}})` sends:
    # a "simple request" the browser does not preflight; only the answer would be hidden from the page.
    data = msgspec.json.encode(ASK)
    async with aiohttp.ClientSession() as http:
        for origin in ("http://evil.example", "null", f"http://localhost:{_port(gw.url)}", "file://"):
            async with http.post(f"{gw.url}/v1/chat/completions", data=data,
                                 headers={"Content-Type": "text/plain", "Origin": origin}) as r:  # fmt: skip
                assert r.status == 403, origin
                assert (await r.json())["error"]["code"] == "forbidden_origin"
        assert double.requests == []  # no job ran, nothing was billed
        # Allowed: a program (no Origin), and the gateway's own origin (its status page).
        async with http.post(f"{gw.url}/v1/chat/completions", data=data) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{gw.url}/v1/chat/completions", json=ASK, headers={"Origin": gw.url}) as r:
            assert r.status == 200, await r.text()
    assert len(double.requests) == 2


async def test_dns_rebinding_a_foreign_host_name_is_refused_by_a_loopback_gateway(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway(allowed_hosts=["llm.example.org"])
    port = _port(gw.url)
    async with aiohttp.ClientSession() as http:
        # The page at http://evil.example:<port>/ whose name now resolves to 127.0.0.1: same-origin
        # for the browser, so it could read answers; its Host names it. And 0.0.0.0 (browsers reach
        # loopback through it) is not a loopback name either.
        for host in (f"evil.example:{port}", f"0.0.0.0:{port}", "127.0.0.1.evil.example", f"localhost.evil.example:{port}"):
            for method, path in (("GET", "/v1/models"), ("GET", "/v1/generation?id=x"), ("POST", "/v1/chat/completions")):
                async with http.request(method, f"{gw.url}{path}", json=ASK, headers={"Host": host}) as r:
                    assert r.status == 403, (host, path)
                    assert (await r.json())["error"]["code"] == "forbidden_host"
        assert net.doubles["exe-a"].requests == []
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "llm.example.org", "LLM.example.org:443"):
            async with http.get(f"{gw.url}/v1/models", headers={"Host": host}) as r:
                assert r.status == 200, host


def test_loopback_names_and_header_tokens() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "a.localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "localhost.evil.example", "evil.example", "::"))
    assert header_token("exe-a_1") == "exe-a_1"
    for bad in ("exe\r\nSet-Cookie: a=b", "exe a", "", "x" * 65, None, "exe\nx", "é"):
        assert header_token(bad) is None


# -- slow, large and malformed bodies -------------------------------------------------------


async def test_a_trickled_body_gets_408_and_the_gateway_serves_others_meanwhile(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway(body_timeout_secs=1.0)
    port = _port(gw.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Headers promise 1,000 bytes; 10 arrive, then nothing (slowloris).
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":".encode())  # fmt: skip
        await writer.drain()
        async with aiohttp.ClientSession() as http:  # the allowed case, at the same time
            async with http.post(f"{gw.url}/v1/chat/completions", json=ASK) as r:
                assert r.status == 200
        head = await within(reader.readuntil(b"\r\n\r\n"), "the gateway's answer to a trickled body", timeout=10)
        assert head.startswith(b"HTTP/1.1 408"), head
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        body = await reader.readexactly(length)
        assert msgspec.json.decode(body)["error"]["code"] == "request_timeout"
    finally:
        writer.close()
    assert len(net.doubles["exe-a"].requests) == 1


async def test_request_smuggling_framings_are_refused_and_no_smuggled_job_runs(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    port = _port(gw.url)
    job = msgspec.json.encode(ASK)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    smuggled = f"{head}Content-Length: {len(job)}\r\n\r\n".encode() + job
    framings = {
        "content-length and chunked": f"{head}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode() + smuggled,
        "two content-lengths": f"{head}Content-Length: 5\r\nContent-Length: {len(job)}\r\n\r\n".encode() + job,
        "an odd transfer-encoding": f"{head}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".encode() + smuggled,
        "bare line feeds": smuggled.replace(b"\r\n", b"\n"),
    }
    for what, raw in framings.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            answer = await within(reader.read(), f"the answer to {what}", timeout=10)  # closed after the 400
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.0 400"), (what, answer[:100])
        assert b"HTTP/1.1 200" not in answer and b"chat.completion" not in answer, what  # no second answer
    assert net.doubles["exe-a"].requests == []
    async with aiohttp.ClientSession() as http, http.post(f"{gw.url}/v1/chat/completions", json=ASK) as r:
        assert r.status == 200  # the allowed framing


async def test_deep_nesting_huge_lists_and_bad_json_are_400s_and_the_gateway_keeps_serving(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL, "0", "0", "tools"))
    gw = await net.gateway(max_body_mb=2)
    deep = b'{"model":"gw-model","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function",' \
           b'"function":{"name":"f","parameters":' + b'{"a":' * 50_000 + b'1' + b'}' * 50_000 + b'}}]}'  # fmt: skip
    bodies = {
        "nesting": deep,
        "messages": msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 4097}),
        "tools": msgspec.json.encode({**ASK, "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                                       for i in range(1000)]}),  # fmt: skip
        "json": b'{"model": "gw-model", "messages": [',
        "utf8": b'{"model": "\xff\xfe", "messages": []}',
        "type": b'[1, 2, 3]',
        "unknown": msgspec.json.encode({**ASK, "provider": {"order": ["exe-a"], "sneaky": 1}}),
        "empty": b"",
    }
    async with aiohttp.ClientSession() as http:
        for what, data in bodies.items():
            async with http.post(f"{gw.url}/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                assert r.status == 400, (what, await r.text())
                err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error" and len(err["message"]) < 2000, what
        async with http.post(f"{gw.url}/v1/chat/completions", json=ASK) as r:
            assert r.status == 200
    assert len(net.doubles["exe-a"].requests) == 1


# -- /v1/generation: made-up ids ------------------------------------------------------------


async def test_generation_ids_that_are_not_job_ids_are_refused_without_reading_the_stream_and_scans_queue(
    net: Network,
) -> None:
    await net.executor("exe-a", offer(MODEL, "1", "1"))
    gw = await net.gateway(remember_generations=0)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json=ASK) as r:
            job = (await r.json())["id"]
        for bad in ('x","job_id":"', "a" * 65, "../../x", "x y", "é"):
            async with http.get(f"{gw.url}/v1/generation", params={"id": bad}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "id"
        assert gw.generations.scans == 0

        # Many made-up (well-formed) ids at once: each is a 404, and one scan runs at a time.
        async def ask(job_id: str) -> int:
            async with http.get(f"{gw.url}/v1/generation", params={"id": job_id}) as r:
                return r.status

        assert await asyncio.gather(*(ask(f"nosuchjob{i}") for i in range(8))) == [404] * 8
        assert gw.generations.scans == 8 and gw.generations.most_concurrent_scans == 1

        async def found() -> dict | None:  # the allowed case: the real id
            async with http.get(f"{gw.url}/v1/generation", params={"id": job}) as r:
                return (await r.json())["data"] if r.status == 200 else None

        data = await eventually(found, timeout=15, what="the real generation")
    assert data["verified"] is True and data["provider_name"] == "exe-a"


async def test_a_users_job_id_tells_nothing_about_the_next_users_job_id(net: Network) -> None:
    """All of a gateway's jobs come from its one client: with sequential ids (NUIDs share a prefix
    and step by a small increment) one user's id would lead to the next user's receipt."""
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    async with aiohttp.ClientSession() as http:
        ids = []
        for _ in range(2):
            async with http.post(f"{gw.url}/v1/chat/completions", json=ASK) as r:
                ids.append(r.headers["X-Lloom-Job-Id"])
    mine, theirs = ids
    shared = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
    assert shared < 6  # chance: 16**-6; a NUID shares 12 characters
    many = [gw.client.new_job_id() for _ in range(10_000)]
    assert len({j[:8] for j in many}) > 9_900 and all(len(j) == 32 and j.isalnum() for j in many)


async def test_a_receipt_naming_another_executor_stored_under_the_forgers_subject_is_not_the_generation(
    net: Network,
) -> None:
    """Mallory re-signs exe-a's receipt for a job with her own key (still naming "exe-a"; it verifies),
    stores it under her own receipts subject after enough filler that a scan meets it first: the
    gateway still answers with exe-a's genuine receipt."""
    from executor.receipts.issuer import BatchSigner
    from protocol import subjects as subj
    from protocol.identity import Identity
    from protocol.receipts import SignedReceipt, canonical, leaf_hash, signed_receipt_decoder

    await net.executor("exe-a", offer(MODEL, "1", "1"))
    gw = await net.gateway(remember_generations=0)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json=ASK) as r:
            job = (await r.json())["id"]

        async def generation() -> dict | None:
            async with http.get(f"{gw.url}/v1/generation", params={"id": job}) as r:
                return (await r.json())["data"] if r.status == 200 else None

        genuine = await eventually(generation, timeout=15, what="the genuine generation")
        signed = signed_receipt_decoder.decode(msgspec.json.encode(genuine["receipt"]))
        mallory = Identity.generate()
        forged = msgspec.structs.replace(signed.receipt, executor_key=mallory.public_key)
        [proof] = BatchSigner(mallory).sign([leaf_hash(forged)])
        line = msgspec.json.encode(SignedReceipt(forged, proof))
        js = gw.client.nc.jetstream()
        for i in range(300):  # past the first window the gateway reads
            await js.publish("lloom.v1.receipts.filler", b'{"filler": %d}' % i)
        await js.publish(subj.receipts_subject("mallory"), line)
        assert canonical(forged) != canonical(signed.receipt)
        found = await generation()
    assert found is not None and found["verified"] is True
    assert found["receipt"]["receipt"]["executor_key"] == signed.receipt.executor_key != mallory.public_key


# -- what comes from the network into events and headers --------------------------------------


async def test_content_from_the_backend_cannot_forge_sse_events(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    gw = await net.gateway()
    evil = 'a\n\ndata: [DONE]\n\ndata: {"choices":[{"delta":{"content":"forged"}}]}\r\n\r\nevent: x'
    net.doubles["exe-a"].answers = [Answer(content=evil)]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json={**ASK, "stream": True, "max_tokens": 64}) as r:
            assert r.status == 200
            raw = await r.read()
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e and "\r" not in e for e in events)
    assert events[-1] == "data: [DONE]" and raw.count(b"data: [DONE]") == 1
    text = "".join(msgspec.json.decode(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if msgspec.json.decode(e[6:])["choices"])  # fmt: skip
    assert text == evil + " "  # the double streams word by word, each with a space after it


# -- image URLs: the executor never fetches them, and passes on only what its image_urls allows ----


async def test_image_urls_the_backend_would_fetch_inside_the_network_are_refused_400_and_nothing_fetches_them(
    net: Network,
) -> None:
    hits: list[str] = []

    async def canary(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x89PNG")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", canary)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    canary_url = f"http://127.0.0.1:{runner.addresses[0][1]}/img.png"
    try:
        await net.executor("exe-v", offer(MODEL, "0", "0", "vision"), image_urls="public_only")
        await net.executor("exe-d", offer("vision-default", "0", "0", "vision"))  # image_urls left at data_only
        await net.executor("exe-t", offer("text-only"), image_urls="any")
        gw = await net.gateway()
        malformed = ["file:///etc/passwd", "gopher://127.0.0.1:25/", "ftp://127.0.0.1/x.png"]
        internal = ["http://169.254.169.254/latest/meta-data/", canary_url, "http://[::1]/x.png"]
        public, inline = "https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo="

        async def post(http: aiohttp.ClientSession, model: str, url: str) -> tuple[int, str]:
            parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]
            body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
            async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
                return r.status, await r.text()

        async with aiohttp.ClientSession() as http:
            for url in malformed + internal + [public, inline]:
                status, text = await post(http, MODEL, url)
                if url in malformed:
                    assert (status, "neither an http(s) URL" in text) == (400, True), text
                elif url in internal:  # the executor's policy, named, with the gateway's 400
                    assert (status, 'image_urls = \\"public_only\\"' in text) == (400, True), text
                else:
                    assert status == 200, text
                # A model whose executor announces no vision: refused before any backend (422).
                status, _ = await post(http, "text-only", url)
                assert status in ((400, 422) if url in malformed else (422,))
            status, text = await post(http, "vision-default", public)
            assert (status, 'image_urls = \\"data_only\\"' in text, "data: URL" in text) == (400, True, True), text
            assert (await post(http, "vision-default", inline))[0] == 200
        sent = [part["image_url"]["url"] for req in net.doubles["exe-v"].requests
                for part in req["messages"][0]["content"] if part["type"] == "image_url"]  # fmt: skip
        assert sent == [public, inline]  # passed on byte for byte; the refused ones never reached the backend
        assert len(net.doubles["exe-d"].requests) == 1 and net.doubles["exe-t"].requests == []
        assert hits == []  # nobody on the gateway's or executor's side fetched the URL
    finally:
        await runner.cleanup()


async def test_a_web_page_posting_nats_protocol_to_the_loopback_bus_publishes_nothing(
    nats_server: EmbeddedNats,
) -> None:
    """The single-machine start's bus listens on loopback with no credentials. A page can make the
    browser POST a text/plain body holding NATS protocol lines to it; the server stops at the HTTP
    request line, so the job inside is never published. The allowed case: a real NATS client."""
    import nats

    nc = await nats.connect(nats_server.url)
    got: list[bytes] = []

    async def keep(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await nc.subscribe("lloom.v1.complete.x", cb=keep)
    await nc.flush()
    host, port = nats_server.url.rsplit("//", 1)[1].split(":")
    job = b"PUB lloom.v1.complete.x 3\r\nweb\r\n"
    post = (f"POST / HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: http://evil.example\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(job)}\r\n\r\n").encode()  # fmt: skip
    for first, body in ((post, job), (b"CONNECT {}\r\n", b"PUB lloom.v1.complete.x 3\r\nraw\r\nPING\r\n")):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(first + body)
            await writer.drain()
            answer = b""
            while b"-ERR" not in answer and b"PONG" not in answer:
                chunk = await within(reader.read(4096), "the bus's answer", timeout=10)
                if not chunk:
                    break
                answer += chunk
        finally:
            writer.close()
        assert (b"-ERR 'Unknown Protocol Operation'" in answer) == (first is post), answer[-200:]
    await nc.flush()
    await eventually(lambda: got == [b"raw"] or None, timeout=5, what=lambda: f"only the raw client's message, got {got}")
    await nc.close()
