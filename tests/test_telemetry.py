"""Telemetry: a real Prometheus scrapes a node's metrics, one trace follows a job, and off means off.

The node is a whole one (`runtime.builder.assemble`, receipts on, JetStream) in this
process; Prometheus is Debian's `prometheus` binary, started on a free port with a scrape
config pointing at the node's metrics port; spans are kept by the SDK's in-memory exporter
(in this process for the executor, in a client subprocess for the cross-process trace).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from structlog.testing import capture_logs

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.config import ConfigError, ExecutorConfig, TelemetryConfig, parse_config
from executor.process.embedded_nats import EmbeddedNats
from executor.runtime.builder import RunningNode, assemble
from executor.telemetry.recorder import OTHER_MODEL, JobRecorder
from executor.telemetry.setup import OTLP_MISSING, Telemetry
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.errors import InvalidRequest, LloomError
from protocol.identity import Identity
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import MODEL, ask
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

ROOT = Path(__file__).resolve().parent.parent
# Exported only by a node with a backend pool (breakers) or the durable queue (its depth); this one has neither.
ONLY_WITH_A_POOL_OR_QUEUE = {"lloom_backend_breaker_state", "lloom_queue_depth"}
PROMPT_TOKENS = 3  # the double counts words: "say something short"
COMPLETION_TOKENS = 8  # the double's default answer length
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331


def node_config(double: OpenAIDouble, tmp_path: Path, telemetry: str = "") -> ExecutorConfig:
    return parse_config(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\nmodels = ["{MODEL}"]\n'
        f'[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\n[telemetry]\n{telemetry}\n',
        source="test.toml", environ={},
    )  # fmt: skip


async def start_node(stack: AsyncExitStack, server: EmbeddedNats, double: OpenAIDouble, config: ExecutorConfig,
                     tracer_provider: TracerProvider | None = None) -> RunningNode:  # fmt: skip
    nc = await nats.connect(server.url)
    stack.push_async_callback(nc.close)
    backend = OpenAICompatibleBackend(base_url=double.base_url)
    stack.push_async_callback(backend.aclose)
    return await assemble(config, nc, backend, stack, identity=Identity.generate(), tracer_provider=tracer_provider)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_prometheus_scraping_a_node_counts_its_requests_tokens_and_errors(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path, prometheus: tuple[str, Path]
) -> None:
    ok_unary, ok_streams, errors = 4, 2, 3
    async with AsyncExitStack() as stack:
        running = await start_node(stack, js_server, double, node_config(double, tmp_path,
                                   'prometheus_listen = "127.0.0.1:0"'))  # fmt: skip
        assert running.telemetry is not None and running.telemetry.endpoint is not None
        async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
            for _ in range(ok_unary):
                await client.complete(ask())
            for _ in range(ok_streams):
                async with client.stream(ask()) as stream:
                    assert len([c async for c in stream]) == COMPLETION_TOKENS
            for _ in range(errors):
                double.faults.append(Fault.status(400, "no such thing"))
                with pytest.raises(InvalidRequest):
                    await client.complete(ask())
        base = await start_prometheus(stack, *prometheus, f"127.0.0.1:{running.telemetry.endpoint.port}")
        ok = ok_unary + ok_streams
        expected = {
            'sum(lloom_requests_total{lloom_outcome="ok", gen_ai_request_model="%s"})' % MODEL: ok,
            'sum(lloom_errors_total{error_type="bad_request"})': errors,
            'sum(gen_ai_client_token_usage_sum{gen_ai_token_type="input"})': ok * PROMPT_TOKENS,
            'sum(gen_ai_client_token_usage_sum{gen_ai_token_type="output"})': ok * COMPLETION_TOKENS,
            "sum(gen_ai_server_request_duration_seconds_count)": ok + errors,
            "sum(gen_ai_server_time_to_first_token_seconds_count)": ok_streams,
            "lloom_backend_healthy": 1,
            "lloom_jobs_capacity": 32,
            "lloom_receipts_issued_total": ok,
        }
        got: dict[str, float | None] = {}

        async def all_scraped() -> bool:
            for query in expected:
                got[query] = await promql(base, query)
            return got == expected

        await eventually(all_scraped, timeout=60, what=lambda: f"PromQL results {got}, expected {expected}")
        # A histogram's buckets are real ones: every job is under the +Inf bucket.
        assert await promql(base, 'sum(gen_ai_server_request_duration_seconds_bucket{le="+Inf"})') == ok + errors
        # The shipped dashboard's queries are valid PromQL over series this executor exports.
        async with aiohttp.ClientSession() as http, http.get(f"{base}/api/v1/label/__name__/values") as r:
            exported = set((await r.json())["data"])
        for expr in dashboard_queries(gateway=False):
            async with aiohttp.ClientSession() as http, http.get(f"{base}/api/v1/query", params={"query": expr}) as r:
                assert (await r.json())["status"] == "success", expr
            used = set(re.findall(r"\b((?:lloom|gen_ai)_[a-z_]+)\{", expr))
            assert used and used <= exported | ONLY_WITH_A_POOL_OR_QUEUE, (expr, used - exported)


def test_the_shipped_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool") or pytest.skip("promtool is not installed: apt-get install -y prometheus")
    checked = subprocess.run([promtool, "check", "config", str(ROOT / "compose" / "prometheus" / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_the_metrics_port_answers_on_loopback_and_nothing_answers_on_the_machines_other_address(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    async with AsyncExitStack() as stack:
        running = await start_node(stack, js_server, double, node_config(double, tmp_path,
                                   'prometheus_listen = "127.0.0.1:0"'))  # fmt: skip
        assert running.telemetry is not None and running.telemetry.endpoint is not None
        port = running.telemetry.endpoint.port
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:  # the scraper on this host
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):  # another host, through the machine's address
                await http.get(f"http://{outside}:{port}/metrics")


async def test_model_names_a_caller_makes_up_create_no_series_on_the_metrics_port(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    """A label cardinality attack: jobs for 40 made-up model names, sent to the executor's direct
    subject (which takes any model name), are counted under `other`, never as series of their own."""
    async with AsyncExitStack() as stack:
        running = await start_node(stack, js_server, double, node_config(double, tmp_path,
                                   'prometheus_listen = "127.0.0.1:0"'))  # fmt: skip
        assert running.telemetry is not None and running.telemetry.endpoint is not None
        made_up = [f"attacker-model-{i}" for i in range(40)]
        async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
            await client.complete(ask(), executor=running.node.id)  # the allowed case: a served model
            for name in made_up:
                with pytest.raises(LloomError):
                    await client.complete(ask(model=name), executor=running.node.id)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{running.telemetry.endpoint.port}/metrics") as r:
                text = await r.text()
    assert f'gen_ai_request_model="{MODEL}"' in text and f'gen_ai_request_model="{OTHER_MODEL}"' in text
    assert "attacker-model" not in text
    models = set(re.findall(r'gen_ai_request_model="([^"]*)"', text))
    assert models == {MODEL, OTHER_MODEL}


# -- traces ----------------------------------------------------------------------------


def in_memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def caller_span() -> NonRecordingSpan:
    """A span of the calling application (what its own tracing would have made)."""
    return NonRecordingSpan(SpanContext(TRACE_ID, CALLER_SPAN_ID, is_remote=False,
                                        trace_flags=TraceFlags(TraceFlags.SAMPLED)))  # fmt: skip


def by_name(spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind = SpanKind.INTERNAL) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name and s.kind == kind]
    return span


async def test_one_trace_follows_a_job_from_the_caller_through_nats_into_the_executor_and_its_backend(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    provider, exporter = in_memory_provider()
    async with AsyncExitStack() as stack:
        await start_node(stack, js_server, double, node_config(double, tmp_path), tracer_provider=provider)
        async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
            with trace.use_span(caller_span()):
                reply = await client.complete(ask(temperature=0))  # cacheable: the lookup is traced too
        spans = await eventually(lambda: len(exporter.get_finished_spans()) >= 5 and exporter.get_finished_spans(),
                                 timeout=WAIT_S, what="the job's five spans")  # fmt: skip
    job = by_name(spans, f"chat {MODEL}", SpanKind.SERVER)
    assert {s.context.trace_id for s in spans} == {TRACE_ID}
    assert job.parent is not None and job.parent.span_id == CALLER_SPAN_ID and job.parent.is_remote
    children = {s.name: s for s in spans if s is not job}
    assert set(children) == {"queue wait", "cache lookup", f"chat {MODEL}", "receipt"}
    assert all(s.parent is not None and s.parent.span_id == job.context.span_id for s in children.values())
    assert job.attributes is not None
    assert {k: job.attributes[k] for k in ("gen_ai.operation.name", "gen_ai.request.model", "gen_ai.system",
                                           "lloom.job.id", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")} == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": MODEL, "gen_ai.system": "openai_compatible",
        "lloom.job.id": reply.job_id, "gen_ai.usage.input_tokens": PROMPT_TOKENS,
        "gen_ai.usage.output_tokens": COMPLETION_TOKENS,
    }  # fmt: skip
    backend_call = by_name(spans, f"chat {MODEL}", SpanKind.CLIENT)
    assert backend_call.attributes is not None and backend_call.attributes["gen_ai.request.model"] == MODEL
    # The backend's HTTP request carries the backend span's context: the backend's own spans join in.
    [headers] = double.request_headers
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{backend_call.context.span_id:016x}-01"


async def test_a_streamed_job_marks_its_first_token_and_an_error_marks_its_span(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    provider, exporter = in_memory_provider()
    async with AsyncExitStack() as stack:
        await start_node(stack, js_server, double, node_config(double, tmp_path), tracer_provider=provider)
        async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
            async with client.stream(ask()) as stream:
                assert len([c async for c in stream]) == COMPLETION_TOKENS
            double.faults.append(Fault.status(400, "no such thing"))
            with pytest.raises(InvalidRequest):
                await client.complete(ask())

        def two_jobs() -> list[ReadableSpan]:
            return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER][:2]

        streamed, failed = await eventually(lambda: len(two_jobs()) == 2 and two_jobs(), timeout=WAIT_S,
                                            what="both jobs' spans")  # fmt: skip
    spans = exporter.get_finished_spans()
    [backend_stream] = [s for s in spans if s.kind == SpanKind.CLIENT and s.context.trace_id == streamed.context.trace_id]
    assert [e.name for e in backend_stream.events] == ["gen_ai.first_token"]
    assert failed.attributes is not None and failed.attributes["error.type"] == "bad_request"
    assert not failed.status.is_ok and streamed.status.is_ok


CLIENT_SCRIPT = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from protocol.client import LloomClient
from protocol.messages import ChatRequest, Message, Role

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

async def main():
    async with await LloomClient.connect(sys.argv[1], timeout=10) as client:
        reply = await client.complete(ChatRequest(model=sys.argv[2], messages=[Message(Role.USER, "hi there")]))
    [span] = exporter.get_finished_spans()
    print(json.dumps({"job_id": reply.job_id, "name": span.name, "kind": span.kind.name,
                      "trace_id": span.context.trace_id, "span_id": span.context.span_id,
                      "attributes": dict(span.attributes)}))

asyncio.run(main())
"""


