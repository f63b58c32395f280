"""Log lines of a job carry its context, and redaction masks secrets but not token counts."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from executor.process.logs import redact_secrets
from protocol.client import LloomClient
from protocol.errors import BackendError
from protocol.messages import ChatRequest, Message, Role
from tests.conftest import MODEL, NodeFactory
from tests.doubles.openai_double import Fault, OpenAIDouble


def test_redaction_masks_secret_keys_and_bearer_tokens_but_not_token_counts() -> None:
    event = redact_secrets(None, "info", {
        "prompt_tokens": 12, "completion_tokens": 3, "max_tokens": 64, "api_key": "sk-live-123456789",
        "nats_token": "s3cr3t", "Authorization": "Bearer abc", "password": "pw",
        "error": "upstream said: Bearer abc.def-ghi and sk-abcdefghijkl",
    })  # fmt: skip
    assert (event["prompt_tokens"], event["completion_tokens"], event["max_tokens"]) == (12, 3, 64)
    assert event["api_key"] == event["nats_token"] == event["Authorization"] == event["password"] == "***"
    assert "abc.def" not in event["error"] and "abcdefghijkl" not in event["error"]


async def test_every_line_logged_while_a_job_runs_names_the_job_model_backend_and_executor(
    make_node: NodeFactory, client: LloomClient, double: OpenAIDouble
) -> None:
    node = await make_node()
    double.faults.append(Fault.status(500, "boom"))
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        with pytest.raises(BackendError) as failed:
            await client.complete(ChatRequest(model=MODEL, messages=[Message(Role.USER, "hi")]))
    [line] = [e for e in logs if e["event"] == "job error"]
    assert line["job_id"] == failed.value.job_id and line["model"] == MODEL
    assert line["executor_id"] == node.id and line["backend"] == node.backend_kind
    # The context belongs to the job's task: nothing leaks into lines logged outside it.
    assert "job_id" not in structlog.contextvars.get_contextvars()
