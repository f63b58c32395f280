"""Real inference: what the bundled model (SmolLM2-135M-Instruct on llama-server) can do is read from the
running server's /props, announced, and enforced; a json_schema request gets JSON that fits the schema.

Same tier, fixtures and rules as tests/test_local_model.py. Unary only for structured output: the
streamed request body does not carry `response_format` yet (issue #16, backend request bodies).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from executor.backends.local import LocalBackend
from executor.catalog.announcer import Announcer
from executor.jobs.node import ExecutorNode
from protocol.chat_types import FunctionDefinition, JsonSchema, JsonSchemaFormat, Tool
from protocol.client import LloomClient
from protocol.errors import UnsupportedFeature
from tests.test_local_model import MODEL, ask, local, local_setup, served  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.real_inference, pytest.mark.timeout(300)]

WEATHER = Tool(function=FunctionDefinition(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))  # fmt: skip
PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture
async def announcing(served: tuple[ExecutorNode, LloomClient]) -> AsyncIterator[tuple[ExecutorNode, LloomClient]]:
    node, client = served
    assert node.receipts is not None  # announced under the key that signs its receipts, as a real executor
    announcer = Announcer(node.nc, node, node.receipts.identity, heartbeat_interval=0.5)
    await announcer.start()
    yield node, client
    await announcer.stop()


async def test_the_local_model_is_announced_with_json_schema_and_without_tools(
    announcing: tuple[ExecutorNode, LloomClient], local: LocalBackend
) -> None:
    node, client = announcing

    [info] = await local.list_models()
    [entry] = [e for e in (await client.catalog()).entries() if e.executor_id == node.id]

    # llama-server's /props for SmolLM2: chat_template_caps.supports_tools false, modalities.vision false.
    assert info.capabilities == {"json_schema"}
    assert [o.features for o in entry.models] == [["chat", "stream", "json_schema"]]


async def test_a_tools_request_is_refused_with_unsupported_feature(
    announcing: tuple[ExecutorNode, LloomClient],
) -> None:
    node, client = announcing
    request = ask("What is the weather in Paris?", tools=[WEATHER], max_tokens=16)

    with pytest.raises(UnsupportedFeature, match="tools"):  # routed: nobody announces tools for it
        await client.complete(request)
    with pytest.raises(UnsupportedFeature, match=node.id):  # named: the executor's own refusal
        await client.complete(request, executor=node.id)
    assert node.stats.completed == 0


async def test_a_json_schema_request_returns_json_that_fits_the_schema(
    announcing: tuple[ExecutorNode, LloomClient],
) -> None:
    _, client = announcing
    fmt = JsonSchemaFormat(json_schema=JsonSchema(name="place", schema_=PLACE, strict=True))

    reply = await client.complete(
        ask("Name one large city and the country it is in, as JSON.", response_format=fmt, max_tokens=64,
            temperature=0)  # fmt: skip
    )

    place = json.loads(reply.content)  # the grammar made it JSON, whatever the model wanted to say
    assert set(place) == {"city", "country"}, reply.content
    assert all(isinstance(v, str) and v.strip() for v in place.values()), reply.content
