"""`[llm_client] image_urls`: which image URLs an executor passes on to the backend that fetches them.

A real node on a real nats-server with the OpenAI double, asked through `LloomClient`: a refused
URL gets a typed `InvalidRequest` naming the option and never reaches the backend (the double
counts its requests); an allowed one reaches it byte for byte. The gateway's 400 is in
tests/test_gateway_attacks.py, the config key in tests/test_config.py.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest

from executor.config import ImageUrlPolicy
from executor.jobs.image_urls import check_image_urls
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.errors import InvalidRequest
from protocol.messages import ChatRequest
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.jobs import MODEL
from tests.helpers.wait import eventually

METADATA = "http://169.254.169.254/latest/meta-data"
LOOPBACK = "http://127.0.0.1:8080/x.png"
LOOPBACK6 = "http://[::1]/x.png"
PRIVATE = "http://10.0.0.5/x.png"
LOCALHOST = "http://localhost/x.png"
PUBLIC = "https://example.com/cat.png"
INLINE = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
URLS = [METADATA, LOOPBACK, LOOPBACK6, PRIVATE, LOCALHOST, PUBLIC, INLINE]

ALLOWED: dict[str, list[str]] = {
    "data_only": [INLINE],
    "public_only": [PUBLIC, INLINE],
    "any": URLS,
}


def req(url: str, *, stream: bool = False) -> ChatRequest:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return msgspec.convert({"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 4,
                            "stream": stream}, ChatRequest)  # fmt: skip


def image_urls_sent(double: OpenAIDouble) -> list[str]:
    return [part["image_url"]["url"] for body in double.requests for m in body["messages"]
            if isinstance(m["content"], list) for part in m["content"] if part["type"] == "image_url"]  # fmt: skip


async def ask(client: LloomClient, url: str, stream: bool) -> Any:
    if not stream:
        return (await client.complete(req(url))).content
    async with client.stream(req(url, stream=True)) as s:
        return "".join([c.delta async for c in s])


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("capable_node", ["data_only", "public_only", "any"], indirect=True)
async def test_each_policy_refuses_typed_before_the_backend_and_passes_the_rest_byte_for_byte(
    capable_node: ExecutorNode, client: LloomClient, double: OpenAIDouble, stream: bool
) -> None:
    policy = capable_node.context.image_urls
    allowed = ALLOWED[policy]
    refused = [u for u in URLS if u not in allowed]
    for url in refused:  # first: a refusal leaves the node serving
        with pytest.raises(InvalidRequest) as caught:
            await ask(client, url, stream)
        err = caught.value
        assert type(err) is InvalidRequest and err.code == "bad_request"
        assert f'image_urls = "{policy}"' in err.message and "messages[0].content[1].image_url.url" in err.message
        assert err.executor_id == capable_node.id  # the executor refused it (the client lets http(s) URLs through)
        assert "data: URL" in err.message  # what to do instead
    assert double.requests == []  # none of them reached the backend
    for url in allowed:
        assert (await ask(client, url, stream)).startswith("tok0")
    assert image_urls_sent(double) == allowed  # byte for byte, in order, each once
    assert len(double.requests) == len(allowed)
    stats = capable_node.stats
    await eventually(lambda: (stats.completed, stats.failed) == (len(allowed), len(refused)), timeout=5,
                     what=lambda: f"completed/failed {stats.completed}/{stats.failed}")  # fmt: skip


async def test_a_node_built_without_a_policy_takes_data_urls_only(
    capable_node: ExecutorNode, client: LloomClient, double: OpenAIDouble
) -> None:
    assert capable_node.context.image_urls == "data_only"
    with pytest.raises(InvalidRequest, match='image_urls = "data_only"'):
        await client.complete(req(PUBLIC))
    assert (await client.complete(req(INLINE))).content.startswith("tok0")
    assert image_urls_sent(double) == [INLINE]


# How backends' URL parsers read a host, not how a regular expression would: each of these names an
# internal address, a host that resolves inside the network, or one that parsers disagree on.
SNEAKY = [
    "http://127.1/x.png", "http://2130706433/x.png", "http://0x7f000001/x.png", "http://0177.0.0.1/x.png",
    "http://[::ffff:127.0.0.1]/x.png", "http://[::ffff:a9fe:a9fe]/", "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::]/", "http://[fe80::1%25eth0]/", "http://0/x.png", "http://[::]/x.png",
    "http://LOCALHOST./x.png", "http://app.localhost/x.png", "http://metadata/computeMetadata/v1/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://printer.local/x.png",
    "http://example.com@127.0.0.1/x.png", "http://example.com\\@127.0.0.1/x.png", "http://%31%32%37.0.0.1/x.png",
    "http://100.64.0.1/x.png", "http://192.168.1.1/x.png", "http://172.16.0.1/x.png", "http://[fc00::1]/x.png",
    "http://224.0.0.1/x.png", "http://255.255.255.255/x.png", "http://1.2.3.4.5/x.png",
    "http://example.com:99999/x.png",
]  # fmt: skip
PUBLIC_ONES = ["http://93.184.215.14/cat.png", "https://[2606:4700:4700::1111]/cat.png",
               "https://cdn.example.org:8443/a.webp", "HTTPS://Example.COM/Cat.PNG"]  # fmt: skip


@pytest.mark.parametrize("url", SNEAKY)
def test_public_only_reads_hosts_the_way_backends_do(url: str) -> None:
    with pytest.raises(InvalidRequest, match='image_urls = "public_only"'):
        check_image_urls(req(url), "public_only")
    check_image_urls(req(url), "any")  # "any" passes everything the chat rules accept


@pytest.mark.parametrize("url", PUBLIC_ONES)
def test_public_only_passes_public_hosts_and_data_only_does_not(url: str) -> None:
    check_image_urls(req(url), "public_only")
    with pytest.raises(InvalidRequest, match='image_urls = "data_only"'):
        check_image_urls(req(url), "data_only")


@pytest.mark.parametrize("policy", ["data_only", "public_only", "any"])
def test_text_only_requests_pass_every_policy(policy: ImageUrlPolicy) -> None:
    request = msgspec.convert({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, ChatRequest)
    check_image_urls(request, policy)
