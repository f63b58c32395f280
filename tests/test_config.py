"""Config files in the design document's shape load, and every mistake names its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor.backends.openai_compat import OpenAICompatibleBackend, from_config
from executor.backends.registry import available_backends, create_backend
from executor.config import DEFAULT_CONFIG_TOML, ConfigError, LlmClientConfig, load_config, parse_config

SEED_LMSTUDIO = b"""
[llm_client]
backend = "lmstudio"
base_url = "http://localhost:1234/v1"
api_key = "not-needed"  # LMStudio doesn't require authentication
timeout_secs = 300      # Longer timeout for local inference

[logging]
level = "debug"
targets = ["lloom_executor::llm_client"]
"""

SEED_OPENAI = b"""
[llm_client]
backend = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"  # Set via environment variable
timeout_secs = 60
"""


def test_the_design_documents_examples_load() -> None:
    lm = parse_config(SEED_LMSTUDIO, source="seed.toml", environ={})
    assert (lm.llm_client.backend, lm.llm_client.timeout_secs, lm.logging.level) == ("lmstudio", 300, "debug")
    oa = parse_config(SEED_OPENAI, source="seed.toml", environ={"OPENAI_API_KEY": "sk-test"})
    assert oa.llm_client.api_key == "sk-test"


def test_the_written_default_config_is_valid_and_equals_the_defaults() -> None:
    from executor.config import ExecutorConfig

    assert parse_config(DEFAULT_CONFIG_TOML, source="default.toml", environ={}) == ExecutorConfig()


@pytest.mark.parametrize("policy", ["data_only", "public_only", "any"])
def test_image_urls_is_typed_and_takes_data_urls_only_by_default(policy: str) -> None:
    assert LlmClientConfig().image_urls == "data_only"  # the written default (init's template) equals it: above
    cfg = parse_config(f'[llm_client]\nimage_urls = "{policy}"\n', source="x.toml", environ={})
    assert cfg.llm_client.image_urls == policy


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        (b"[node]\nmax_concurrent_jobs = 'many'\n", "`$.node.max_concurrent_jobs`"),
        (b"[node]\nmax_concurrent_jobs = 0\n", "`$.node.max_concurrent_jobs`"),
        (b"[llm_client]\ntimout_secs = 5\n", "unknown field `timout_secs`"),
        (b"[nodes]\n", "unknown field `nodes`"),
        (b"[llm_client\n", "not valid TOML"),
        (b"[llm_client]\napi_key = '${MISSING_KEY}'\n", "${MISSING_KEY}"),
        (b"[llm_client]\nimage_urls = 'public'\n", "`$.llm_client.image_urls`"),
    ],
)
def test_mistakes_name_the_file_and_the_key(toml: bytes, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(toml, source="/etc/lloom/executor.toml", environ={})
    assert str(caught.value).startswith("/etc/lloom/executor.toml: ")
    assert says in str(caught.value)


def test_env_expansion_supports_defaults() -> None:
    cfg = parse_config(b"[llm_client]\nbase_url = '${LLM_URL:-http://h:1/v1}'\n", source="x", environ={})
    assert cfg.llm_client.base_url == "http://h:1/v1"


def test_missing_default_file_means_defaults_but_a_named_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("LLOOM_CONFIG", raising=False)
    cfg, source = load_config()
    assert source is None and cfg.llm_client.backend == "auto"
    with pytest.raises(ConfigError, match="nope.toml: cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_presets_fill_in_the_base_url(http) -> None:
    backend = from_config(LlmClientConfig(backend="ollama"), http)
    assert isinstance(backend, OpenAICompatibleBackend)
    assert backend.base_url == "http://localhost:11434/v1"
    assert from_config(LlmClientConfig(backend="lmstudio"), http).base_url == "http://localhost:1234/v1"


def test_openai_without_a_key_and_compatible_without_a_url_are_config_errors(http) -> None:
    with pytest.raises(ConfigError, match="needs api_key"):
        from_config(LlmClientConfig(backend="openai"), http)
    with pytest.raises(ConfigError, match="needs base_url"):
        from_config(LlmClientConfig(backend="openai_compatible"), http)


def test_unknown_backend_lists_the_choices(http) -> None:
    with pytest.raises(ConfigError) as caught:
        create_backend(LlmClientConfig(backend="gpt-magic"), http)
    for name in ("auto", "lmstudio", "openai", "ollama", "vllm", "llamacpp"):
        assert name in str(caught.value)
    assert "lloom.backends" in str(caught.value)
    assert "gpt-magic" not in available_backends()
