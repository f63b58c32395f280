"""Attacks from a bystander on the bus, and secrets a backend could leak: each refused, the normal path intact.

Real nats-server, real nodes (in-process, or the `lloom-executor` / `lloom` scripts for
process tests); the attacker is a plain NATS connection doing what any connection may
do on a bus without permissions. The backend is the OpenAI double.

Covers: a planted shared-cache entry, a forged queued result, a bystander's cancels,
an oversized `Lloom-Client` header, secrets in backend errors, logs and status (a key
not shaped `sk-...`, credentials inside `base_url`), and rotating a backend's API key
without a restart (watched file, SIGHUP).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
import structlog
from nats.aio.client import Client as NATS

from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.registry import create_backend
from executor.cache.memory import ResponseCache, cache_key
from executor.cache.shared import SharedCache, SignedEntry
from executor.config import ExecutorConfig, parse_config
from executor.jobs.node import ExecutorNode
from executor.process.embedded_nats import EmbeddedNats
from executor.process.logs import redaction
from executor.runtime.builder import RunningNode, assemble
from executor.runtime.keys import KeyRotation
from executor.secrets import SecretMasker, config_secrets
from protocol import subjects as subj
from protocol.client import LloomClient
from protocol.durable import results_bucket
from protocol.errors import BackendAuthFailed, Cancelled, ErrorCode, ForgedResult, InvalidRequest
from protocol.identity import Identity
from protocol.messages import (
    ChatResponse,
    ErrorReply,
    FinishReason,
    Usage,
    encoder,
    error_to_wire,
    unary_reply_decoder,
)
from protocol.results import seal_result
from tests.conftest import Signing
from tests.doubles.openai_double import Fault, OpenAIDouble
from tests.helpers.jobs import MODEL, ask
from tests.helpers.processes import EXECUTOR, LLOOM, StartExecutor, run
from tests.helpers.wait import WAIT_S, eventually
from tests.test_daemon import write_config

SECRET_KEY = "hunter2-key-XYZ"  # a key not shaped like sk-...: only masking by value catches it
URL_PASSWORD = "pa55-in-the-url"


async def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    await eventually(condition, timeout=WAIT_S, what=what)


@pytest.fixture
async def attacker(js_server: EmbeddedNats) -> AsyncIterator[NATS]:
    """A bystander: an ordinary connection to the same server, nothing more."""
    nc = await nats.connect(js_server.url)
    yield nc
    await nc.close()


# -- a planted entry in the shared cache bucket --------------------------------


async def test_a_planted_shared_cache_entry_is_not_served_and_the_legitimate_path_still_caches(
    js_server: EmbeddedNats, attacker: NATS, signing: Signing
) -> None:
    request = ask(text="what is two plus two", temperature=0.0)
    key = cache_key(request)
    async with OpenAIDouble() as double_a, OpenAIDouble() as double_b, AsyncExitStack() as stack:
        nc = await nats.connect(js_server.url)
        stack.push_async_callback(nc.close)
        key_a, key_b = Identity.generate(), Identity.generate()
        shared_a = await SharedCache.open(nc.jetstream(), key_a, ttl_s=60, max_bytes=1 << 20)
        # Node b's operator vouches for node a, so a's answers serve b's callers.
        shared_b = await SharedCache.open(nc.jetstream(), key_b, ttl_s=60, max_bytes=1 << 20,
                                          trusted_keys=frozenset({key_a.public_key}))  # fmt: skip
        nodes = []
        for double, shared in ((double_a, shared_a), (double_b, shared_b)):
            node = ExecutorNode(nc, OpenAICompatibleBackend(base_url=double.base_url), models=[MODEL],
                                cache=ResponseCache(), shared_cache=shared, **signing())  # fmt: skip
            await node.start()
            stack.push_async_callback(node.backend.aclose)
            stack.push_async_callback(node.stop, 1)
            nodes.append(node)
        kv = await attacker.jetstream().key_value("LLOOM_CACHE")
        forged = msgspec.json.encode({"model": MODEL, "content": "PLANTED", "finish_reason": "stop",
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        await kv.put(key.hex(), forged)  # an unsigned completion, as the bucket used to hold

        async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
            first = await client.complete(request, executor=nodes[0].id)
            assert not first.cached and "PLANTED" not in first.content and double_a.completed == 1
            assert shared_a.rejected == 1 and shared_a.hits == 0
            assert nodes[0].status().cache.shared.rejected == 1  # type: ignore[union-attr]

            # Signed, but by the attacker's own key (which nobody trusts), for another request's key.
            mallory = Identity.generate()
            other = ask(text="another question", temperature=0.0)
            body = forged
            signed = SignedEntry(key=mallory.public_key, sig=mallory.sign(b"lloom-cache-v1:" + cache_key(other) + body),
                                 completion=msgspec.Raw(body))  # fmt: skip
            await kv.put(cache_key(other).hex(), msgspec.json.encode(signed))
            reply = await client.complete(other, executor=nodes[1].id)
            assert "PLANTED" not in reply.content and double_b.completed == 1 and shared_b.rejected == 1

            # The legitimate path: node a's own signed entry serves node b's caller.
            await until(lambda: not shared_a._writes, "node a's shared put")
            second = await client.complete(request, executor=nodes[1].id)
            assert second.cached and second.content == first.content
            assert double_b.completed == 1 and shared_b.hits == 1


# -- a forged result in LLOOM_RESULTS -------------------------------------------


def _forged_response(job_id: str, content: str = "FORGED") -> bytes:
    return encoder.encode(ChatResponse(job_id=job_id, executor_id="victim", model=MODEL, content=content,
                                       finish_reason=FinishReason.STOP, usage=Usage(1, 1, 2)))  # fmt: skip


@pytest.fixture
async def queue_node(js_server: EmbeddedNats, double: OpenAIDouble, tmp_path: Path) -> AsyncIterator[RunningNode]:
    """A whole node (receipts on) that takes every queued job for the double's model."""
    config = parse_config(
        f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\nmodels = ["{MODEL}"]\n'
        f'[receipts]\noutbox_dir = "{tmp_path / "outbox"}"\n[executors.queue]\nconsume_all = true\n',
        source="test.toml", environ={},
    )  # fmt: skip
    identity = Identity.generate()
    async with AsyncExitStack() as stack:
        nc = await nats.connect(js_server.url)
        stack.push_async_callback(nc.close)
        backend = OpenAICompatibleBackend(base_url=double.base_url)
        stack.push_async_callback(backend.aclose)
        yield await assemble(config, nc, backend, stack, identity=identity)


