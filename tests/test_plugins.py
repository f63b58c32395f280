"""A backend from another package plugs in through the `lloom.backends` entry point, without editing ours."""

from __future__ import annotations

import textwrap
from pathlib import Path

import nats
import pytest

from executor.backends.base import Backend
from executor.backends.registry import available_backends, create_backend
from executor.config import ConfigError, LlmClientConfig
from executor.process.embedded_nats import EmbeddedNats
from executor.jobs.node import ExecutorNode
from protocol.client import LloomClient
from protocol.messages import ChatRequest, Message, Role

PLUGIN = '''
from protocol.messages import FinishReason, Usage
from executor.backends.base import Completion, Delta, Finish, ModelInfo


class ShoutBackend:
    """Answers with the last message in capitals: enough to prove the wiring."""

    name = "shout"

    def __init__(self, config):
        self.models = config.models or ["shout-1"]

    async def complete(self, request):
        text = request.messages[-1].content.upper()
        return Completion(model=request.model, content=text, finish_reason=FinishReason.STOP,
                          usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))

    async def stream(self, request):
        for word in request.messages[-1].content.upper().split():
            yield Delta(word)
        yield Finish(model=request.model, finish_reason=FinishReason.STOP,
                     usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))

    async def list_models(self):
        return [ModelInfo(id=m) for m in self.models]

    async def health_check(self):
        return True

    async def aclose(self):
        pass


def from_config(config, session):
    return ShoutBackend(config)


def not_a_backend(config, session):
    return object()
'''


@pytest.fixture
def plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shout_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "shout_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [lloom.backends]
            shout = shout_plugin:from_config
            broken = shout_plugin:not_a_backend
            missing = shout_plugin:no_such_factory
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))


async def test_plugin_backend_serves_jobs_end_to_end(
    plugin_installed: None, nats_server: EmbeddedNats, http, signing
) -> None:
    assert "shout" in available_backends()
    backend = create_backend(LlmClientConfig(backend="shout"), http)
    assert isinstance(backend, Backend)
    nc = await nats.connect(nats_server.url)
    async with ExecutorNode(nc, backend, **signing()), await LloomClient.connect(nats_server.url) as client:
        request = ChatRequest(model="shout-1", messages=[Message(Role.USER, "hello plugin")])
        assert (await client.complete(request)).content == "HELLO PLUGIN"
        async with client.stream(request) as stream:
            assert [c.delta async for c in stream] == ["HELLO", "PLUGIN"]
    await nc.close()


@pytest.mark.parametrize(("name", "says"), [("broken", "not a Backend"), ("missing", "failed to load")])
def test_broken_plugins_are_named_in_the_error(plugin_installed: None, http, name: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        create_backend(LlmClientConfig(backend=name), http)
    assert repr(name) in str(caught.value)
