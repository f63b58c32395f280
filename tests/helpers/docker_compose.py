"""compose/docker-compose.yml driven from a test: build, up on free loopback ports, kill and start a
service, down with its volumes.

Owns the choice of compose command and every container and volume one `ComposeProject` starts (one
project name per test, so nothing collides with a user's deployment or another test). It uses the
compose CLI itself, not testcontainers' `DockerCompose`: that shells out to `docker compose` (the
v2 plugin) and parses `docker compose ps --format json`, and Debian bookworm ships neither the
plugin nor a v2 `docker-compose` (only compose 1.29, `docker-compose`), while no registry but
Debian's and PyPI's is reachable on the machines this runs on. Both CLIs take the same file and
the same commands used here (build, up -d, kill -s SIGKILL, start, ps -q, down -v).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from compose.make_env import generate
from executor.process.embedded_nats import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
LOCAL_BASE_IMAGE = "lloom-python-base:3.11"  # scripts/docker_base_image.sh
INSTALL_HINT = (
    "Docker is not available: apt-get install -y docker.io docker-compose debootstrap, start `dockerd &`,"
    " then `bash scripts/docker_base_image.sh` (the Docker tier runs in CI, where .ci/run does all this)"
)
COMMAND_TIMEOUT_S = 600.0  # a cold build; a hang becomes an error


def _ok(*argv: str) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_command() -> list[str] | None:
    """`docker compose` (v2) if there, else `docker-compose` (v1, Debian's), else None."""
    if _ok("docker", "compose", "version"):
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _ok("docker-compose", "version"):
        return ["docker-compose"]
    return None


def docker_unavailable() -> str | None:
    """Why the Docker tier cannot run here (None: it can)."""
    if not shutil.which("docker") or not _ok("docker", "info"):
        return INSTALL_HINT
    if compose_command() is None:
        return "no compose CLI: apt-get install -y docker-compose (or Docker's compose v2 plugin)"
    return None


class ComposeProject:
    """One deployment of the compose file: `up()`, then `kill(service)`/`start(service)`, `down()`."""

    def __init__(self, workdir: Path) -> None:
        command = compose_command()
        assert command is not None, "docker_unavailable() first"
        self.name = f"lloomtest{secrets.token_hex(4)}"
        self.base = [*command, "-f", str(COMPOSE_FILE), "-p", self.name]
        self.ports = {name: free_port() for name in (
            "LLOOM_NATS_1_PORT", "LLOOM_NATS_2_PORT", "LLOOM_NATS_3_PORT",
            "LLOOM_NATS_1_CLUSTER_PORT", "LLOOM_NATS_2_CLUSTER_PORT", "LLOOM_NATS_3_CLUSTER_PORT",
            "LLOOM_NATS_1_MONITOR_PORT", "LLOOM_NATS_2_MONITOR_PORT", "LLOOM_NATS_3_MONITOR_PORT",
            "LLOOM_DOUBLE_PORT", "LLOOM_GATEWAY_PORT",
        )}  # fmt: skip
        # Throw-away credentials, as compose/make_env.py makes them, given to compose by environment.
        self.credentials = generate(workdir / "secrets")
        self.env = {**os.environ, **{k: str(v) for k, v in self.ports.items()}, **self.credentials}
        self.env["LLOOM_BACKEND_URL"] = f"http://127.0.0.1:{self.ports['LLOOM_DOUBLE_PORT']}/v1"
        if "BASE_IMAGE" not in os.environ and _ok("docker", "image", "inspect", LOCAL_BASE_IMAGE):
            self.env["BASE_IMAGE"] = LOCAL_BASE_IMAGE  # no registry here: the debootstrapped base
        self.log = workdir / "compose.log"

    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{self.ports[f'LLOOM_NATS_{i}_PORT']}" for i in (1, 2, 3)]

    def monitor_port(self, node: int) -> int:
        return self.ports[f"LLOOM_NATS_{node}_MONITOR_PORT"]

    def run(self, *args: str) -> str:
        """A compose command; its output is kept in compose.log, and a failure says the command and its tail."""
        proc = subprocess.run([*self.base, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)  # fmt: skip
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc.stdout

    def up(self) -> None:
        self.run("build")
        self.run("up", "-d")

    def kill(self, service: str) -> None:
        """SIGKILL the service's container (`docker kill`): it stays down until `start` (a manual stop)."""
        self.run("kill", "-s", "SIGKILL", service)

    def start(self, service: str) -> None:
        self.run("start", service)

    def logs(self) -> str:
        try:
            return self.run("logs", "--no-color", "--tail", "30")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return str(e)

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans")
