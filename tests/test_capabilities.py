"""Executors announce what each model can do (tools, vision, json_schema, reasoning), clients route
requests that need a capability only to executors announcing it, and an executor refuses what its
model cannot do with `unsupported_feature` before calling its backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.presets import PRESETS
from executor.catalog.announcer import Announcer
from executor.config import ModelConfig, NodeConfig
from executor.jobs.node import ExecutorNode
from executor.process.embedded_nats import EmbeddedNats
from protocol import subjects as subj
from executor.backends.breaker import CircuitBreaker
from executor.backends.pool import BackendPool, Member
from executor.cache.memory import ResponseCache
from executor.config import ExecutorConfig, LlmClientConfig, LoadBalancingConfig, QueueConfig, RetryConfig
from executor.runtime.cli import _check
from executor.queue.consumer import JobQueue
from executor.queue.producer import JobEnqueuer
from protocol.chat_types import FunctionDefinition, ImagePart, ImageUrl, JsonSchema, JsonSchemaFormat, TextPart, Tool
from protocol.durable import JOBS_STREAM
from protocol.client import LloomClient
from protocol.errors import ErrorCode, NoExecutors, UnsupportedFeature
from protocol.identity import Identity
from protocol.messages import ChatRequest, ErrorReply, Message, Role, encoder, unary_reply_decoder
from tests.conftest import Signing
from tests.doubles.openai_double import OpenAIDouble, llama_props
from tests.helpers.jobs import ask

MODEL = "m"
WEATHER = Tool(function=FunctionDefinition(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))  # fmt: skip


def with_tools(**kw: Any) -> Any:
    return ask(MODEL, "what is the weather in Paris?", tools=[WEATHER], **kw)


def features(*caps: str) -> list[str]:
    return ["chat", "stream", *caps]


# -- detection, over HTTP, per server ---------------------------------------------------


async def listed(double: OpenAIDouble, preset: str) -> dict[str, frozenset[str] | None]:
    backend = OpenAICompatibleBackend(base_url=double.base_url, preset=PRESETS[preset], timeout_secs=5)
    try:
        return {m.id: m.capabilities for m in await backend.list_models()}
    finally:
        await backend.aclose()


async def test_llama_server_props_that_support_tools_and_vision_are_read_as_capabilities() -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = llama_props(supports_tools=True, vision=True)
        assert await listed(double, "llamacpp") == {MODEL: {"tools", "vision", "json_schema"}}
        assert double.probe_calls == ["/props"]


async def test_llama_server_props_without_tools_give_json_schema_only_and_a_thinking_template_reasoning() -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = llama_props(supports_tools=False)
        assert await listed(double, "llamacpp") == {MODEL: {"json_schema"}}
        double.props = llama_props(thinking=True)
        assert await listed(double, "llamacpp") == {MODEL: {"json_schema", "reasoning"}}


@pytest.mark.parametrize("answer", [None, {"unexpected": "shape"}], ids=["404", "wrong-shape"])
async def test_a_failed_props_probe_leaves_capabilities_unknown_and_the_models_listed(answer: Any) -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = answer
        assert await listed(double, "llamacpp") == {MODEL: None}
        assert double.probe_calls == ["/props"]


async def test_ollama_api_show_capabilities_per_model_and_an_unknown_model_stays_unknown() -> None:
    async with OpenAIDouble(models=["qwen3:8b", "llava:7b", "gone:1b"]) as double:
        double.ollama_capabilities = {"qwen3:8b": ["completion", "tools", "thinking"],
                                      "llava:7b": ["completion", "vision"]}  # fmt: skip
        assert await listed(double, "ollama") == {
            "qwen3:8b": {"json_schema", "tools", "reasoning"},
            "llava:7b": {"json_schema", "vision"},
            "gone:1b": None,  # /api/show answered 404 for it
        }
        assert sorted(double.probe_calls) == ["/api/show"] * 3


async def test_lm_studio_model_types_and_tool_use_are_read() -> None:
    async with OpenAIDouble(models=["qwen", "gemma-vision", "nomic-embed"]) as double:
        double.lmstudio_models = [
            {"id": "qwen", "type": "llm", "capabilities": ["tool_use"]},
            {"id": "gemma-vision", "type": "vlm"},
            {"id": "nomic-embed", "type": "embeddings"},
        ]
        assert await listed(double, "lmstudio") == {
            "qwen": {"json_schema", "tools"}, "gemma-vision": {"json_schema", "vision"}, "nomic-embed": frozenset()}


async def test_vllm_and_openai_presets_ask_nothing_beyond_the_model_list() -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = llama_props(supports_tools=True)
        assert await listed(double, "vllm") == {MODEL: None}
        assert await listed(double, "openai_compatible") == {MODEL: None}
        assert double.probe_calls == []


# -- executors on a real bus ------------------------------------------------------------


class Executor:
    def __init__(self, node: ExecutorNode, double: OpenAIDouble) -> None:
        self.node = node
        self.double = double

    @property
    def id(self) -> str:
        return self.node.id


MakeExecutor = Callable[..., Awaitable[Executor]]


@pytest.fixture
async def make_executor(nats_server: EmbeddedNats, signing: Signing) -> AsyncIterator[MakeExecutor]:
    """An executor serving MODEL from its own double, as a llama-server (`props`) whose /props says what it can do."""
    made: list[tuple[Executor, Announcer, NATS, OpenAICompatibleBackend]] = []

    async def factory(props: dict[str, Any] | None, *, configured: list[str] | None = None,
                      announced_only: bool = False, price: str = "0") -> Executor:
        """`announced_only`: `configured` reaches the announcer but not the node (an offer the node does not keep)."""
        double = OpenAIDouble(models=[MODEL])
        double.props = props
        await double.start()
        nc = await nats.connect(nats_server.url)
        backend = OpenAICompatibleBackend(base_url=double.base_url, preset=PRESETS["llamacpp"], timeout_secs=5)
        identity = Identity.generate()
        explicit = {MODEL: configured} if configured is not None and not announced_only else None
        node = ExecutorNode(nc, backend, NodeConfig(), model_features=explicit, **signing(None, identity))
        await node.start()
        offer = ModelConfig(name=MODEL, features=configured, input_price=Decimal(price), output_price=Decimal(price))
        announcer = Announcer(nc, node, identity, models=[offer], heartbeat_interval=0.5)
        await announcer.start()
        executor = Executor(node, double)
        made.append((executor, announcer, nc, backend))
        return executor

    yield factory
    for executor, announcer, nc, backend in made:
        await announcer.stop()
        await executor.node.stop(drain_timeout=1)
        await nc.close()
        await backend.aclose()
        await executor.double.stop()


async def announced(client: LloomClient, executor: Executor) -> list[str]:
    entry = next(e for e in (await client.catalog()).entries() if e.executor_id == executor.id)
    return next(o.features for o in entry.models if o.name == MODEL)


async def test_the_announcement_carries_what_the_backend_says_and_explicit_config_wins(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    tools = await make_executor(llama_props(supports_tools=True))
    plain = await make_executor(llama_props(supports_tools=False))
    silent = await make_executor(None)  # /props 404: only the defaults
    forced = await make_executor(llama_props(supports_tools=False), configured=features("tools"))

    assert await announced(client, tools) == features("json_schema", "tools")
    assert await announced(client, plain) == features("json_schema")
    assert await announced(client, silent) == features()
    assert await announced(client, forced) == features("tools")


async def test_a_tools_request_always_lands_on_the_executor_announcing_tools_a_plain_one_on_either(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    tools = await make_executor(llama_props(supports_tools=True))
    plain = await make_executor(llama_props(supports_tools=False))

    for _ in range(8):
        reply = await client.complete(with_tools())
        assert reply.executor_id == tools.id
    async with client.stream(with_tools()) as stream:
        async for _chunk in stream:
            pass
    assert stream.end is not None and stream.end.executor_id == tools.id
    assert len(tools.double.requests) == 9
    assert plain.double.requests == []

    served_by = {(await client.complete(ask(MODEL))).executor_id for _ in range(30)}
    assert served_by == {tools.id, plain.id}  # the queue group spreads them (all 30 on one: 2^-29)
    assert len(tools.double.requests) + len(plain.double.requests) == 39


async def test_when_no_executor_announces_tools_the_client_names_the_capability_and_who_lacks_it(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    a = await make_executor(llama_props(supports_tools=False))
    b = await make_executor(None)

    with pytest.raises(UnsupportedFeature) as caught:
        await client.complete(with_tools())
    assert "tools" in caught.value.message and MODEL in caught.value.message
    assert a.id in caught.value.message and b.id in caught.value.message
    with pytest.raises(UnsupportedFeature):
        async with client.stream(with_tools()) as stream:
            async for _chunk in stream:
                pass
    assert a.double.requests == [] and b.double.requests == []
    # A model nobody serves stays "no executors", whatever it needs.
    with pytest.raises(NoExecutors):
        await client.complete(ask("nobody-serves-this", tools=[WEATHER]))


async def test_an_executor_refuses_a_tools_request_for_a_model_without_tools_before_its_backend(
    make_executor: MakeExecutor, client: LloomClient, nc: NATS
) -> None:
    plain = await make_executor(llama_props(supports_tools=False))

    with pytest.raises(UnsupportedFeature) as caught:  # named executor: its own refusal
        await client.complete(with_tools(), executor=plain.id)
    assert "tools" in caught.value.message and plain.id in caught.value.message
    with pytest.raises(UnsupportedFeature):
        async with client.stream(with_tools(), executor=plain.id) as stream:
            async for _chunk in stream:
                pass

    # A raw NATS request on the model's subject: the typed error on the wire.
    msg = await nc.request(subj.complete_subject(MODEL), encoder.encode(with_tools()), timeout=5)
    reply = unary_reply_decoder.decode(msg.data)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNSUPPORTED_FEATURE
    # A structured-output request is fine there: llama-server constrains it with a grammar.
    schema = JsonSchemaFormat(json_schema=JsonSchema(name="city", schema_={"type": "object"}))
    assert (await client.complete(ask(MODEL, response_format=schema), executor=plain.id)).executor_id == plain.id

    assert len(plain.double.requests) == 1  # only the structured-output one reached the backend
    assert plain.node.stats.bad_requests == 0  # a refusal of a valid request, not a malformed one


async def test_a_routed_job_refused_for_a_feature_fails_over_to_the_next_candidate(
    make_executor: MakeExecutor, client: LloomClient
) -> None:
    # Announces tools, refuses them: what a client sees when an offer changed after its catalogue read it.
    # Cheaper, so ranked first every time (equal load): every job is tried there first.
    stale = await make_executor(llama_props(), configured=features("tools"), announced_only=True, price="0")
    tools = await make_executor(llama_props(supports_tools=True), price="1")

    for _ in range(4):
        assert (await client.complete(with_tools())).executor_id == tools.id
    assert stale.node.stats.received == 4 and stale.double.requests == []  # tried, refused, never at its backend
    assert len(tools.double.requests) == 4


async def test_tool_choice_none_needs_no_tools_capability(make_executor: MakeExecutor, client: LloomClient) -> None:
    plain = await make_executor(llama_props(supports_tools=False))

    reply = await client.complete(with_tools(tool_choice="none"))

    assert reply.executor_id == plain.id and len(plain.double.requests) == 1


async def test_explicit_config_features_are_enforced_as_announced(make_executor: MakeExecutor, client: LloomClient) -> None:
    # The operator knows better than /props: the executor takes tools requests for the model.
    forced = await make_executor(llama_props(supports_tools=False), configured=features("tools"))
    denied = await make_executor(llama_props(supports_tools=True), configured=features())

    assert (await client.complete(with_tools())).executor_id == forced.id
    with pytest.raises(UnsupportedFeature):
        await client.complete(with_tools(), executor=denied.id)
    assert len(forced.double.requests) == 1 and denied.double.requests == []


async def test_images_go_only_to_an_executor_announcing_vision(make_executor: MakeExecutor, client: LloomClient) -> None:
    seeing = await make_executor(llama_props(vision=True))
    blind = await make_executor(llama_props())
    picture = Message(Role.USER, [TextPart(text="what is in this picture?"),
                                  ImagePart(image_url=ImageUrl(url="data:image/png;base64,iVBORw0KGgo="))])  # fmt: skip

    for _ in range(4):
        assert (await client.complete(ChatRequest(model=MODEL, messages=[picture]))).executor_id == seeing.id
    with pytest.raises(UnsupportedFeature, match="vision"):
        await client.complete(ChatRequest(model=MODEL, messages=[picture]), executor=blind.id)
    assert blind.double.requests == []


async def test_what_the_backend_says_is_refreshed_with_the_model_list_and_a_cached_answer_is_not_served_past_it(
    nats_server: EmbeddedNats, client: LloomClient, signing: Signing
) -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = llama_props(supports_tools=True)
        nc = await nats.connect(nats_server.url)
        backend = OpenAICompatibleBackend(base_url=double.base_url, preset=PRESETS["llamacpp"], timeout_secs=5)
        node = ExecutorNode(nc, backend, NodeConfig(), cache=ResponseCache(), **signing())
        await node.start()
        try:
            request = with_tools(temperature=0)  # cacheable
            assert (await client.complete(request, executor=node.id)).cached is False
            assert (await client.complete(request, executor=node.id)).cached is True

            double.props = llama_props(supports_tools=False)  # the server reloaded another template
            await node.refresh_models()

            with pytest.raises(UnsupportedFeature):
                await client.complete(request, executor=node.id)
            assert len(double.requests) == 1
        finally:
            await node.stop(drain_timeout=1)
            await nc.close()
            await backend.aclose()


async def test_queued_tools_jobs_are_refused_typed_by_an_executor_without_tools_and_submit_checks_the_catalogue(
    js_server: EmbeddedNats, js_client: LloomClient
) -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = llama_props(supports_tools=False)
        nc = await nats.connect(js_server.url)
        backend = OpenAICompatibleBackend(base_url=double.base_url, preset=PRESETS["llamacpp"], timeout_secs=5)
        enqueuer = JobEnqueuer(nc.jetstream(), fallback_models=set(), consume_all=True)
        identity = Identity.generate()
        node = ExecutorNode(nc, backend, NodeConfig(), queue=enqueuer)
        queue = JobQueue(nc, node, enqueuer, QueueConfig(consume_all=True), idle_poll_s=0.02, fetch_wait_s=0.2)
        await node.start()
        await queue.start()
        announcer = Announcer(nc, node, identity, heartbeat_interval=0.5)
        try:
            # Nobody announces yet: the job is stored, and the executor that takes it refuses it typed.
            job = await js_client.submit(with_tools())
            with pytest.raises(UnsupportedFeature, match="tools"):
                await js_client.result(job, timeout=10)
            plain = await js_client.submit(ask(MODEL))
            assert (await js_client.result(plain, timeout=10)).content  # the node keeps serving

            # Once the executor is in the catalogue, submit refuses at once: nothing is stored.
            await announcer.start()
            stored = (await nc.jetstream().stream_info(JOBS_STREAM)).state.last_seq
            with pytest.raises(UnsupportedFeature, match="tools"):
                await js_client.submit(with_tools())
            assert (await nc.jetstream().stream_info(JOBS_STREAM)).state.last_seq == stored
            assert len(double.requests) == 1  # only the plain job reached the backend
        finally:
            await announcer.stop()
            await node.stop(drain_timeout=1)
            await queue.stop()
            await nc.close()
            await backend.aclose()


async def test_a_pool_announces_for_a_model_what_every_member_serving_it_supports() -> None:
    async with OpenAIDouble(models=[MODEL]) as a, OpenAIDouble(models=[MODEL]) as b:
        a.props = llama_props(supports_tools=True, vision=True)
        b.props = llama_props(supports_tools=True)

        def member(name: str, double: OpenAIDouble) -> Member:
            backend = OpenAICompatibleBackend(base_url=double.base_url, preset=PRESETS["llamacpp"], timeout_secs=5)
            return Member(name, backend, None, 1, CircuitBreaker())

        pool = BackendPool([member("a", a), member("b", b)], balancing=LoadBalancingConfig(), retry=RetryConfig())
        try:
            assert {m.id: m.capabilities for m in await pool.list_models()} == {MODEL: {"tools", "json_schema"}}
            b.props = None  # one member says nothing: the pool cannot promise anything
            assert {m.id: m.capabilities for m in await pool.list_models()} == {MODEL: None}
        finally:
            await pool.aclose()


async def test_executor_check_prints_what_the_backend_says_each_model_can_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with OpenAIDouble(models=[MODEL]) as double:
        double.props = llama_props(supports_tools=True)
        config = ExecutorConfig(llm_client=LlmClientConfig(backend="llamacpp", base_url=double.base_url))
        assert await _check(config) == 0
        double.props = None
        assert await _check(config) == 0

    printed = capsys.readouterr().out.splitlines()
    assert f"  model {MODEL}; backend capabilities: json_schema, tools" in printed
    assert f"  model {MODEL}; backend capabilities: says nothing" in printed
