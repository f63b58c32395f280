"""Gateway telemetry: a real Prometheus scrapes a real gateway, one trace runs from the HTTP caller
through the gateway and NATS into the executor and its backend, and off means off.

The network is real (tests/helpers/gateway.py): nats-server with JetStream, an executor
assembled as the daemon does on the OpenAI double, a gateway on a free port; Prometheus is
Debian's binary (tests/helpers/prometheus.py); spans go to the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from executor.config import ConfigError, TelemetryConfig
from executor.gateway.observe import KNOWN_CODES, OTHER, Exchange, GatewayRecorder, error_code
from executor.gateway.telemetry import GatewayTelemetry
from executor.process.embedded_nats import EmbeddedNats
from protocol.messages import Usage
from tests.doubles.openai_double import Fault
from tests.helpers.gateway import Network, offer
from tests.helpers.jobs import MODEL as JOB_MODEL
from tests.helpers.otlp import Collector
from tests.helpers.processes import StartExecutor
from tests.helpers.prometheus import (  # noqa: F401 (a fixture)
    dashboard_queries,
    free_port,
    listening_ports,
    outside_address,
    prometheus,
    promql,
    start_prometheus,
)
from tests.helpers.wait import WAIT_S, eventually, within

MODEL = "gw-model"
PROMPT_TOKENS = 2  # the double counts words: "say hi"
COMPLETION_TOKENS = 8  # the double's default answer length
CHAT = "/v1/chat/completions"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


def chat(model: str = MODEL, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "say hi"}], **extra}


@pytest.fixture
async def net(js_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(js_server.url, tmp_path)
    try:
        yield network
    finally:
        await network.aclose()


async def gateway_telemetry(net: Network, config: TelemetryConfig, **kw: object) -> GatewayTelemetry:
    telemetry = GatewayTelemetry.standalone(config, "gw-test", **kw)  # type: ignore[arg-type]
    await telemetry.start()
    net.stack.push_async_callback(telemetry.aclose)
    return telemetry


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_prometheus_scraping_a_gateway_counts_its_requests_by_route_model_status_and_error(
    net: Network, prometheus: tuple[str, Path]
) -> None:
    ok, unknown, streams = 3, 2, 1
    await net.executor("exe-a", offer(MODEL))
    double = net.doubles["exe-a"]
    telemetry = await gateway_telemetry(net, TelemetryConfig(prometheus_listen="127.0.0.1:0"))
    assert telemetry.endpoint is not None
    gw = await net.gateway(observer=telemetry.observer, max_body_mb=0.01)
    async with aiohttp.ClientSession() as http:
        for _ in range(ok):
            async with http.post(f"{gw.url}{CHAT}", json=chat()) as r:
                assert r.status == 200
        for i in range(unknown):  # names a caller typed: never a label of their own
            async with http.post(f"{gw.url}{CHAT}", json=chat(f"no-such-model-{i}")) as r:
                assert r.status == 404
        for _ in range(streams):
            async with http.post(f"{gw.url}{CHAT}", json=chat(stream=True, stream_options={"include_usage": True})) as r:
                assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
        async with http.post(f"{gw.url}{CHAT}", json=chat(messages=[{"role": "user", "content": "x" * 20_000}])) as r:
            assert r.status == 413
        # A streaming caller that goes away after the first chunk.
        double.fault = Fault.slow(0.2)
        request = await http.post(f"{gw.url}{CHAT}", json=chat(stream=True))
        await request.content.readline()
        request.close()
        await within(double.disconnected.wait(), "the backend stream was cancelled")
    assert telemetry.recorder is not None
    await eventually(lambda: telemetry.recorder.in_flight == 0, timeout=WAIT_S, what="the cancelled request's end")  # type: ignore[union-attr]
    async with AsyncExitStack() as stack:
        base = await start_prometheus(stack, *prometheus, f"127.0.0.1:{telemetry.endpoint.port}", job="lloom-gateway")
        answered = ok + streams
        on_chat = f'http_route="{CHAT}", gen_ai_operation_name="chat"'
        expected = {
            f'sum(lloom_gateway_requests_total{{{on_chat}, gen_ai_request_model="{MODEL}", '
            f'http_response_status_code="200"}})': answered,
            f'sum(lloom_gateway_requests_total{{{on_chat}, gen_ai_request_model="other", '
            f'http_response_status_code="404", error_type="model_not_found"}})': unknown,
            'sum(lloom_gateway_requests_total{http_response_status_code="413"})': 1,
            'sum(lloom_gateway_errors_total{error_type="model_not_found"})': unknown,
            f'sum(lloom_gateway_cancels_total{{http_route="{CHAT}"}})': 1,
            "sum(lloom_gateway_body_too_large_total)": 1,
            "sum(lloom_gateway_requests_total)": answered + unknown + 2,
            f'sum(gen_ai_client_token_usage_sum{{{on_chat}, gen_ai_token_type="input"}})': answered * PROMPT_TOKENS,
            f'sum(gen_ai_client_token_usage_sum{{{on_chat}, gen_ai_token_type="output"}})': answered * COMPLETION_TOKENS,
            f"sum(gen_ai_client_operation_duration_seconds_count{{{on_chat}}})": answered + unknown + 2,
            'sum(gen_ai_client_operation_duration_seconds_bucket{le="+Inf"})': answered + unknown + 2,
            # the finished stream and the one whose caller left both sent a first chunk
            "sum(lloom_gateway_time_to_first_chunk_seconds_count)": streams + 1,
            "lloom_gateway_requests_in_flight": 0,
            "lloom_gateway_streams_open": 0,
        }
        got: dict[str, float | None] = {}

        async def all_scraped() -> bool:
            for query in expected:
                got[query] = await promql(base, query)
            return got == expected

        await eventually(all_scraped, timeout=60, what=lambda: f"PromQL results {got}, expected {expected}")
        async with aiohttp.ClientSession() as http:
            # No model a caller typed became a label.
            async with http.get(f"{base}/api/v1/label/gen_ai_request_model/values") as r:
                assert set((await r.json())["data"]) == {MODEL, "other"}
            # The shipped dashboard's gateway panels are valid PromQL over series this gateway exports.
            async with http.get(f"{base}/api/v1/label/__name__/values") as r:
                exported = set((await r.json())["data"])
            for expr in dashboard_queries(gateway=True):
                async with http.get(f"{base}/api/v1/query", params={"query": expr}) as r:
                    assert (await r.json())["status"] == "success", expr
                used = set(re.findall(r"\b((?:lloom|gen_ai)_[a-z_]+)\{", expr))
                assert used and used <= exported, (expr, used - exported)


def gauge(exposition: str, name: str) -> float:
    [value] = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", exposition, re.M)
    return float(value)


async def test_a_gateway_metric_endpoint_counts_an_open_stream_while_it_runs(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    double = net.doubles["exe-a"]
    telemetry = await gateway_telemetry(net, TelemetryConfig(prometheus_listen="127.0.0.1:0"))
    assert telemetry.endpoint is not None and telemetry.recorder is not None
    gw = await net.gateway(observer=telemetry.observer)
    double.fault = Fault.slow(0.2)
    metrics = f"http://127.0.0.1:{telemetry.endpoint.port}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}{CHAT}", json=chat(stream=True)) as r:
            await r.content.readline()
            async with http.get(metrics) as m:
                text = await m.text()
            assert gauge(text, "lloom_gateway_streams_open") == gauge(text, "lloom_gateway_requests_in_flight") == 1
            await r.read()
        async with http.get(metrics) as m:
            text = await m.text()
    assert gauge(text, "lloom_gateway_streams_open") == gauge(text, "lloom_gateway_requests_in_flight") == 0


# -- traces ----------------------------------------------------------------------------


def in_memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_one_trace_runs_from_the_http_caller_through_the_gateway_and_nats_into_the_executor_and_backend(
    net: Network,
) -> None:
    provider, exporter = in_memory_provider()
    await net.executor("exe-a", offer(MODEL), tracer_provider=provider)
    telemetry = await gateway_telemetry(net, TelemetryConfig(), tracer_provider=provider)
    assert telemetry.recorder is None and telemetry.endpoint is None  # traces only: no metrics, no port
    gw = await net.gateway(observer=telemetry.observer)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}{CHAT}", json=chat(), headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
            job_id = r.headers["X-Lloom-Job-Id"]

    def finished(name: str, kind: SpanKind) -> list:  # type: ignore[type-arg]
        return [s for s in exporter.get_finished_spans() if s.name == name and s.kind == kind]

    [gateway] = await eventually(lambda: finished(f"POST {CHAT}", SpanKind.SERVER), timeout=WAIT_S,
                                 what="the gateway's span")  # fmt: skip
    [job] = await eventually(lambda: finished(f"chat {MODEL}", SpanKind.SERVER), timeout=WAIT_S, what="the job span")
    [backend] = finished(f"chat {MODEL}", SpanKind.CLIENT)
    assert {gateway.context.trace_id, job.context.trace_id, backend.context.trace_id} == {TRACE_ID}
    assert gateway.parent is not None and gateway.parent.span_id == CALLER_SPAN_ID and gateway.parent.is_remote
    assert job.parent is not None and job.parent.span_id == gateway.context.span_id and job.parent.is_remote
    assert backend.parent is not None and backend.parent.span_id == job.context.span_id
    assert job.attributes is not None and job.attributes["lloom.job.id"] == job_id
    assert gateway.attributes is not None
    assert {k: gateway.attributes[k] for k in ("http.route", "http.response.status_code", "gen_ai.operation.name",
                                               "gen_ai.request.model", "gen_ai.usage.output_tokens")} == {
        "http.route": CHAT, "http.response.status_code": 200, "gen_ai.operation.name": "chat",
        "gen_ai.request.model": MODEL, "gen_ai.usage.output_tokens": COMPLETION_TOKENS,
    }  # fmt: skip
    [headers] = net.doubles["exe-a"].request_headers
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{backend.context.span_id:016x}-01"


async def test_without_a_traceparent_the_gateway_span_starts_the_trace_and_a_malformed_one_is_ignored(
    net: Network,
) -> None:
    provider, exporter = in_memory_provider()
    await net.executor("exe-a", offer(MODEL), tracer_provider=provider)
    telemetry = await gateway_telemetry(net, TelemetryConfig(), tracer_provider=provider)
    gw = await net.gateway(observer=telemetry.observer)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}{CHAT}", json=chat(), headers={"traceparent": "ff-nonsense-01"}) as r:
            assert r.status == 200
        async with http.post(f"{gw.url}{CHAT}", json=chat("no-such-model")) as r:
            assert r.status == 404

    def roots() -> list:  # type: ignore[type-arg]
        return [s for s in exporter.get_finished_spans() if s.name == f"POST {CHAT}"]

    spans = await eventually(lambda: len(roots()) == 2 and roots(), timeout=WAIT_S, what="both gateway spans")
    assert all(s.parent is None for s in spans)
    assert spans[0].context.trace_id != spans[1].context.trace_id
    refused = spans[1]
    assert refused.attributes is not None and refused.attributes["error.type"] == "model_not_found"
    assert refused.attributes["gen_ai.request.model"] == "other"  # a typed name is not recorded as it came


async def test_with_telemetry_off_the_gateway_opens_no_port_records_no_span_and_adds_no_middleware(
    net: Network,
) -> None:
    await net.executor("exe-a", offer(MODEL))
    telemetry = await gateway_telemetry(net, TelemetryConfig())
    assert telemetry.observer is None and telemetry.recorder is None and telemetry.endpoint is None
    before = listening_ports()
    gw = await net.gateway(observer=telemetry.observer)
    assert listening_ports() - before == {gw.port}
    assert [m.__qualname__ for m in gw.app.middlewares] == ["guard.<locals>.middleware"]  # the Host/Origin guard only
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}{CHAT}", json=chat(), headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
    # No tracer anywhere: the process's provider is still the API's no-op proxy, and the job carried no context.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    [headers] = net.doubles["exe-a"].request_headers
    assert "traceparent" not in headers


# -- the in-process gateway shares the executor's port -----------------------------------


@pytest.mark.slow
async def test_the_executors_in_process_gateway_reports_on_the_executors_metrics_port(
    start_executor: StartExecutor, double, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    metrics_port, gateway_port = free_port(), free_port()
    config = tmp_path / "executor.toml"
    config.write_text(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\nmodels = ["{JOB_MODEL}"]\n'
        f'[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\n'
        f'[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n'
        f'[telemetry]\nprometheus_listen = "127.0.0.1:{metrics_port}"\n[logging]\nformat = "json"\n'
    )
    executor = await start_executor("--config", str(config))  # no --nats: the single-machine start, gateway on
    await executor.started()
    await executor.wait_for("OpenAI-compatible gateway ready")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{gateway_port}{CHAT}", json=chat(JOB_MODEL)) as r:
            assert r.status == 200, await r.text()
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = await r.text()
    lines = text.splitlines()
    # One port, both parts: the gateway's request and the executor's job.
    assert any(line.startswith("lloom_gateway_requests_total{") and f'gen_ai_request_model="{JOB_MODEL}"' in line
               and 'http_response_status_code="200"' in line and line.endswith(" 1.0") for line in lines), text  # fmt: skip
    assert any(line.startswith("lloom_requests_total{") and 'lloom_outcome="ok"' in line for line in lines), text
    # gen_ai.client.operation.duration: the executor's backend call and the gateway's request, in one family.
    assert text.count("# HELP gen_ai_client_operation_duration_seconds ") == 1
    assert any(line.startswith("gen_ai_client_operation_duration_seconds_count{") and "http_route" in line
               for line in lines)  # fmt: skip
    executor.proc.terminate()
    assert await executor.exit_code() == 0


# -- the parts ----------------------------------------------------------------------------


def test_a_model_becomes_a_label_only_once_an_executor_answered_for_it_within_the_cap() -> None:
    recorder = GatewayRecorder(max_models=2)
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    for model, served in (("a", True), ("typed-by-a-caller", False), ("b", True), ("c", True), ("a", False)):
        ex = Exchange(recorder)
        ex.model, ex.served, ex.usage = model, served, usage
        recorder.done(CHAT, 200 if served else 404, "", 0.01, ex, 0.0)
    counts = {(key[2], key[3]): s.requests for key, s in recorder.series.items()}
    assert counts == {("a", 200): 1, ("other", 404): 1, ("b", 200): 1, ("other", 200): 1, ("a", 404): 1}


def test_an_error_code_label_is_one_the_gateway_answers_with_or_other() -> None:
    assert error_code(b'{"error": {"message": "m", "type": "t", "code": "model_not_found"}}') == "model_not_found"
    assert error_code(b'{"error": {"message": "m", "type": "t", "code": "made-up-by-someone"}}') == OTHER
    assert error_code(b"not json") == OTHER and error_code(None) == OTHER
    assert {"request_too_large", "invalid_api_key", "no_executors", "cancelled"} <= KNOWN_CODES


async def test_a_gateway_metrics_port_already_taken_is_a_config_error_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        telemetry = GatewayTelemetry.standalone(TelemetryConfig(prometheus_listen=listen), "gw-test")
        try:
            with pytest.raises(ConfigError, match=r"\[telemetry\] prometheus_listen"):
                await telemetry.start()
        finally:
            await telemetry.aclose()


async def test_routes_are_labelled_by_their_template_never_by_the_raw_path(net: Network) -> None:
    await net.executor("exe-a", offer(MODEL))
    telemetry = await gateway_telemetry(net, TelemetryConfig(prometheus_listen="127.0.0.1:0"))
    assert telemetry.recorder is not None
    gw = await net.gateway(observer=telemetry.observer)
    async with aiohttp.ClientSession() as http:
        for path in (f"/v1/models/{MODEL}", "/v1/models/secret-name-1", "/v1/no/such/endpoint-2", "/outside-3"):
            async with http.get(f"{gw.url}{path}") as r:
                assert r.status in (200, 404)
    routes = {(key[0], key[3]): s.requests for key, s in telemetry.recorder.series.items()}
    assert routes == {("/v1/models/{id}", 200): 1, ("/v1/models/{id}", 404): 1, ("/v1/{tail}", 404): 1,
                      ("other", 404): 1}  # fmt: skip


GATEWAY = str(Path(sys.executable).parent / "lloom-gateway")


@pytest.mark.slow
async def test_lloom_gateway_serves_its_metrics_on_loopback_only_and_closes_the_port_when_it_stops(
    net: Network, js_server: EmbeddedNats, tmp_path: Path
) -> None:
    await net.executor("exe-a", offer(MODEL))
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[telemetry]\nprometheus_listen = "127.0.0.1:{metrics_port}"\n')
    proc = await asyncio.create_subprocess_exec(
        GATEWAY, "--config", str(config), "--nats", js_server.url, "--listen", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        line = await within(proc.stdout.readline(), "the gateway's URL on stdout")  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}/v1" in line.decode()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=chat()) as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200
                text = await r.text()
            outside = outside_address()
            if outside is not None:  # another host, through the machine's address: nothing answers
                with pytest.raises(aiohttp.ClientConnectionError):
                    await http.get(f"http://{outside}:{metrics_port}/metrics")
        assert re.search(r'^target_info\{[^}]*service_name="lloom-gateway"', text, re.M), text
        assert re.search(rf'^lloom_gateway_requests_total{{[^}}]*gen_ai_request_model="{MODEL}"[^}}]*'
                         r'http_response_status_code="200"[^}]*\} 1\.0$', text, re.M), text  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert await within(proc.wait(), "the gateway's exit") == 0
        with pytest.raises(OSError):  # nothing listens there any more
            await asyncio.open_connection("127.0.0.1", metrics_port)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_otlp_export_sends_the_gateways_metrics_and_spans_to_the_collector(net: Network) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="pip install -e '.[otlp]' (CI has it)")
    collector = Collector()
    await collector.start()
    try:
        await net.executor("exe-a", offer(MODEL))
        telemetry = GatewayTelemetry.standalone(
            TelemetryConfig(otlp_endpoint=collector.url, otlp_interval_secs=0.2), "gw-test")  # fmt: skip
        await telemetry.start()
        assert telemetry.endpoint is None and telemetry.tracer is not None  # no port: OTLP only
        try:
            gw = await net.gateway(observer=telemetry.observer)
            async with aiohttp.ClientSession() as http:
                for _ in range(2):
                    async with http.post(f"{gw.url}{CHAT}", json=chat(), headers={"traceparent": TRACEPARENT}) as r:
                        assert r.status == 200
            await eventually(lambda: collector.last_sum("lloom.gateway.requests") == 2, timeout=WAIT_S,
                             what=lambda: f"2 requests at the collector (got {collector.last_sum('lloom.gateway.requests')})")
        finally:
            await telemetry.aclose()  # the batch span processor's last export
        usage = [m for m in collector.metrics if m.name == "gen_ai.client.token.usage"][-1]
        assert sum(p.sum for p in usage.histogram.data_points) == 2 * (PROMPT_TOKENS + COMPLETION_TOKENS)
        spans = [s for s in collector.spans if s.name == f"POST {CHAT}"]
        assert len(spans) == 2 and {s.trace_id.hex() for s in spans} == {f"{TRACE_ID:032x}"}
        assert {s.parent_span_id.hex() for s in spans} == {f"{CALLER_SPAN_ID:016x}"}
    finally:
        assert collector.runner is not None
        await collector.runner.cleanup()
