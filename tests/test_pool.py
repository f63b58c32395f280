"""A pool of backends: spreading load, breaking circuits, retrying, falling back — as callers see it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest

from executor.backends.breaker import BreakerState, CircuitBreaker
from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.pool import BackendPool, Member
from executor.backends.registry import create_pool
from executor.config import FallbackConfig, LoadBalancingConfig, NodeConfig, RetryConfig, parse_config
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.errors import BackendError, DeadlineExceeded, InvalidRequest, RateLimited, StreamInterrupted
from tests.conftest import Signing
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.clock import FakeClock
from tests.helpers.jobs import ask


class Rig:
    def __init__(self, pool: BackendPool, doubles: dict[str, OpenAIDouble], node: ExecutorNode) -> None:
        self.pool = pool
        self.doubles = doubles
        self.node = node
        self.sleeps: list[float] = []

    def served(self) -> dict[str, int]:
        return {name: d.completed for name, d in self.doubles.items()}


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(nats_server: EmbeddedNats, signing: Signing) -> AsyncIterator[MakeRig]:
    made: list[tuple[Rig, object]] = []

    async def factory(
        *names: str,
        strategy: str = "round_robin",
        weights: dict[str, int] | None = None,
        models: dict[str, list[str]] | None = None,
        fallbacks: list[FallbackConfig] | None = None,
        retry: RetryConfig | None = None,
        clock: FakeClock | None = None,
        real_sleep: bool = False,
        model_features: dict[str, list[str]] | None = None,
    ) -> Rig:
        doubles = {}
        members = []
        for name in names:
            served = (models or {}).get(name, ["m"])
            double = OpenAIDouble(models=served)
            await double.start()
            doubles[name] = double
            breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10.0, clock=clock or FakeClock())
            backend = OpenAICompatibleBackend(base_url=double.base_url, timeout_secs=5)
            members.append(Member(name, backend, served, (weights or {}).get(name, 1), breaker))
        sleeps: list[float] = []

        async def record_sleep(seconds: float) -> None:
            sleeps.append(seconds)

        pool = BackendPool(
            members,
            balancing=LoadBalancingConfig(strategy=strategy),  # type: ignore[arg-type]
            retry=retry or RetryConfig(),
            fallbacks={f.model: f for f in fallbacks or []},
            sleep=asyncio.sleep if real_sleep else record_sleep,  # real: the backoff itself is under test
        )
        nc = await nats.connect(nats_server.url)
        node = ExecutorNode(nc, pool, NodeConfig(), model_features=model_features, **signing())
        await node.start()
        rig = Rig(pool, doubles, node)
        rig.sleeps = sleeps
        made.append((rig, nc))
        return rig

    yield factory
    for rig, nc in made:
        await rig.node.stop(drain_timeout=1)
        await rig.pool.aclose()
        await nc.close()  # type: ignore[attr-defined]
        for d in rig.doubles.values():
            await d.stop()


async def test_round_robin_spreads_evenly(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a", "b", "c")
    for _ in range(30):
        await client.complete(ask(model="m"))
    assert rig.served() == {"a": 10, "b": 10, "c": 10}


async def test_weighted_spreads_by_weight(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("primary", "local", strategy="weighted", weights={"primary": 70, "local": 30})
    for _ in range(100):
        await client.complete(ask(model="m"))
    assert rig.served() == {"primary": 70, "local": 30}


async def test_least_connections_avoids_the_busy_backend(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("stuck", "free", strategy="least_connections")
    stuck, free = rig.doubles["stuck"], rig.doubles["free"]
    stuck.fault = Fault.stall()
    held = []
    while stuck.in_flight == 0:  # ties go either way: send until one job hangs on "stuck"
        stuck.started.clear()
        held.append(asyncio.create_task(client.complete(ask(model="m"))))
        await asyncio.wait([held[-1], asyncio.create_task(stuck.started.wait())], return_when=asyncio.FIRST_COMPLETED)
    before = free.completed
    for _ in range(5):
        await client.complete(ask(model="m"))
    assert free.completed == before + 5
    assert len(stuck.requests) == 1
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


async def test_a_broken_backend_fails_no_request_and_its_breaker_opens(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("broken", "healthy")
    rig.doubles["broken"].fault = Fault.status(500, "down")
    for _ in range(10):
        assert (await client.complete(ask(model="m"))).content.startswith("tok0")
    broken = rig.pool.members[0]
    assert broken.breaker.state is BreakerState.OPEN
    assert len(rig.doubles["broken"].requests) == 2  # the failure threshold, then no more traffic
    assert rig.served()["healthy"] == 10
    assert rig.sleeps == []  # moving to a healthy backend needs no backoff


async def test_an_open_breaker_lets_one_probe_through_after_the_cooldown_and_closes_on_success(
    make_rig: MakeRig, client: LloomClient
) -> None:
    clock = FakeClock()
    rig = await make_rig("flaky", "steady", clock=clock)
    rig.doubles["flaky"].fault = Fault.status(503, "overloaded")
    for _ in range(6):
        await client.complete(ask(model="m"))
    flaky = rig.pool.members[0]
    assert flaky.breaker.state is BreakerState.OPEN
    rig.doubles["flaky"].fault = None  # it recovers
    clock.now += 10.0  # the cooldown passes
    assert flaky.breaker.state is BreakerState.HALF_OPEN
    for _ in range(4):
        await client.complete(ask(model="m"))
    assert flaky.breaker.state is BreakerState.CLOSED
    assert rig.doubles["flaky"].completed >= 1


async def test_the_health_check_closes_a_recovered_backends_breaker(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a", "b")
    rig.doubles["a"].fault = Fault.status(500)
    for _ in range(4):
        await client.complete(ask(model="m"))
    assert rig.pool.members[0].breaker.state is BreakerState.OPEN
    rig.doubles["a"].fault = None
    assert await rig.pool.health_check()
    assert rig.pool.members[0].breaker.state is BreakerState.CLOSED


async def test_when_every_backend_fails_it_backs_off_as_the_seed_says_then_succeeds(
    make_rig: MakeRig, client: LloomClient
) -> None:
    rig = await make_rig("a", "b")
    for d in rig.doubles.values():
        d.faults.append(Fault.status(502, "blip"))
    assert (await client.complete(ask(model="m"))).content.startswith("tok0")
    [delay] = rig.sleeps
    assert 0.5 <= delay <= 1.0  # 1000 ms initial delay, with jitter


async def test_backoff_honours_retry_after(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a")
    rig.doubles["a"].faults.append(Fault.status(429, "slow down", headers={"Retry-After": "7"}))
    await client.complete(ask(model="m"))
    assert rig.sleeps and rig.sleeps[0] >= 7


async def test_retries_give_up_after_max_retries_with_the_last_error(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a", retry=RetryConfig(max_retries=3))
    rig.doubles["a"].faults.extend([Fault.status(429, "no", headers={"Retry-After": "1"})] * 4)
    rig.pool.members[0].breaker.failure_threshold = 100
    with pytest.raises(RateLimited):
        await client.complete(ask(model="m"))
    assert len(rig.sleeps) == 3
    assert len(rig.doubles["a"].requests) == 4


async def test_retries_stay_inside_the_callers_deadline(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a", real_sleep=True)
    rig.doubles["a"].fault = Fault.status(500)
    rig.pool.members[0].breaker.failure_threshold = 100
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        await client.complete(ask(model="m"), timeout=0.5)
    assert loop.time() - started < 2.0  # not the ~7 s that 3 backoffs would take


async def test_a_bad_request_is_not_retried_elsewhere(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a", "b")
    for d in rig.doubles.values():
        d.faults.append(Fault.status(400, "context length exceeded"))
    with pytest.raises(InvalidRequest):
        await client.complete(ask(model="m"))
    assert sum(len(d.requests) for d in rig.doubles.values()) == 1


async def test_a_stream_moves_before_its_first_token_but_never_after(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("a", "b")
    first, second = rig.doubles["a"], rig.doubles["b"]
    first.faults.append(Fault.reset())  # before any token: the stream goes to b
    async with client.stream(ask(model="m")) as stream:
        assert len([c async for c in stream]) == second.completion_tokens
    # Whichever takes the next one breaks after two tokens: the caller sees exactly those two
    # and the error; a retry elsewhere would have delivered a whole second answer instead.
    first.faults.append(Fault.reset(after_chunks=2))
    second.faults.append(Fault.reset(after_chunks=2))
    got: list[str] = []
    with pytest.raises(StreamInterrupted):
        async with client.stream(ask(model="m")) as stream:
            async for chunk in stream:
                got.append(chunk.delta)
    assert got == ["tok0 ", "tok1 "]


async def test_degrade_fallback_serves_a_cheaper_model_and_says_so(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig(
        "big", "small",
        models={"big": ["gpt-4"], "small": ["gpt-3.5-turbo"]},
        fallbacks=[FallbackConfig(model="gpt-4", strategy="degrade", degrade_model="gpt-3.5-turbo", degrade_max_tokens=4)],
    )  # fmt: skip
    rig.doubles["big"].fault = Fault.status(500, "down")
    reply = await client.complete(ask(model="gpt-4", max_tokens=50))
    assert reply.model == "gpt-3.5-turbo"
    assert reply.usage.completion_tokens == 4
    assert reply.degraded and "gpt-4" in reply.degraded and "max_tokens=4" in reply.degraded


async def test_reject_fallback_fails_at_once_without_backing_off(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("only", fallbacks=[FallbackConfig(model="m", strategy="reject")])
    rig.doubles["only"].fault = Fault.status(503, "down")
    with pytest.raises(BackendError):
        await client.complete(ask(model="m"))
    assert rig.sleeps == []


async def test_secondary_backends_are_kept_in_reserve(make_rig: MakeRig, client: LloomClient) -> None:
    rig = await make_rig("main", "backup", fallbacks=[FallbackConfig(model="m", strategy="secondary", secondary=["backup"])])
    for _ in range(5):
        await client.complete(ask(model="m"))
    assert rig.served() == {"main": 5, "backup": 0}
    rig.doubles["main"].fault = Fault.status(500)
    assert (await client.complete(ask(model="m"))).content.startswith("tok0")
    assert rig.served()["backup"] == 1


async def test_a_model_without_a_healthy_backend_is_announced_unavailable(make_rig: MakeRig) -> None:
    rig = await make_rig("a", models={"a": ["lonely"]})
    assert rig.node.model_available("lonely")
    rig.pool.members[0].breaker.failure()
    rig.pool.members[0].breaker.failure()
    assert not rig.node.model_available("lonely")


def test_the_design_documents_multi_backend_config_loads_into_a_pool(http) -> None:
    toml = b"""
