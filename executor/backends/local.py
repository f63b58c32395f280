"""`backend = "local"`: a llama.cpp `llama-server` child process serving one GGUF model.

`LocalModelServer` owns one child: it starts `llama-server` on a free port of
127.0.0.1, waits until its `/health` answers 200 (the model is loaded), drains
its log into a short tail for error messages, and stops it. The child is tied
to the node with PR_SET_PDEATHSIG, so it dies even when the node is SIGKILLed.

`LocalBackend` is the `Backend`: it starts the server on first use, delegates
every HTTP call to an `OpenAICompatibleBackend` pointed at the child, and
supervises it. When the child dies the backend raises `BackendUnavailable`
(and lists no models) until a restart, tried with exponential backoff, has the
model loaded again. The model is a `model_path` GGUF, else one of `local_models.py`
(`local_model`, by default SmolLM2-135M-Instruct); it is served as the config's
`model_name`, else the local model's name, else the GGUF file's stem. Its context
length is the one the running server reports (`/props`), not a guess, and so
are its capabilities (tools, vision, json_schema, reasoning: `model_caps.from_llama_props`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import structlog

from executor.backends import llama_build, local_models
from executor.backends.base import Completion, ModelInfo, StreamEvent
from executor.backends.model_caps import from_llama_props
from executor.backends.openai_compat import OpenAICompatibleBackend
from executor.backends.presets import PRESETS
from executor.process.child import ChildProcess
from executor.config import ConfigError, LlmClientConfig
from executor.process.embedded_nats import free_port
from protocol.backoff import Backoff, Retry
from protocol.errors import BackendUnavailable
from protocol.messages import ChatRequest

log = structlog.get_logger(logger_name=__name__)

READY_TIMEOUT_S = 120.0  # loading a model from a cold disk can take a while
HEALTH_POLL_S = 0.05
STOP_GRACE_S = 5.0
RESTART_BACKOFF = Backoff(initial_s=0.5, max_s=30.0)
STABLE_AFTER_S = 60.0  # a server up this long resets the backoff
# llama-server's default for requests without max_tokens is "until the context is
# full" (minutes of text on a CPU); requests that name one get theirs.
DEFAULT_MAX_TOKENS = 512


class LocalServerError(RuntimeError):
    pass


class LocalModelServer:
    """One `llama-server` child process: `await start()`, `base_url`, `await wait()`, `await stop()`."""

    def __init__(self, binary: Path, args: list[str], *, session: aiohttp.ClientSession) -> None:
        self.binary = binary
        self.args = args
        self.host = "127.0.0.1"
        self.port = 0
        self._session = session
        self._child: ChildProcess | None = None
        self.log_tail: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    async def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.port = free_port(self.host)
        argv = [str(self.binary), "--host", self.host, "--port", str(self.port), *self.args]
        # Dies with the node (SIGKILL), even if the node is SIGKILLed; its own session: a
        # Ctrl-C reaches only the node, which stops the server after draining.
        self._child = await ChildProcess.spawn(
            argv, name="llama-server", death_signal=signal.SIGKILL, log_tail=self.log_tail
        )
        try:
            async with asyncio.timeout(timeout):
                await self._wait_healthy()
        except (TimeoutError, LocalServerError) as e:
            await self.stop()
            tail = "\n".join(self.log_tail[-15:])
            what = f"not ready within {timeout:g}s" if isinstance(e, TimeoutError) else str(e)
            raise LocalServerError(f"llama-server on port {self.port}: {what}\n{tail}") from e
        except BaseException:  # cancelled while loading: leave no child behind
            await self.stop()
            raise

    async def _wait_healthy(self) -> None:
        assert self._child is not None
        while True:
            if self._child.returncode is not None:
                raise LocalServerError(f"exited with code {self._child.returncode} while loading the model")
            try:
                async with self._session.get(f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet, or still loading (503)
            await asyncio.sleep(HEALTH_POLL_S)

    async def props(self) -> dict[str, object]:
        """The server's `/props` (context, chat template caps, modalities); {} if it does not answer."""
        try:
            async with self._session.get(f"{self.base_url}/props", timeout=aiohttp.ClientTimeout(total=5)) as r:
                props = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {}
        return props if isinstance(props, dict) else {}

    async def wait(self) -> int:
        assert self._child is not None
        return await self._child.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; idempotent."""
        if self._child is not None:
            await self._child.stop(STOP_GRACE_S)


class LocalBackend:
    """A `Backend` that runs and supervises its own `llama-server`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: LlmClientConfig,
        *,
        binary: Path,
        model: Path | local_models.BundledModel,
    ) -> None:
        self._session = session
        self._config = config
        self._binary = binary
        # A GGUF path, or a local model whose file is found (or joined) in the cache on each start.
        self._model = model
        default_name = model.stem if isinstance(model, Path) else model.name
        self.model_name = config.model_name or default_name
        self._server: LocalModelServer | None = None
        self._inner: OpenAICompatibleBackend | None = None
        self._context_length: int | None = None
        self._capabilities: frozenset[str] | None = None  # from the running server's /props
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self.restarts = 0
        self._down_reason: str | None = None

    @property
    def name(self) -> str:
        where = f" at {self._server.base_url}" if self._server and self._inner else ""
        return f"local llama-server ({self.model_name}){where}"

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server else None

    def _server_args(self, model: Path) -> list[str]:
        cfg = self._config
        args = ["--model", str(model), "--alias", self.model_name, "--no-webui"]
        bundled = self._model if isinstance(self._model, local_models.BundledModel) else None
        template = cfg.chat_template or (bundled.chat_template if bundled else None)
        if template:
            # A named built-in template; with Jinja on, the name itself would become the prompt.
            args += ["--no-jinja", "--chat-template", template]
        else:
            # The GGUF's own template (SmolLM2's ChatML with its default system prompt), run as written:
            # Jinja is what renders tools and reports the template's caps in /props (said explicitly,
            # for builds where it is not the default).
            args += ["--jinja"]
        args += ["--ctx-size", str(cfg.context_length or 0)]  # 0: the model's own (GGUF metadata)
        args += ["--n-predict", str(DEFAULT_MAX_TOKENS)]
        # Default: leave one core to the node and NATS. llama.cpp's threads wait for
        # each other at every step, so one busy core slows all of them (docs/local-model.md).
        args += ["--threads", str(cfg.threads or max(1, (os.cpu_count() or 1) - 1))]
        return args

    async def start(self) -> None:
        """Start the model server and its supervisor (idempotent); raises BackendUnavailable on failure."""
        async with self._lock:
            if self._inner is not None or self._supervisor is not None or self._closed:
                return
            await self._launch()
            self._supervisor = asyncio.create_task(self._supervise(), name="llama-server-supervisor")

    async def _launch(self) -> None:
        began = time.monotonic()
        model = self._model
        if isinstance(model, local_models.BundledModel):
            if not local_models.is_prepared(model):
                log.info("preparing the local model (joined into the cache once)", model=self.model_name)
            try:
                model = await asyncio.to_thread(local_models.ready_path, model)
            except llama_build.LocalSetupError as e:
                raise BackendUnavailable(str(e)) from e
        # Ours from the moment it exists, so aclose() stops it even mid-start.
        self._server = server = LocalModelServer(self._binary, self._server_args(model), session=self._session)
        log.info("starting local model server", model=self.model_name, file=str(model), binary=str(self._binary))
        try:
            await server.start()
        except (LocalServerError, OSError) as e:
            raise BackendUnavailable(f"the local model server did not start: {e}") from e
        props = await server.props()
        self._context_length = _n_ctx(props)
        self._capabilities = from_llama_props(props)
        self._inner = OpenAICompatibleBackend(
            self._session,
            base_url=f"{server.base_url}/v1",
            timeout_secs=self._config.timeout_secs,
            preset=PRESETS["llamacpp"],
            max_connections=self._config.max_connections,
        )
        self._down_reason = None
        log.info(
            "local model server ready", model=self.model_name, url=server.base_url, pid=server.pid,
            context_length=self._context_length, capabilities=sorted(self._capabilities or ()),
            seconds=round(time.monotonic() - began, 2),
        )  # fmt: skip

    async def _supervise(self) -> None:
        """Restart the server whenever it exits, with exponential backoff."""
        retry = Retry(RESTART_BACKOFF)
        while not self._closed:
            server = self._server
            assert server is not None
            up_since = time.monotonic()
            code = await server.wait()
            await self._drop_inner()
            if time.monotonic() - up_since >= STABLE_AFTER_S:
                retry.reset()
            while not self._closed:
                delay = retry.next_delay()
                self._down_reason = (
                    f"the local model server exited with code {code} and is restarting"
                    f" (next attempt in {delay:g}s); retry shortly"
                )
                log.warning("local model server exited; restarting", code=code, retry_in_s=delay,
                            log_tail=server.log_tail[-5:])  # fmt: skip
                await asyncio.sleep(delay)
                try:
                    await self._launch()
                except BackendUnavailable as e:
                    log.warning("local model server restart failed", error=e.message)
                    continue
                self.restarts += 1
                break

    async def _drop_inner(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.aclose()
        if self._server is not None:
            await self._server.stop()

    async def _ready(self) -> OpenAICompatibleBackend:
        if self._inner is None and self._supervisor is None:
            await self.start()
        if self._inner is None:
            raise BackendUnavailable(self._down_reason or "the local model server is not running")
        return self._inner

    def _not_answering(self, e: BackendUnavailable) -> BackendUnavailable:
        # Our own child refusing connections has died (the supervisor is about to notice):
        # say so, rather than the generic "start llama.cpp's server" hint.
        detail = str(e.__cause__ or e.message)
        return BackendUnavailable(
            f"the local model server stopped answering ({detail}); it is restarted automatically, retry shortly"
        )

    async def complete(self, request: ChatRequest) -> Completion:
        inner = await self._ready()
        try:
            return await inner.complete(request)
        except BackendUnavailable as e:
            raise self._not_answering(e) from e

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        inner = await self._ready()
        try:
            async for event in inner.stream(request):
                yield event
        except BackendUnavailable as e:  # raised only before the first event; later it is StreamInterrupted
            raise self._not_answering(e) from e

    async def list_models(self) -> list[ModelInfo]:
        await self._ready()
        return [ModelInfo(id=self.model_name, context_length=self._context_length, capabilities=self._capabilities)]

    async def health_check(self) -> bool:
        return self._inner is not None and await self._inner.health_check()

    async def aclose(self) -> None:
        """Stop the supervisor and the model server; idempotent."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._drop_inner()


def _n_ctx(props: dict[str, object]) -> int | None:
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None


def local_available(config: LlmClientConfig) -> bool:
    """Whether `backend = "local"` could start now: a built binary and a model."""
    try:
        check_local(config)
    except ConfigError:
        return False
    return True


def check_local(config: LlmClientConfig) -> tuple[Path, Path | local_models.BundledModel]:
    """The binary and the model (a GGUF path or a local model); ConfigError saying what to run if missing.

    No fallback from one local model to the other: the default is SmolLM2 and, when it is
    not set up, the message says to run `setup-local` (or to choose Gemma), so the name a
    node serves never depends on what happens to be installed."""
    try:
        binary = llama_build.find_llama_server(config.llama_server)
    except llama_build.LocalSetupError as e:
        raise ConfigError(str(e)) from e
    if config.model_path:
        path = Path(config.model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"[llm_client] model_path = {config.model_path!r} is not a file")
        return binary, path
    model = local_models.BUNDLED[config.local_model] if config.local_model else local_models.DEFAULT
    if not local_models.is_available(model):
        raise ConfigError(local_models.missing_message(model))
    return binary, model


def from_config(config: LlmClientConfig, session: aiohttp.ClientSession) -> LocalBackend:
    binary, model = check_local(config)
    return LocalBackend(session, config, binary=binary, model=model)
