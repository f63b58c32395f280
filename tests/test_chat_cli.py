"""`lloom complete` with the chat API options: tools, JSON schema output, images, sampling options,
reasoning; and clear messages with a non-zero exit for what cannot be used. The real `lloom` console
script against a real nats-server, an in-process node and the strict OpenAI double."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from executor.jobs.node import ExecutorNode
from executor.process.embedded_nats import EmbeddedNats
from tests.doubles.openai_double import OpenAIDouble
from tests.doubles.openai_script import Answer, ScriptedCall
from tests.helpers.jobs import MODEL
from tests.helpers.processes import LLOOM, run

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(32)


@pytest.fixture
def node(capable_node: ExecutorNode) -> ExecutorNode:
    return capable_node


async def lloom(server: EmbeddedNats, env: dict[str, str], *args: str):  # type: ignore[no-untyped-def]
    return await run(LLOOM, "complete", "--nats", server.url, "--model", MODEL, *args, env=env)


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["unary", "stream"])
async def test_tools_file_sends_the_tools_and_prints_the_calls_as_json(
    node: ExecutorNode, nats_server: EmbeddedNats, double: OpenAIDouble, env: dict[str, str], tmp_path: Path,
    stream: list[str],
) -> None:
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    double.answers = [Answer(tool_calls=(ScriptedCall("call_1", "get_weather", '{"city": "Oslo"}'),))]
    out = await lloom(nats_server, env, "--tools", str(tmp_path / "tools.json"), "--tool-choice", "get_weather",
                      *stream, "weather in Oslo?")  # fmt: skip
    assert out.returncode == 0, out.stderr
    [body] = double.requests
    assert body["tools"] == [WEATHER]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert json.loads(out.stdout.strip()) == [
        {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert "tool_calls" in out.stderr  # the summary line names the finish reason


@pytest.mark.parametrize("capable_node", ["any"], indirect=True)  # http(s) image URLs passed on
async def test_json_schema_image_seed_and_penalties_reach_the_backend(
    node: ExecutorNode, nats_server: EmbeddedNats, double: OpenAIDouble, env: dict[str, str], tmp_path: Path
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    (tmp_path / "city.json").write_text(json.dumps(schema))
    (tmp_path / "photo.png").write_bytes(PNG_BYTES)
    double.answers = [Answer(content='{"city": "Paris"}')]
    out = await lloom(nats_server, env, "--json-schema", str(tmp_path / "city.json"), "--image",
                      str(tmp_path / "photo.png"), "--image", "https://images.invalid/b.jpg", "--seed", "7",
                      "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "where?")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"city": "Paris"}
    [body] = double.requests
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                                              "strict": True}}  # fmt: skip
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "where?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()}},
        {"type": "image_url", "image_url": {"url": "https://images.invalid/b.jpg"}},
    ]  # fmt: skip
    assert (body["seed"], body["presence_penalty"], body["frequency_penalty"]) == (7, 0.5, 0.25)


async def test_show_reasoning_prints_the_reasoning_apart_from_the_answer(
    node: ExecutorNode, nats_server: EmbeddedNats, double: OpenAIDouble, env: dict[str, str]
) -> None:
    double.answers = [Answer(content="Paris", reasoning="France's capital")]
    out = await lloom(nats_server, env, "--show-reasoning", "capital of France?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Paris"
    assert "France's capital" in out.stderr and "France's capital" not in out.stdout
    assert "2 of them reasoning" in out.stderr  # the summary line counts them


async def test_bad_chat_input_gets_a_message_and_a_non_zero_exit(
    node: ExecutorNode, nats_server: EmbeddedNats, double: OpenAIDouble, env: dict[str, str], tmp_path: Path
) -> None:
    not_object = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    (tmp_path / "bad.json").write_text(json.dumps(not_object))
    (tmp_path / "huge.png").write_bytes(PNG_BYTES + bytes(900_000))  # ~1.2 MB as base64: over max_payload
    cases = [
        (["--tools", str(tmp_path / "bad.json")], 2, "tools[0].function.parameters"),
        (["--tools", str(tmp_path / "missing.json")], 2, "cannot be read"),
        (["--image", str(tmp_path / "bad.json")], 2, "not a PNG, JPEG, GIF or WebP"),
        (["--image", str(tmp_path / "huge.png")], 1, "payload_too_large"),
    ]
    for args, code, says in cases:
        out = await lloom(nats_server, env, *args, "hi")
        assert out.returncode == code, (args, out.stderr)
        assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "http(s) URL" in out.stderr  # the oversize image: what to do instead
    assert double.requests == []


@pytest.mark.parametrize("capable_node", ["any"], indirect=True)  # http(s) image URLs passed on
async def test_readme_tools_json_and_images_example_runs_as_written(
    node: ExecutorNode, nats_server: EmbeddedNats, double: OpenAIDouble
) -> None:
    import asyncio
    import re
    import sys

    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```python\n(.+?)\n```", (root / "README.md").read_text(), flags=re.S)
    [example] = [b for b in blocks if "get_weather" in b]
    call = ScriptedCall("call_1", "get_weather", '{"city": "Paris"}')
    double.answers = [Answer(tool_calls=(call,)), Answer(content="21 degrees in Paris."),
                      Answer(tool_calls=(call,), interleave=True), Answer(content='{"city": "Paris"}'),
                      Answer(content="A cat.")]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", example.replace("nats://127.0.0.1:4222", nats_server.url), cwd=root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert [line.strip() for line in out.decode().splitlines()] == [
        'get_weather {"city": "Paris"}', "21 degrees in Paris.", "['get_weather']", '{"city": "Paris"}', "A cat."]
    assert double.requests[1]["messages"][1]["tool_calls"][0]["id"] == "call_1"  # the history, as the example built it
    assert double.requests[4]["messages"][0]["content"][1]["image_url"]["url"] == "https://example.com/cat.png"