async def test_a_forged_queued_result_is_refused_and_the_real_one_is_accepted(
    js_server: EmbeddedNats, attacker: NATS, queue_node: RunningNode
) -> None:
    bucket = await results_bucket(attacker.jetstream())
    async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
        # The normal path: a submitted job's signed result, its receipt checked against what was sent.
        job_id = await client.submit(ask(text="real work"))
        real = await client.result(job_id, timeout=WAIT_S)
        assert real.job_id == job_id and real.receipt is not None and real.receipt.receipt.job_id == job_id

        # Planted before the job ran: the executor runs it anyway and files the real result over it.
        await bucket.put("planted-first", _forged_response("planted-first"))
        await attacker.flush()
        job = await client.submit(ask(text="planted first"), job_id="planted-first")
        assert (await client.result(job, timeout=WAIT_S)).content != "FORGED"

        # An unsigned answer, and an unsigned error: refused, not returned or raised as the job's error.
        await bucket.put("forged-answer", _forged_response("forged-answer"))
        await bucket.put("forged-error", encoder.encode(error_to_wire(InvalidRequest("you owe us"), job_id="forged-error")))
        for forged in ("forged-answer", "forged-error"):
            with pytest.raises(ForgedResult):
                await client.fetch(forged)
            with pytest.raises(ForgedResult):  # after waiting for a genuine one to be filed over it
                await client.result(forged, timeout=0.5)

        # A genuine result copied under another job's id.
        genuine = (await bucket.get(job_id)).value
        await bucket.put("copied", genuine)
        with pytest.raises(ForgedResult, match="signed for job"):
            await client.fetch("copied")

        # Signed by the attacker's own key: refused by a client that knows the executors' keys.
        mallory = Identity.generate()
        await bucket.put("self-signed", seal_result(mallory, "self-signed", _forged_response("self-signed")))
        async with LloomClient(client.nc, timeout=WAIT_S, result_keys={queue_node.identity.public_key}) as careful:
            with pytest.raises(ForgedResult, match="not a trusted executor key"):
                await careful.fetch("self-signed")
            assert (await careful.fetch(job_id)).content == real.content  # type: ignore[union-attr]

        # The attacker submits first under the id the victim will use: JetStream keeps the first, so
        # the victim's result is genuine but for another request; its receipt says so.
        async with LloomClient(attacker, timeout=WAIT_S) as intruder:
            await intruder.result(await intruder.submit(ask(text="the attacker's prompt"), job_id="taken-1"))
        await client.submit(ask(text="what I asked"), job_id="taken-1")
        with pytest.raises(ForgedResult, match="another request"):
            await client.result("taken-1", timeout=WAIT_S)