[[executors.backends]]
name = "primary"
type = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"
models = ["gpt-4", "gpt-3.5-turbo"]

[[executors.backends]]
name = "local"
type = "lmstudio"
base_url = "http://localhost:1234/v1"
models = ["llama-2-13b", "mistral-7b"]

[[executors.backends]]
name = "fallback"
type = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY_BACKUP}"
models = ["gpt-3.5-turbo"]

[executors.load_balancing]
strategy = "round_robin"
health_check_interval_secs = 30
failure_threshold = 3

[[executors.load_balancing.weights]]
backend = "primary"
weight = 70

[[executors.load_balancing.weights]]
backend = "local"
weight = 30
"""
    cfg = parse_config(toml, source="seed.toml", environ={"OPENAI_API_KEY": "k1", "OPENAI_API_KEY_BACKUP": "k2"})
    pool = create_pool(cfg.executors, http)
    assert [(m.name, m.weight, sorted(m.models or [])) for m in pool.members] == [
        ("primary", 70, ["gpt-3.5-turbo", "gpt-4"]), ("local", 30, ["llama-2-13b", "mistral-7b"]),
        ("fallback", 1, ["gpt-3.5-turbo"]),
    ]  # fmt: skip
    assert [m.breaker.failure_threshold for m in pool.members] == [3, 3, 3]
    assert [c.name for c in pool.candidates("gpt-3.5-turbo")] in (["primary", "fallback"], ["fallback", "primary"])


@pytest.mark.slow  # runs `lloom-executor status` as a process
async def test_lloom_executor_status_shows_each_backends_breaker(
    make_rig: MakeRig, client: LloomClient, nats_server: EmbeddedNats, env: dict[str, str]
) -> None:
    import json

    from tests.helpers.processes import EXECUTOR, run

    rig = await make_rig("good", "bad")
    rig.doubles["bad"].fault = Fault.status(500)
    for _ in range(4):
        await client.complete(ask(model="m"))
    status = await run(EXECUTOR, "--nats", nats_server.url, "status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"{rig.node.id}: running, 0/32 jobs" in status.stdout
    assert "backend bad: breaker open, 2 failures in a row" in status.stdout
    assert "backend good: breaker closed" in status.stdout
    as_json = await run(EXECUTOR, "--nats", nats_server.url, "status", "--id", rig.node.id, "--json", env=env)
    status_json = json.loads(as_json.stdout)
    assert status_json["stats"]["completed"] == 4 and status_json["models"] == {"m": True}


async def test_a_backend_killed_mid_load_fails_no_request_and_takes_traffic_again_once_back(
    make_rig: MakeRig, client: LloomClient
) -> None:
    """The issue's scenario: steady concurrent load, one backend process dies, comes back."""
    rig = await make_rig("a", "b", "c")
    victim = rig.doubles["b"]
    port = victim.port
    results: list[object] = []
    killed = asyncio.Event()

    async def caller(n: int) -> None:
        for i in range(n):
            if i == n // 3 and not killed.is_set():
                killed.set()
                await victim.stop()  # its port now refuses connections; pooled ones are reset
            try:
                results.append((await client.complete(ask(model="m"))).content)
            except Exception as e:  # noqa: BLE001 - counted: there must be none
                results.append(e)

    await asyncio.gather(*(caller(30) for _ in range(8)))
    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == [] and len(results) == 240
    member_b = rig.pool.members[1]
    assert member_b.breaker.state is BreakerState.OPEN  # within the failure threshold (2 here)

    # It comes back on the same port; the health check closes its breaker; traffic returns.
    victim.port = port
    await victim.start()
    assert await rig.pool.health_check()
    assert member_b.breaker.state is BreakerState.CLOSED
    before = victim.completed
    for _ in range(30):
        await client.complete(ask(model="m"))
    assert victim.completed - before == 10  # round robin: its third again


