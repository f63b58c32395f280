"""The benchmark's own venv (LiteLLM, matplotlib, py-spy), the LiteLLM proxy, and facts about the machine.

The bench venv keeps LiteLLM's large dependency tree out of the project's venv.
It is created on first use and reused after; `--no-litellm` never creates it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

SCRIPTS = Path(__file__).resolve().parent.parent
BENCH_VENV = SCRIPTS / ".bench-venv"
BENCH_PY = BENCH_VENV / "bin" / "python"
# LiteLLM refuses to start without one; the benchmark's client sends it.
MASTER_KEY = "sk-bench-master-key"
PACKAGES = ["litellm[proxy]", "matplotlib", "py-spy"]

# LiteLLM must not reach the internet at run time: cost map from the package, no telemetry.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "HF_HUB_OFFLINE": "1",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
}


def ensure_bench_venv(log) -> str | None:  # type: ignore[no-untyped-def]
    """Create the venv and install PACKAGES unless already there; None on success, else why not."""
    if BENCH_PY.exists() and (BENCH_VENV / "bin" / "litellm").exists():
        return None
    log(f"creating the benchmark venv {BENCH_VENV} (first run only): pip install {' '.join(PACKAGES)}")
    try:
        if not BENCH_PY.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        proc = subprocess.Popen(
            [str(BENCH_PY), "-m", "pip", "install", "--progress-bar", "off", *PACKAGES],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
                log("  pip: " + line.rstrip()[:120])
        if proc.wait() != 0:
            return f"pip install failed with exit code {proc.returncode}"
    except (OSError, subprocess.CalledProcessError) as e:
        return f"could not create the bench venv: {e}"
    return None


def bench_tool(name: str) -> str | None:
    path = BENCH_VENV / "bin" / name
    return str(path) if path.exists() else None


def package_version(python: str, dist: str) -> str:
    try:
        out = subprocess.run(
            [python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return out.stdout.strip() or "not installed"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


def litellm_config(path: Path, backend_url: str) -> None:
    path.write_text(
        "model_list:\n"
        "  - model_name: bench-model\n"
        "    litellm_params:\n"
        "      model: openai/bench-model\n"
        f"      api_base: {backend_url}\n"
        "      api_key: sk-bench-dummy\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
    )


async def wait_http_ready(url: str, deadline_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll `url` until it answers 200, the process dies, or the deadline passes."""
    end = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} before it was ready")
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"not ready within {deadline_s:.0f}s ({url})")


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        mem_s = f"{int(mem) / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        mem_s = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem_s,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