@pytest.mark.slow
async def test_lloom_result_exits_1_naming_a_forged_result(
    js_server: EmbeddedNats, attacker: NATS, env: dict[str, str]
) -> None:
    bucket = await results_bucket(attacker.jetstream())
    await bucket.put("forged-1", _forged_response("forged-1"))
    for args in (("--no-wait",), ("--timeout", "1")):
        out = await run(LLOOM, "--nats", js_server.url, "result", "forged-1", *args, env=env)
        assert out.returncode == 1, out
        assert "forged_result" in out.stderr and "FORGED" not in out.stdout


# -- a bystander's cancels --------------------------------------------------------


async def test_a_bystander_cannot_cancel_jobs_and_the_owner_can(
    nats_server: EmbeddedNats, double: OpenAIDouble, make_node, client: LloomClient  # type: ignore[no-untyped-def]
) -> None:
    node = await make_node()
    attacker = await nats.connect(nats_server.url)
    seen: list[str] = []

    async def cancel_everything(msg) -> None:  # type: ignore[no-untyped-def]
        job_id = msg.headers[subj.HDR_JOB_ID]
        seen.append(job_id)
        assert subj.HDR_CANCEL_TOKEN in msg.headers  # it can read the token's name, not guess its value
        await attacker.publish(subj.cancel_subject(job_id), b"")
        await attacker.publish(subj.cancel_subject(job_id), b"0" * 32)

    await attacker.subscribe(subj.complete_subject(MODEL), cb=cancel_everything)
    await attacker.flush()
    double.fault = Fault.slow(0.3)  # long enough for the cancels to arrive while the jobs run
    replies = await asyncio.gather(*(client.complete(ask(text=f"job {i}")) for i in range(8)))
    assert len(seen) == 8 and all(r.finish_reason is FinishReason.STOP for r in replies)
    assert node.stats.cancels_refused == 16 and node.stats.cancelled == 0 and node.stats.completed == 8

    # The owner's cancel (its caller gives up) still reaches the job.
    task = asyncio.create_task(client.complete(ask(text="give up on this"), timeout=WAIT_S))
    await until(lambda: double.in_flight == 1, "the job reaches the backend")
    task.cancel()
    await until(lambda: node.stats.cancelled == 1, "the owner's cancel")
    with pytest.raises(asyncio.CancelledError):
        await task
    await attacker.close()


# -- an oversized Lloom-Client header ------------------------------------------------