async def test_a_pool_passes_tools_and_tool_calls_through_and_degrades_max_completion_tokens(
    make_rig: MakeRig, client: LloomClient
) -> None:
    import msgspec

    from protocol.messages import ChatRequest, FinishReason
    from tests.doubles.openai_script import Answer, ScriptedCall

    rig = await make_rig(
        "big", "small", models={"big": ["gpt-4"], "small": ["gpt-3.5-turbo"]},
        fallbacks=[FallbackConfig(model="gpt-4", strategy="degrade", degrade_model="gpt-3.5-turbo", degrade_max_tokens=4)],
        # Configured as for a backend that cannot be asked: the pool's members are doubles.
        model_features={"gpt-4": ["chat", "stream", "tools"]},
    )  # fmt: skip
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    request = msgspec.convert({"model": "gpt-4", "messages": [{"role": "user", "content": "call f"}], "tools": [tool],
                               "max_completion_tokens": 50}, ChatRequest)  # fmt: skip
    rig.doubles["big"].answers = [Answer(tool_calls=(ScriptedCall("call_1", "f", "{}"),))]
    # Straight to the node: nothing announces here, and a routed tools request needs an announcement.
    reply = await client.complete(request, executor=rig.node.id)
    assert reply.finish_reason is FinishReason.TOOL_CALLS and reply.tool_calls[0].function.name == "f"
    assert rig.doubles["big"].requests[-1]["tools"] == [tool]
    rig.doubles["big"].fault = Fault.status(500, "down")
    async with client.stream(request, executor=rig.node.id) as stream:
        assert "".join([c.delta async for c in stream]) == "tok0 tok1 tok2 tok3 "
    assert stream.end.degraded and "max_completion_tokens=4" in stream.end.degraded
    assert rig.doubles["small"].requests[-1]["max_tokens"] == 4 and rig.doubles["small"].requests[-1]["tools"] == [tool]
