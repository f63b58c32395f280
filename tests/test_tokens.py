"""Token counting: exact counts per tiktoken encoding, offline; the right encoding per model;
configured tokenizers; the estimate when nothing else is at hand, labelled as such; mismatches.

The tiktoken encoding files come from `lloom-executor setup-tokenizers` (`.ci/run` runs it).
Without them the tests that count with tiktoken skip, naming the command, except in CI
(`CI=true`), where they fail. No test here opens a network connection: `no_network` makes
any attempt an error.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import zipfile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from executor.config import TokensConfig
from executor.tokens import (
    MISMATCH_FLOOR,
    SHIPPED_ENCODINGS,
    Count,
    SetupError,
    TokenCounter,
    default_encodings_dir,
    encoding_file,
    estimate_usage,
    expected_files,
    installed,
    mismatch,
    setup_encodings,
)
from protocol.estimate import estimate_tokens
from protocol.messages import Message, Role

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting must never reach for the network: any attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def encodings() -> Path:
    directory = default_encodings_dir()
    absent = [e for e in SHIPPED_ENCODINGS if not installed(directory, e)]
    if absent:
        reason = f"tiktoken encodings {', '.join(absent)} are not in {directory}: run `lloom-executor setup-tokenizers`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI sets them up (.ci/run); a missing file there is a bug
        pytest.skip(reason)
    return directory


@pytest.fixture
def counter(encodings: Path) -> TokenCounter:
    return TokenCounter(TokensConfig(encodings_dir=str(encodings)))


# Counts cross-checked against OpenAI's cookbook ("How to count tokens with tiktoken":
# "tiktoken is great!" is 6 in cl100k; "antidisestablishmentarianism" 6 in cl100k, 5 in p50k;
# "お誕生日おめでとう" 9 in cl100k, 14 in p50k); the rest computed with tiktoken itself.
KNOWN_COUNTS = [
    ("gpt-4", "tiktoken:cl100k_base", "hello world", 2),
    ("gpt-4", "tiktoken:cl100k_base", "tiktoken is great!", 6),
    ("gpt-4", "tiktoken:cl100k_base", "antidisestablishmentarianism", 6),
    ("gpt-4", "tiktoken:cl100k_base", "お誕生日おめでとう", 9),
    ("gpt-4o", "tiktoken:o200k_base", "hello world", 2),
    ("gpt-4o", "tiktoken:o200k_base", "antidisestablishmentarianism", 6),
    ("gpt-4o", "tiktoken:o200k_base", "お誕生日おめでとう", 8),
    ("text-davinci-003", "tiktoken:p50k_base", "hello world", 2),
    ("text-davinci-003", "tiktoken:p50k_base", "antidisestablishmentarianism", 5),
    ("text-davinci-003", "tiktoken:p50k_base", "お誕生日おめでとう", 14),
    # A special token's text in a prompt is counted as text, never refused.
    ("gpt-4", "tiktoken:cl100k_base", "<|endoftext|>", 7),
]


@pytest.mark.parametrize(("model", "method", "text", "tokens"), KNOWN_COUNTS)
def test_known_strings_count_exactly_per_encoding(
    counter: TokenCounter, model: str, method: str, text: str, tokens: int
) -> None:
    assert counter.count_text(model, text) == Count(tokens, method)


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("gpt-4o", "tiktoken:o200k_base"),
        ("gpt-4o-2024-08-06", "tiktoken:o200k_base"),  # dated names by prefix
        ("gpt-4.1-mini", "tiktoken:o200k_base"),
        ("o1", "tiktoken:o200k_base"),
        ("o3-mini", "tiktoken:o200k_base"),
        ("GPT-4o", "tiktoken:o200k_base"),
        ("openai/gpt-4o", "tiktoken:o200k_base"),  # a provider prefix
        ("gpt-4o:latest", "tiktoken:o200k_base"),  # a tag
        ("gpt-4", "tiktoken:cl100k_base"),
        ("gpt-4-0613", "tiktoken:cl100k_base"),
        ("gpt-3.5-turbo", "tiktoken:cl100k_base"),
        ("gpt-35-turbo", "tiktoken:cl100k_base"),
        ("text-davinci-003", "tiktoken:p50k_base"),
        ("llama-3", "estimate"),
        ("qwen2.5:7b", "estimate"),
        ("gemma3-270m", "estimate"),
    ],
)
def test_each_model_is_counted_with_its_own_encoding(counter: TokenCounter, model: str, method: str) -> None:
    assert counter.method_for(model) == method


def test_chat_messages_add_openais_format_cost(counter: TokenCounter) -> None:
    messages = [Message(Role.SYSTEM, "You are a helpful assistant."), Message(Role.USER, "Hello!")]
    # 6 + 2 content tokens, 1 per role, 3 per message, 3 priming the reply: 19, what
    # OpenAI's API reference shows as `prompt_tokens` for exactly this conversation.
    assert counter.count_messages("gpt-4o", messages) == Count(19, "tiktoken:o200k_base")
    assert counter.count_messages("gpt-3.5-turbo", messages) == Count(19, "tiktoken:cl100k_base")


def test_a_missing_encoding_file_falls_back_to_the_estimate_at_once_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "bogus"))  # tiktoken's own cache: unused
    counter = TokenCounter(TokensConfig(encodings_dir=str(tmp_path / "empty")))
    started = time.monotonic()
    with capture_logs() as logs:
        first = counter.count_text("gpt-4o", "hello there, world")
        again = TokenCounter(TokensConfig(encodings_dir=str(tmp_path / "empty"))).count_text("gpt-4o", "hi")
    assert time.monotonic() - started < 2.0  # no download attempt, no DNS wait
    assert first == Count(estimate_tokens("hello there, world"), "estimate")
    assert again.method == "estimate" and counter.method_for("gpt-4o") == "estimate"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1  # once per process, not once per job
    assert warnings[0]["file"] == str(tmp_path / "empty" / "o200k_base.tiktoken")
    assert "lloom-executor setup-tokenizers" in warnings[0]["fix"]


def test_a_corrupt_encoding_file_is_refused_and_estimated(tmp_path: Path) -> None:
    (tmp_path / "cl100k_base.tiktoken").write_bytes(b"aGVsbG8= 0\n")
    with capture_logs() as logs:
        count = TokenCounter(TokensConfig(encodings_dir=str(tmp_path))).count_text("gpt-4", "hello")
    assert count.method == "estimate"
    assert "sha256" in logs[0]["error"]


def test_the_estimate_is_the_design_documents_heuristic() -> None:
    counter = TokenCounter(TokensConfig(encodings_dir="/nonexistent"))
    # 4 words * 1.3 -> 5, 18 characters / 4 -> 4; their average, rounded down: 4.
    assert counter.count_text("llama-3", "one two three four") == Count(4, "estimate")
    messages = [Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "What is the capital of France?")]
    counted = counter.count_messages("llama-3", messages)
    assert counted == Count(sum(estimate_tokens(m.content) for m in messages), "estimate")
    assert counted.tokens == estimate_usage([m.content for m in messages], "").prompt_tokens


def test_a_configured_tiktoken_encoding_wins_over_the_default_mapping(encodings: Path) -> None:
    config = TokensConfig(
        encodings_dir=str(encodings), tokenizers={"my-azure-*": "tiktoken:cl100k_base", "gpt-4o": "tiktoken:p50k_base"}
    )
    counter = TokenCounter(config)
    assert counter.method_for("my-azure-gpt4") == "tiktoken:cl100k_base"
    assert counter.method_for("gpt-4o") == "tiktoken:p50k_base"
    assert counter.method_for("gpt-4o-mini") == "tiktoken:o200k_base"


def test_a_hugging_face_tokenizer_file_counts_its_models(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="the `tokenizers` extra is not installed")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    counter = TokenCounter(TokensConfig(tokenizers={"llama-3*": str(tmp_path / "tokenizer.json")}))
    assert counter.count_text("Llama-3-8B-Instruct", "hello world hello there") == Count(4, "hf:tokenizer.json")
    messages = [Message(Role.SYSTEM, "hello"), Message(Role.USER, "world world")]
    # Contents only: the model's chat template is not known, so no per-message cost is added.
    assert counter.count_messages("llama-3", messages) == Count(3, "hf:tokenizer.json")
    assert counter.method_for("mistral-7b") == "estimate"


def test_a_sentencepiece_model_counts_its_models(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    corpus = ["hello world", "the quick brown fox jumps over the lazy dog", "hello there world"] * 50
    with (tmp_path / "gemma.model").open("wb") as out:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=out, vocab_size=14, model_type="word", minloglevel=2
        )
    counter = TokenCounter(TokensConfig(tokenizers={"gemma*": str(tmp_path / "gemma.model")}))
    assert counter.count_text("gemma3-270m", "hello world hello") == Count(3, "sentencepiece:gemma.model")


def test_an_unreadable_tokenizer_file_falls_back_to_the_estimate(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("not json")
    counter = TokenCounter(TokensConfig(tokenizers={"*": str(tmp_path / "tokenizer.json")}))
    with capture_logs():
        assert counter.count_text("anything", "one two three four") == Count(4, "estimate")


@pytest.mark.parametrize(
    ("reported", "counted", "tolerance", "expected"),
    [
        (100, 100, 0.1, False),
        (1000, 1090, 0.1, False),  # within 10%
        (1000, 1200, 0.1, True),
        (1200, 1000, 0.1, True),  # symmetric
        (10, 16, 0.1, False),  # 60% off, but only 6 tokens: under the floor
        (10, 10 + MISMATCH_FLOOR + 1, 0.1, True),
        (100, 105, 0.0, False),  # zero tolerance still has the floor
        (0, 50, 0.5, True),
    ],
)
def test_mismatch_is_relative_with_an_absolute_floor(
    reported: int, counted: int, tolerance: float, expected: bool
) -> None:
    assert mismatch(reported, counted, tolerance) is expected


def test_verification_sampling_is_deterministic_per_job() -> None:
    assert TokenCounter(TokensConfig(verify="always")).should_verify("job-1")
    assert not TokenCounter(TokensConfig(verify="never")).should_verify("job-1")
    sampled = TokenCounter(TokensConfig(verify=0.25))
    picks = [sampled.should_verify(f"job-{i}") for i in range(4000)]
    assert 0.2 < sum(picks) / len(picks) < 0.3
    assert picks == [sampled.should_verify(f"job-{i}") for i in range(4000)]


def _wheel_with(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"litellm/litellm_core_utils/tokenizers/{name}", data)
    return path


def test_setup_takes_the_encodings_from_a_wheel_and_checks_them(encodings: Path, tmp_path: Path) -> None:
    files = {}
    for encoding in SHIPPED_ENCODINGS:
        url, _ = expected_files(encoding)
        files[hashlib.sha1(url.encode()).hexdigest()] = encoding_file(encodings, encoding).read_bytes()
    wheel = _wheel_with(tmp_path / "litellm-0-py3-none-any.whl", files)
    said: list[str] = []
    installed_files = setup_encodings(tmp_path / "out", wheel=wheel, say=said.append)
    assert [p.name for p in installed_files] == [f"{e}.tiktoken" for e in SHIPPED_ENCODINGS]
    assert all(installed(tmp_path / "out", e) for e in SHIPPED_ENCODINGS)
    # Present and intact: kept, and the wheel is not even opened.
    said.clear()
    setup_encodings(tmp_path / "out", wheel=tmp_path / "no-such.whl", say=said.append)
    assert all("already installed" in line for line in said)
    counter = TokenCounter(TokensConfig(encodings_dir=str(tmp_path / "out")))
    assert counter.count_text("gpt-4o", "hello world") == Count(2, "tiktoken:o200k_base")


def test_setup_refuses_a_tampered_encoding(encodings: Path, tmp_path: Path) -> None:
    url, _ = expected_files("cl100k_base")
    tampered = encoding_file(encodings, "cl100k_base").read_bytes() + b"aGk= 999999\n"
    wheel = _wheel_with(tmp_path / "litellm.whl", {hashlib.sha1(url.encode()).hexdigest(): tampered})
    with pytest.raises(SetupError, match="cl100k_base does not match tiktoken's sha256"):
        setup_encodings(tmp_path / "out", wheel=wheel, say=lambda _: None)
    assert not encoding_file(tmp_path / "out", "cl100k_base").exists()


def test_ci_sets_up_the_encodings_before_running_the_readme_test_command() -> None:
    from tests.test_readme import readme_commands

    _, run_tests = readme_commands()
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert lines[-1] == run_tests
    assert any("lloom-executor setup-tokenizers" in line for line in lines[:-1])


def test_content_parts_tool_calls_and_tool_messages_are_counted_images_and_tools_estimated(
    counter: TokenCounter,
) -> None:
    import msgspec

    from protocol.chat_types import FunctionCall, ImagePart, ImageUrl, TextPart, Tool, ToolCall
    from protocol.estimate import IMAGE_TOKENS, tools_text
    from protocol.messages import ChatRequest

    plain = [Message(Role.SYSTEM, "You are a helpful assistant."), Message(Role.USER, "Hello!")]
    as_parts = [plain[0], Message(Role.USER, [TextPart(text="Hello!")])]
    assert counter.count_messages("gpt-4o", as_parts) == counter.count_messages("gpt-4o", plain)  # text parts: exact
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    turns = [*plain, Message(Role.ASSISTANT, tool_calls=[call]), Message(Role.TOOL, '{"celsius": 21}', tool_call_id="c")]
    with_calls = counter.count_messages("gpt-4o", turns)
    extra = counter.count_text("gpt-4o", 'get_weather\n{"city": "Paris"}').tokens + counter.count_text(
        "gpt-4o", '{"celsius": 21}').tokens  # fmt: skip
    assert with_calls.tokens == 19 + extra + 2 * 3 + 2  # each new message: its text, 3 format tokens, its role
    assert not with_calls.estimated
    image = Message(Role.USER, [TextPart(text="Hello!"), ImagePart(image_url=ImageUrl(url="https://x.invalid/a.png"))])
    seen = counter.count_messages("gpt-4o", [plain[0], image])
    assert seen.tokens == 19 + IMAGE_TOKENS and seen.estimated
    request = ChatRequest(model="gpt-4o", messages=plain, tools=[msgspec.convert(
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}, Tool)])  # fmt: skip
    tooled = counter.count_messages("gpt-4o", plain, tools=tools_text(request))
    assert tooled.tokens == 19 + counter.count_text("gpt-4o", tools_text(request)).tokens and tooled.estimated