async def test_a_megabyte_client_header_is_a_typed_bad_request_and_the_node_keeps_serving(
    node: ExecutorNode, nc: NATS, client: LloomClient
) -> None:
    huge = "x" * 1_000_000
    reply = await nc.request(subj.complete_subject(MODEL), encoder.encode(ask()), timeout=WAIT_S,
                             headers={subj.HDR_JOB_ID: "big-1", subj.HDR_CLIENT: huge})  # fmt: skip
    err = unary_reply_decoder.decode(reply.data)
    assert isinstance(err, ErrorReply) and err.code == ErrorCode.BAD_REQUEST and "headers are" in err.message
    assert len(reply.data) < 2000  # nothing of the header came back
    odd = await nc.request(subj.complete_subject(MODEL), encoder.encode(ask()), timeout=WAIT_S,
                           headers={subj.HDR_CLIENT: "spaces and\ttabs"})  # fmt: skip
    odd_err = unary_reply_decoder.decode(odd.data)
    assert isinstance(odd_err, ErrorReply) and odd_err.code == ErrorCode.BAD_REQUEST and "client id" in odd_err.message
    assert node.stats.bad_requests == 2
    assert (await client.complete(ask())).content  # still serving
    with pytest.raises(InvalidRequest, match="client id"):
        LloomClient(nc, client_id="c" * 200)


# -- secrets: masked by value in errors, logs and status ------------------------------


def _leaky_config(double: OpenAIDouble, **extra: str) -> ExecutorConfig:
    base = double.base_url.replace("http://", f"http://operator:{URL_PASSWORD}@")
    text = f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{base}"\napi_key = "${{KEY}}"\n'
    text += "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    return parse_config(text, source="test.toml", environ={"KEY": SECRET_KEY})


async def test_a_backend_that_repeats_the_key_leaks_it_to_no_caller_no_log_and_no_status(
    nats_server: EmbeddedNats, http: aiohttp.ClientSession, signing: Signing
) -> None:
    async with OpenAIDouble(api_key="the-right-key", echo_key=True) as double:
        config = _leaky_config(double)
        masker = SecretMasker(config_secrets(config))
        backend = create_backend(config.llm_client, http)
        # The backend alone already scrubs its own key out of the body it quotes.
        with pytest.raises(BackendAuthFailed) as direct:
            await backend.complete(ask())
        assert SECRET_KEY not in direct.value.message and "***" in direct.value.message
        assert URL_PASSWORD not in backend.name and "***@" in backend.name

        conn = await nats.connect(nats_server.url)
        node = ExecutorNode(conn, backend, models=[MODEL], masker=masker, **signing())
        await node.start()
        try:
            with structlog.testing.capture_logs(processors=redaction(masker)) as logs:
                async with await LloomClient.connect(nats_server.url, timeout=WAIT_S) as client:
                    with pytest.raises(BackendAuthFailed) as caught:
                        await client.complete(ask())
                    structlog.get_logger("probe").warning("probe", detail=f"key={SECRET_KEY}", nested=[SECRET_KEY])
            assert SECRET_KEY not in caught.value.message and "Incorrect API key provided" in caught.value.message
            assert any(e.get("event") == "job error" for e in logs)  # the failure was logged...
            assert SECRET_KEY not in repr(logs)  # ...without the key
            assert "key=***" in repr(logs)
            status = await conn.request(subj.status_subject(node.id), b"", timeout=WAIT_S)
            assert URL_PASSWORD not in status.data.decode() and "***@127.0.0.1" in status.data.decode()
            assert SECRET_KEY not in status.data.decode()
        finally:
            await node.stop(drain_timeout=1)
            await backend.aclose()
            await conn.close()


