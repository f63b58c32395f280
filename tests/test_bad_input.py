"""Bad input gets a clear typed error on the wire; the node keeps serving the next request."""

from __future__ import annotations

from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.errors import InvalidRequest, ModelNotFound, NoExecutors, PayloadTooLarge, ResponseTooLarge
from protocol.messages import ErrorReply, encoder, unary_reply_decoder
from tests.conftest import MODEL, NodeFactory
from tests.doubles.openai_double import OpenAIDouble
from tests.helpers.jobs import ask

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def raw_request(nc: NATS, payload: bytes, *, subject: str | None = None, headers: dict[str, str] | None = None):
    msg = await nc.request(subject or subj.complete_subject(MODEL), payload, timeout=5, headers=headers)
    return msg, unary_reply_decoder.decode(msg.data)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"{not json", "invalid request: JSON is malformed"),
        (b"", "invalid request: Input data was truncated"),
        (encoder.encode({**GOOD, "max_tokens": "many"}), "`$.max_tokens`"),
        (encoder.encode({**GOOD, "messages": []}), "`$.messages`"),
        (encoder.encode({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}), "`$.messages[0].role`"),
        (encoder.encode({**GOOD, "temperature": 9}), "`$.temperature`"),
        (encoder.encode({**GOOD, "max_tokens": 0}), "`$.max_tokens`"),
        (encoder.encode({**GOOD, "max_tokens": 10**12}), "`$.max_tokens`"),
        (encoder.encode({**GOOD, "tempreature": 0.5}), "unknown field `tempreature`"),
        (encoder.encode({"messages": GOOD["messages"]}), "missing required field `model`"),
        # A tool's free-form `parameters` nested deeper than msgspec recurses (an attack: 300 KB).
        (encoder.encode({**GOOD, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]})
         .replace(b'"parameters":{}', b'"parameters":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
         "nested too deeply"),
        # An image URL the executor's host could read (SSRF): only http(s) and data: URLs pass.
        (encoder.encode({**GOOD, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}), "neither an http(s) URL"),
    ],
    ids=[
        "malformed-json", "empty", "wrong-type", "no-messages", "bad-role", "temperature-range",
        "zero-max-tokens", "absurd-max-tokens", "unknown-field", "no-model", "nested-too-deeply", "file-url",
    ],
)  # fmt: skip
async def test_malformed_requests_get_bad_request(node: ExecutorNode, nc: NATS, payload: bytes, says: str) -> None:
    msg, reply = await raw_request(nc, payload)
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_request"
    assert says in reply.message
    assert not reply.retryable
    # Generic NATS tooling sees the error in the micro-service headers too.
    assert msg.headers[subj.HDR_SERVICE_ERROR_CODE] == "400"
    _, ok = await raw_request(nc, encoder.encode(GOOD))
    assert ok.content.startswith("tok0")


async def test_max_tokens_over_the_node_cap_is_refused_with_the_cap(make_node: NodeFactory, client: LloomClient) -> None:
    await make_node(max_tokens_cap=100)
    with pytest.raises(InvalidRequest) as caught:
        await client.complete(ask(max_tokens=101))
    assert "limit of 100" in caught.value.message
    assert (await client.complete(ask(max_tokens=100))).usage.completion_tokens > 0


async def test_request_for_a_model_this_node_does_not_serve(node: ExecutorNode, client: LloomClient) -> None:
    # Through the direct subject the node is asked for a model it lacks.
    with pytest.raises(ModelNotFound) as caught:
        await client.complete(ask(model="gpt-9"), executor=node.id)
    assert caught.value.available_models == sorted(node.models)


async def test_model_nobody_serves_fails_at_once_with_no_executors(node: ExecutorNode, client: LloomClient) -> None:
    with pytest.raises(NoExecutors) as caught:
        await client.complete(ask(model="gpt-9"), timeout=30)
    assert "gpt-9" in caught.value.message
    with pytest.raises(NoExecutors):
        async with client.stream(ask(model="gpt-9"), timeout=30) as stream:
            async for _ in stream:
                pass


async def test_unknown_executor_fails_at_once(node: ExecutorNode, client: LloomClient) -> None:
    with pytest.raises(NoExecutors, match="executor 'nobody' is not on the network"):
        await client.complete(ask(), executor="nobody", timeout=30)


async def test_request_over_max_payload_is_refused_by_the_client_and_the_connection_survives(
    node: ExecutorNode, client: LloomClient
) -> None:
    huge = "x" * (1024 * 1024)
    with pytest.raises(PayloadTooLarge, match="at most 1048576"):
        await client.complete(ask(text=huge))
    assert (await client.complete(ask())).content.startswith("tok0")


async def test_job_without_reply_subject_is_counted_and_ignored(node: ExecutorNode, nc: NATS) -> None:
    await nc.publish(subj.complete_subject(MODEL), encoder.encode(GOOD))
    _, ok = await raw_request(nc, encoder.encode(GOOD))
    assert ok.content.startswith("tok0")
    assert node.stats.bad_requests == 1


async def test_invalid_job_id_header_is_refused(node: ExecutorNode, nc: NATS) -> None:
    _, reply = await raw_request(nc, encoder.encode(GOOD), headers={subj.HDR_JOB_ID: "a.b*"})
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_request"
    assert "job id" in reply.message


@pytest.fixture
async def small_payload_server(tmp_path: Path):
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4096\n")
    async with EmbeddedNats(extra_args=["-c", str(conf)]) as server:
        yield server


async def test_response_over_max_payload_is_a_typed_error_and_streaming_still_works(
    small_payload_server: EmbeddedNats, double: OpenAIDouble, http, signing
) -> None:
    from executor.backends.openai_compat import OpenAICompatibleBackend

    double.completion_tokens = 2000  # ~12 kB of text against a 4 kB max_payload
    node_nc = await nats.connect(small_payload_server.url)
    backend = OpenAICompatibleBackend(http, base_url=double.base_url)
    async with ExecutorNode(node_nc, backend, **signing()), await LloomClient.connect(small_payload_server.url) as client:
        with pytest.raises(ResponseTooLarge, match="stream=True"):
            await client.complete(ask())
        async with client.stream(ask()) as stream:
            assert len([c async for c in stream]) == 2000
    await node_nc.close()


async def test_error_codes_survive_an_unknown_code_from_a_newer_peer() -> None:
    from protocol.errors import InternalError
    from protocol.messages import error_from_wire

    err = error_from_wire(msgspec.convert({"code": "quota_exceeded", "message": "m"}, ErrorReply))
    assert type(err) is InternalError
    assert err.message == "m"