@pytest.mark.slow
async def test_the_trace_crosses_the_process_boundary_from_a_client_process_to_the_executor(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    provider, exporter = in_memory_provider()
    async with AsyncExitStack() as stack:
        await start_node(stack, js_server, double, node_config(double, tmp_path), tracer_provider=provider)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT_SCRIPT, js_server.url, MODEL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await within(proc.communicate(), "the client process")
        assert proc.returncode == 0, err.decode()[-2000:]
        client_span = json.loads(out.decode().strip().splitlines()[-1])
        job = await eventually(
            lambda: next((s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER), None),
            timeout=WAIT_S, what="the executor's job span",
        )  # fmt: skip
    assert (client_span["name"], client_span["kind"]) == (f"chat {MODEL}", "CLIENT")
    assert client_span["attributes"] == {"gen_ai.operation.name": "chat", "gen_ai.request.model": MODEL}
    assert job.context.trace_id == client_span["trace_id"]
    assert job.parent is not None and job.parent.span_id == client_span["span_id"]
    assert job.attributes is not None and job.attributes["lloom.job.id"] == client_span["job_id"]


# -- off means off, and what a caller sends is checked --------------------------------


async def test_with_telemetry_off_no_port_listens_no_span_is_kept_and_the_callers_context_passes_on(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    before = listening_ports()
    async with AsyncExitStack() as stack:
        running = await start_node(stack, js_server, double, node_config(double, tmp_path))
        assert running.telemetry is None
        assert running.node.context.recorder is None and running.node.context.tracer is None
        assert listening_ports() - before == set()
        async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
            with trace.use_span(caller_span()), capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
                double.faults.append(Fault.status(400, "no such thing"))
                with pytest.raises(InvalidRequest):
                    await client.complete(ask())
    # No tracer provider anywhere: the process's is still the API's no-op proxy.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    # Not traced here, the job still hands the caller's context to the backend, and its log lines name the trace.
    [headers] = double.request_headers
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
    [line] = [e for e in logs if e["event"] == "job error"]
    assert line["trace_id"] == f"{TRACE_ID:032x}"


@pytest.mark.parametrize("traceparent", [
    "00-" + "0" * 32 + "-b7ad6b7169203331-01",  # an all-zero trace id is invalid
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 X-Evil: 1",
    "not a trace context",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff is forbidden
])  # fmt: skip
async def test_a_malformed_traceparent_is_ignored_and_never_reaches_the_backend(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path, traceparent: str
) -> None:
    async with AsyncExitStack() as stack:
        await start_node(stack, js_server, double, node_config(double, tmp_path))
        nc = await nats.connect(js_server.url)
        stack.push_async_callback(nc.close)
        reply = await nc.request(subj.complete_subject(MODEL), msgspec.json.encode(ask()), timeout=WAIT_S,
                                 headers={subj.HDR_TRACEPARENT: traceparent, subj.HDR_TRACESTATE: "a=b"})  # fmt: skip
    assert b'"content"' in reply.data  # the job itself ran
    [headers] = double.request_headers
    assert "traceparent" not in headers and "tracestate" not in headers


# -- the parts ----------------------------------------------------------------------


def test_model_labels_are_the_nodes_own_served_models_within_a_cap() -> None:
    recorder = JobRecorder(max_models=2)
    served = {"a", "b", "c"}
    for model in ("a", "b", "c", "typed-by-a-caller", "a"):
        recorder.job_done(model, "chat", "ok", 0.01, served=served)
    counts = {key: s.requests for key, s in recorder.series.items()}
    assert counts == {("a", "chat", "ok"): 2, ("b", "chat", "ok"): 1, (OTHER_MODEL, "chat", "ok"): 2}


def test_otlp_configured_without_its_extra_is_a_config_error_that_says_what_to_install() -> None:
    config = TelemetryConfig(otlp_endpoint="http://127.0.0.1:4318")
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'lloom\[otlp\]'") as e:
            Telemetry(config, "ex-1")
        assert str(e.value) == OTLP_MISSING
    else:  # the extra is installed: the exporters are made, and traces are then recorded
        telemetry = Telemetry(config, "ex-1")
        assert telemetry.tracer is not None and telemetry.recorder is not None


def test_telemetry_config_is_off_by_default_and_refuses_a_listen_address_without_a_port() -> None:
    assert not TelemetryConfig().enabled
    with pytest.raises(ConfigError, match="prometheus_listen"):
        parse_config('[telemetry]\nprometheus_listen = "0.0.0.0"\n', source="t.toml", environ={})


# -- the daemon ------------------------------------------------------------------------


def daemon_config(tmp_path: Path, double: OpenAIDouble, listen: str) -> Path:
    path = tmp_path / "executor.toml"
    path.write_text(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\nmodels = ["{MODEL}"]\n'
        f'[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\n[telemetry]\nprometheus_listen = "{listen}"\n'
        '[logging]\nformat = "json"\n'
    )
    return path


@pytest.mark.slow
async def test_the_daemon_serves_metrics_on_its_port_counts_a_job_and_closes_the_port_when_it_stops(
    start_executor: StartExecutor, nats_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    port = free_port()
    executor = await start_executor("--config", str(daemon_config(tmp_path, double, f"127.0.0.1:{port}")),
                                    "--nats", nats_server.url)  # fmt: skip
    await executor.started()
    assert (await executor.wait_for("prometheus metrics endpoint"))["url"] == f"http://127.0.0.1:{port}/metrics"
    async with await LloomClient.connect(nats_server.url, timeout=WAIT_S) as client:
        await client.complete(ask())
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            text = await r.text()
        async with http.get(f"http://127.0.0.1:{port}/") as r:
            assert r.status == 404  # the port serves /metrics only
    assert re.search(r'^lloom_requests_total\{[^}]*lloom_outcome="ok"[^}]*\} 1\.0$', text, re.M), text
    executor.proc.terminate()
    assert await executor.exit_code() == 0
    with pytest.raises(OSError):  # nothing listens there any more
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.slow
async def test_a_metrics_port_already_taken_stops_the_daemon_with_a_message_naming_the_key(
    start_executor: StartExecutor, nats_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        executor = await start_executor("--config", str(daemon_config(tmp_path, double, listen)),
                                        "--nats", nats_server.url)  # fmt: skip
        assert await executor.exit_code() == 2
    assert f"[telemetry] prometheus_listen = '{listen}'" in executor.stderr


# -- OTLP ----------------------------------------------------------------------------


async def test_otlp_export_sends_the_metrics_and_the_spans_to_the_collector(
    js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="pip install -e '.[otlp]' (CI has it)")
    collector = Collector()
    await collector.start()
    try:
        async with AsyncExitStack() as stack:
            await start_node(stack, js_server, double, node_config(double, tmp_path,
                             f'otlp_endpoint = "{collector.url}"\notlp_interval_secs = 0.2'))  # fmt: skip
            async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
                with trace.use_span(caller_span()):
                    for _ in range(3):
                        await client.complete(ask())
            await eventually(lambda: collector.last_sum("lloom.requests") == 3, timeout=WAIT_S,
                             what=lambda: f"lloom.requests = 3 at the collector (got {collector.last_sum('lloom.requests')})")
        # Leaving the stack flushed the spans (the batch processor's last export).
        usage = [m for m in collector.metrics if m.name == "gen_ai.client.token.usage"][-1]
        assert sum(p.sum for p in usage.histogram.data_points) == 3 * (PROMPT_TOKENS + COMPLETION_TOKENS)
        jobs = [s for s in collector.spans if s.name == f"chat {MODEL}" and s.kind == s.SPAN_KIND_SERVER]
        assert len(jobs) == 3 and {s.trace_id.hex() for s in jobs} == {f"{TRACE_ID:032x}"}
    finally:
        assert collector.runner is not None
        await collector.runner.cleanup()