@pytest.mark.slow
async def test_the_executor_process_never_prints_its_key_or_url_credentials(
    start_executor: StartExecutor, env: dict[str, str], tmp_path: Path
) -> None:
    async with OpenAIDouble(models=[MODEL], api_key="the-right-key", echo_key=True) as double:
        cfg = write_config(tmp_path / "executor.toml",
                           base_url=double.base_url.replace("http://", f"http://operator:{URL_PASSWORD}@"))  # fmt: skip
        cfg.write_text(cfg.read_text().replace("timeout_secs = 10\n", 'timeout_secs = 10\napi_key = "${KEY}"\n'
                                               f'models = ["{MODEL}"]\n'))  # fmt: skip
        env["KEY"] = SECRET_KEY  # the executor's environment (the start_executor fixture's env)
        executor = await start_executor("--config", str(cfg), "--log-level", "debug")
        try:
            url = await executor.started()
            out = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "hello", env=env)
            assert out.returncode == 1 and "backend_auth" in out.stderr
            assert SECRET_KEY not in out.stderr + out.stdout
            status = await run(EXECUTOR, "--nats", url, "status", "--json", env=env)
            assert status.returncode == 0, status.stderr
            assert URL_PASSWORD not in status.stdout and "***@" in status.stdout
            await until(lambda: any(e.get("event") == "job error" for e in executor.events), "the job's error log")
            logged = "\n".join(executor.lines)
            assert SECRET_KEY not in logged and URL_PASSWORD not in logged
        finally:
            await executor.close()


# -- rotating the backend's API key without a restart ---------------------------------


async def test_a_key_file_rotation_is_used_for_new_jobs_without_a_restart(
    nats_server: EmbeddedNats, http: aiohttp.ClientSession, tmp_path: Path, client: LloomClient,
    signing: Signing,
) -> None:
    key_file = tmp_path / "api_key"
    key_file.write_text("first-key-AAAA\n")
    async with OpenAIDouble(models=[MODEL], api_key="first-key-AAAA") as double:
        config = parse_config(f'[llm_client]\nbackend = "openai_compatible"\nbase_url = "{double.base_url}"\n'
                              f'api_key_file = "{key_file}"\n', source="test.toml", environ={})  # fmt: skip
        masker = SecretMasker(config_secrets(config))
        backend = create_backend(config.llm_client, http)
        rotation = KeyRotation(backend, config, masker, check_every_s=0.02)
        await rotation.start()
        conn = await nats.connect(nats_server.url)
        node = ExecutorNode(conn, backend, models=[MODEL], masker=masker, **signing())
        await node.start()
        try:
            assert (await client.complete(ask())).content
            double.api_key = "second-key-BBBB"  # the provider rotated it
            with pytest.raises(BackendAuthFailed):
                await client.complete(ask())
            key_file.write_text("second-key-BBBB\n")
            await until(lambda: rotation.rotations == 1, "the key file is read again")
            assert (await client.complete(ask())).content
            assert masker.mask("second-key-BBBB and first-key-AAAA") == "*** and ***"
        finally:
            await node.stop(drain_timeout=1)
            await rotation.stop()
            await backend.aclose()
            await conn.close()


@pytest.mark.slow
async def test_sighup_applies_a_new_api_key_without_a_restart(
    start_executor: StartExecutor, env: dict[str, str], tmp_path: Path
) -> None:
    async with OpenAIDouble(models=[MODEL], api_key="first-key-AAAA") as double:
        cfg = write_config(tmp_path / "executor.toml", base_url=double.base_url)
        original = cfg.read_text()
        cfg.write_text(original.replace("timeout_secs = 10\n", 'timeout_secs = 10\napi_key = "first-key-AAAA"\n'))
        executor = await start_executor("--config", str(cfg))
        url = await executor.started()
        pid = executor.proc.pid
        ok = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "hello", env=env)
        assert ok.returncode == 0, ok.stderr
        double.api_key = "second-key-BBBB"
        refused = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "hello", env=env)
        assert refused.returncode == 1 and "backend_auth" in refused.stderr
        cfg.write_text(original.replace("timeout_secs = 10\n", 'timeout_secs = 10\napi_key = "second-key-BBBB"\n'))
        os.kill(pid, signal.SIGHUP)
        reloaded = await executor.wait_for("SIGHUP: backend API keys reloaded")
        assert reloaded["rotations"] == 1
        again = await run(LLOOM, "--nats", url, "complete", "--model", MODEL, "hello", env=env)
        assert again.returncode == 0, again.stderr
        assert executor.proc.returncode is None and executor.proc.pid == pid  # the same process, no restart
        assert "second-key-BBBB" not in "\n".join(executor.lines)
        os.kill(pid, signal.SIGTERM)
        assert await executor.exit_code() == 0


def test_the_masker_hides_every_configured_secret_and_nothing_else() -> None:
    config = parse_config(
        '[llm_client]\nbackend = "openai_compatible"\nbase_url = "http://operator:pa%2455word@10.0.0.1:8000/v1"\n'
        'api_key = "${KEY}"\n[node]\nnats_url = "nats://s3cr3t-token@10.0.0.2:4222"\n',
        source="t.toml", environ={"KEY": SECRET_KEY},
    )  # fmt: skip
    masker = SecretMasker(config_secrets(config))
    text = f"key {SECRET_KEY}, url pa$55word and pa%2455word, token s3cr3t-token; operator and prompt_tokens stay"
    assert masker.mask(text) == "key ***, url *** and ***, token ***; operator and prompt_tokens stay"
    event = masker(None, "info", {"event": f"failed: {SECRET_KEY}", "nested": {"list": [SECRET_KEY, 3]}})
    assert SECRET_KEY not in repr(event) and event["nested"]["list"][1] == 3
    masker.add("abc", "not-needed")  # too short to mask safely, and LM Studio's placeholder: not secrets
    assert masker.mask("abc not-needed") == "abc not-needed"


def test_api_key_and_api_key_file_together_are_a_config_error() -> None:
    from executor.config import ConfigError

    with pytest.raises(ConfigError, match="both api_key and api_key_file"):
        parse_config('[llm_client]\napi_key = "k1234567"\napi_key_file = "/x"\n', source="t.toml", environ={})


async def test_a_queued_job_is_cancelled_by_its_submitter_only(
    js_server: EmbeddedNats, attacker: NATS, queue_node: RunningNode, double: OpenAIDouble
) -> None:
    double.fault = Fault.stall()
    async with await LloomClient.connect(js_server.url, timeout=WAIT_S) as client:
        job_id = await client.submit(ask(text="long queued work"))
        await until(lambda: double.in_flight == 1, "the queued job reaches the backend")
        await attacker.publish(subj.cancel_subject(job_id), b"")  # the bystander knows the id, not the token
        await attacker.publish(subj.cancel_subject(job_id), b"f" * 32)
        await until(lambda: queue_node.node.stats.cancels_refused == 2, "the bystander's cancels")
        assert await client.fetch(job_id) is None and double.in_flight == 1  # still running
        await client.cancel(job_id)
        with pytest.raises(Cancelled):
            await client.result(job_id, timeout=WAIT_S)


async def test_with_a_keyring_a_stored_result_signed_by_a_key_outside_it_is_refused(
    js_server: EmbeddedNats, attacker: NATS, double: OpenAIDouble
) -> None:
    # A self-signed result is a valid signature by a stranger's key: only a keyring can tell.
    from protocol.errors import BackendError
    from protocol.trust import Trust

    ours, stranger = Identity.generate(), Identity.generate()
    async with await LloomClient.connect(js_server.url, trust=Trust.of([ours.public_key])) as client:
        job_id = client.new_job_id()
        kv = await results_bucket(attacker.jetstream())
        forged = error_to_wire(BackendError("from a stranger"), job_id=job_id)
        await kv.put(job_id, seal_result(stranger, job_id, encoder.encode(forged)))
        with pytest.raises(ForgedResult, match="not in this client's keyring"):
            await client.fetch(job_id)
        await kv.put(job_id, seal_result(ours, job_id, encoder.encode(forged)))
        with pytest.raises(BackendError, match="from a stranger"):
            await client.fetch(job_id)  # signed by a key in the keyring: its error is the answer
