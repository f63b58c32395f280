"""The executor's TOML configuration: its shape, its defaults and how it is loaded.

The shape follows the design document (`[llm_client]` for the backend,
`[logging]`), plus `[node]` for the daemon itself. Everything is decoded once
into frozen msgspec Structs that reject unknown keys, so a typo is an error that
names the file and the key (`executor.toml: Expected int >= 1 - at
$.node.max_concurrent_jobs`) instead of a silently ignored setting.

`${VAR}` and `${VAR:-default}` in `api_key`, `api_key_file`, `base_url`, `model_path`,
`llama_server` and every `[nats]` value are expanded from the environment at
load time, so secrets stay out of the file. `[nats]` is how to reach a secured
bus (protocol/connection.py `NatsConnectOptions`; docs/security.md).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from protocol.announcements import ModelCategory
from protocol.backoff import Backoff
from protocol.connection import NatsConnectOptions


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


# Which image URLs the executor passes on to its backend (executor/jobs/image_urls.py; docs/security.md).
ImageUrlPolicy = Literal["data_only", "public_only", "any"]


class LlmClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # A preset (lmstudio, openai, ollama, vllm, llamacpp, openai_compatible),
    # "local" (a llama-server child process with a GGUF model), "auto" to probe
    # local servers and fall back to "local", or a plugin under `lloom.backends`.
    backend: str = "auto"
    base_url: str | None = None
    api_key: str | None = None
    # A file holding the API key (instead of api_key): re-read when it changes, and on SIGHUP,
    # so the key can be rotated without a restart (see docs/security.md).
    api_key_file: str | None = None
    timeout_secs: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    # Serve exactly these models; when absent, serve what the backend lists.
    models: list[str] | None = None
    # Connections kept open to the backend (one pool per process).
    max_connections: Annotated[int, Meta(ge=1, le=10_000)] = 100
    # How HTTP reaches the backend (executor/backends/transport/): "http1", the lean
    # keep-alive HTTP/1.1 pool (least CPU per request); "aiohttp", which can go through
    # an HTTP proxy and accepts gzip; "auto" takes http1 unless HTTP_PROXY/HTTPS_PROXY/
    # ALL_PROXY (any case) applies to base_url and NO_PROXY does not exclude it.
    transport: Literal["auto", "http1", "aiohttp"] = "auto"
    # Image URLs the backend may be asked to fetch (it fetches them from its own host: SSRF).
    # "data_only" refuses every http(s) image URL (inline data: images only); "public_only"
    # refuses those naming a loopback, private, link-local or reserved IP or an internal name
    # (names are not resolved); "any" passes all. For every backend of the executor.
    image_urls: ImageUrlPolicy = "data_only"
    # -- backend = "local" (see executor/backends/local.py and local_models.py) --
    # Which prepared model to serve when model_path is absent: SmolLM2-135M-Instruct
    # (set up by `lloom-executor setup-local`), or Gemma 3 270M of the `local` extra.
    local_model: Literal["smollm2-135m-instruct", "gemma3-270m"] | None = None
    # Any other GGUF file to serve instead (not together with local_model).
    model_path: str | None = None
    # The name the model is served under (default: the local model's name, or the GGUF file's stem).
    model_name: str | None = None
    # A llama.cpp built-in chat template name (e.g. "gemma", "chatml"); when absent,
    # the template in the GGUF's metadata ("gemma" for Gemma 3 270M, which has none).
    chat_template: str | None = None
    # Context length in tokens; when absent, the model's own (from its GGUF metadata).
    context_length: Annotated[int, Meta(ge=256, le=10_000_000)] | None = None
    # CPU threads for generation; when absent, one less than the CPU count (at least 1).
    threads: Annotated[int, Meta(ge=1, le=1_024)] | None = None
    # The llama-server binary; when absent, the one `lloom-executor setup-local` built into the cache.
    llama_server: str | None = None

    def __post_init__(self) -> None:
        if self.local_model is not None and self.model_path is not None:
            raise ValueError(f"set either local_model ({self.local_model!r}) or model_path, not both")


class NodeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Stable identity on the network; default: host name plus a random suffix.
    id: str | None = None
    # Join this NATS server or cluster; when absent, start (or join) the machine's embedded one.
    nats_url: str | None = None
    embedded_nats_port: Annotated[int, Meta(ge=0, le=65_535)] = 4222
    max_concurrent_jobs: Annotated[int, Meta(ge=1, le=100_000)] = 32
    # A job without a caller deadline gets this one.
    default_timeout_secs: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    # On SIGTERM, in-flight jobs get this long to finish before they are cancelled.
    drain_timeout_secs: Annotated[float, Meta(ge=0, le=86_400)] = 30.0
    # Requests asking for more tokens than this are refused with bad_request.
    max_tokens_cap: Annotated[int, Meta(ge=1, le=1_000_000)] = 32_768
    # Jobs running longer than this ask their caller whether it still waits.
    liveness_interval_secs: Annotated[float, Meta(gt=0, le=3_600)] = 5.0
    # Running jobs whose caller asks for it get a keepalive this often (after running this long).
    keepalive_secs: Annotated[float, Meta(gt=0, le=60)] = 1.0
    # Finished jobs' replies are kept this long, to be sent again to a caller that lost them
    # in a NATS outage (0: not kept), within this many bytes in all (oldest dropped first).
    result_retention_secs: Annotated[float, Meta(ge=0, le=3_600)] = 30.0
    result_retention_bytes: Annotated[int, Meta(ge=0, le=1 << 34)] = 16 << 20
    # A stream keeps at most this many bytes of its latest messages for re-sending.
    stream_retention_bytes: Annotated[int, Meta(ge=0, le=1 << 30)] = 256 << 10
    # How often the backend's model list is re-read.
    model_refresh_secs: Annotated[float, Meta(gt=0, le=86_400)] = 30.0
    # Heartbeats on the catalogue subject; clients drop an executor after 2.5 silent periods.
    heartbeat_interval_secs: Annotated[float, Meta(gt=0, le=3_600)] = 0.5
    # The executor's signing key (an nkey seed). Default: ~/.local/share/lloom/<id>.nk
    # when `id` is set (a stable identity), else a new key at every start.
    identity_file: str | None = None
    # An operator's endorsement of this executor's key (JSON, made by scripts/endorse.py):
    # clients that trust the operator's key trust this executor. Checked at start.
    endorsement_file: str | None = None
    # Take sealed jobs (docs/security.md "Sealed jobs"): announce a curve key derived from the
    # identity key and open jobs sealed to it. Costs nothing until a client seals a job.
    sealed_jobs: bool = True


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the catalogue says about one served model, beyond what the backend tells."""

    name: str
    # Prices as decimal strings, in US dollars per million tokens.
    input_price: Decimal = Decimal(0)
    output_price: Decimal = Decimal(0)
    category: ModelCategory | None = None  # fast | balanced | quality; derived from speed when absent
    # What the model can do, announced as is: "chat", "stream", and the capabilities of
    # protocol/capabilities.py ("tools", "vision", "json_schema", "reasoning"). Unset: "chat",
    # "stream" and what the backend says (executor/catalog/features.py); set: exactly this list.
    features: list[str] | None = None
    context_length: Annotated[int, Meta(ge=1)] | None = None  # overrides what the backend reports

    def __post_init__(self) -> None:
        if self.input_price < 0 or self.output_price < 0:
            raise ValueError(f"model {self.name!r}: prices must be >= 0")


class LoggingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Loggers (by name prefix, e.g. "executor.backends") that log at `level`;
    # when set, every other logger logs at info.
    targets: list[str] = []
    format: Literal["auto", "console", "json"] = "auto"


class TokensConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How tokens are counted locally (executor/tokens.py) to check what a backend reports."""

    # tiktoken encoding files (<encoding>.tiktoken); default ${LLOOM_CACHE_DIR:-~/.cache/lloom}/tiktoken,
    # where `lloom-executor setup-tokenizers` writes them. Never downloaded at run time.
    encodings_dir: str | None = None
    # Model-name glob (case-insensitive) -> a Hugging Face tokenizer.json, a SentencePiece
    # .model, or "tiktoken:<encoding>"; the first match wins, before tiktoken's own mapping.
    tokenizers: dict[str, str] = {}
    # Reported and counted tokens differing by more than this fraction (and 8 tokens) mismatch.
    mismatch_tolerance: Annotated[float, Meta(ge=0, le=10)] = 0.1
    # Count locally to check reported usage: "always", "never", or the fraction of jobs to sample.
    verify: Literal["always", "never"] | Annotated[float, Meta(ge=0, le=1)] = "always"


class ReceiptsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    # Where receipts wait until JetStream acknowledges them.
    # Default: $XDG_DATA_HOME/lloom/receipts/<executor id> (~/.local/share/...).
    outbox_dir: str | None = None
    # The JetStream de-duplication window: a receipt re-sent within it is stored once.
    duplicate_window_secs: Annotated[float, Meta(gt=0, le=7 * 86_400)] = 7200.0
    # How often written receipts are fsynced (they survive a killed process at once: each
    # job's receipt is written before its reply leaves).
    sync_interval_secs: Annotated[float, Meta(gt=0, le=60)] = 0.2
    # fsync each batch of receipts before its replies leave (power-loss safe; ~0.2-0.3 ms a batch).
    fsync_each_batch: bool = False
    # Receipts waiting for JetStream held in memory; the rest wait in the outbox file only.
    memory_window: Annotated[int, Meta(ge=1, le=1 << 22)] = 4096
    # How often the outbox's acknowledged receipts are checked against the stream (and any
    # missing re-published); also once at start. 0: only at start.
    reconcile_interval_secs: Annotated[float, Meta(ge=0, le=7 * 86_400)] = 300.0


class BackendEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One member of a multi-backend pool (`[[executors.backends]]`)."""

    name: Annotated[str, Meta(min_length=1)]
    type: str  # a preset (openai, lmstudio, ...), openai_compatible, or a plugin
    base_url: str | None = None
    api_key: str | None = None
    api_key_file: str | None = None  # as in [llm_client]
    models: list[str] | None = None  # default: what it lists
    timeout_secs: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    max_connections: Annotated[int, Meta(ge=1, le=10_000)] = 100
    transport: Literal["auto", "http1", "aiohttp"] = "auto"  # as in [llm_client]


class WeightEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    backend: str
    weight: Annotated[int, Meta(ge=0, le=1_000_000)]


class LoadBalancingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    strategy: Literal["round_robin", "least_connections", "weighted"] = "round_robin"
    health_check_interval_secs: Annotated[float, Meta(gt=0, le=86_400)] = 30.0
    # Consecutive failures that open a backend's circuit breaker.
    failure_threshold: Annotated[int, Meta(ge=1, le=1_000)] = 3
    # How long an open breaker waits before letting one probe request through.
    breaker_cooldown_secs: Annotated[float, Meta(gt=0, le=86_400)] = 5.0
    weights: list[WeightEntry] = []


class RetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The design document's RetryConfig, with its defaults."""

    max_retries: Annotated[int, Meta(ge=0, le=100)] = 3
    initial_delay_ms: Annotated[int, Meta(ge=0)] = 1000
    max_delay_ms: Annotated[int, Meta(ge=0)] = 30_000
    exponential_base: Annotated[float, Meta(ge=1.0, le=10.0)] = 2.0

    def backoff(self, *, jitter: float = 0.0) -> Backoff:
        return Backoff(initial_s=self.initial_delay_ms / 1000, max_s=self.max_delay_ms / 1000,
                       factor=self.exponential_base, jitter=jitter)  # fmt: skip


class FallbackConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What happens to a model's jobs when no backend can serve them."""

    model: str
    strategy: Literal["secondary", "degrade", "queue", "reject"] = "secondary"
    secondary: list[str] = []  # backends kept in reserve for this model (tried after the rest)
    degrade_model: str | None = None
    degrade_max_tokens: Annotated[int, Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        if self.strategy == "degrade" and not (self.degrade_model or self.degrade_max_tokens):
            raise ValueError(f"fallback for {self.model!r}: degrade needs degrade_model or degrade_max_tokens")
        if self.strategy == "secondary" and not self.secondary:
            raise ValueError(f"fallback for {self.model!r}: secondary needs a list of backend names")


class QueueConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The durable job queue (protocol/durable.py): where `queue` fallbacks and `submit` send jobs."""

    # Take queued jobs for every model this executor serves, not only those whose
    # fallback is `queue` (clients may submit any job to the queue).
    consume_all: bool = False
    # A job not acknowledged this long after delivery goes to another executor; a
    # running job tells JetStream it is still at work every third of it.
    ack_wait_secs: Annotated[float, Meta(ge=1, le=86_400)] = 30.0
    max_deliver: Annotated[int, Meta(ge=1, le=1_000)] = 5
    # How long one run of a queued job may take.
    job_timeout_secs: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    result_ttl_secs: Annotated[float, Meta(gt=0, le=365 * 86_400)] = 86_400.0


class ExecutorsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The design document's multi-backend shape; when `backends` is set it replaces [llm_client]."""

    backends: list[BackendEntry] = []
    load_balancing: LoadBalancingConfig = LoadBalancingConfig()
    retry: RetryConfig = RetryConfig()
    fallbacks: list[FallbackConfig] = []
    queue: QueueConfig = QueueConfig()

    def __post_init__(self) -> None:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        for ref in [w.backend for w in self.load_balancing.weights] + [n for f in self.fallbacks for n in f.secondary]:
            if ref not in names:
                raise ValueError(f"no backend is named {ref!r} (backends: {', '.join(names) or 'none'})")


class BatchingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Embedding jobs for the same model share backend calls (executor/batching/coalescer.py)."""

    enabled: bool = True
    # 0: a batch leaves at the end of the event-loop turn it opened in (no added wait); more
    # than 0 waits that long for company. Either way it grows while max_calls calls run.
    window_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0
    max_inputs: Annotated[int, Meta(ge=1, le=2048)] = 256
    max_calls: Annotated[int, Meta(ge=1, le=1_000)] = 2


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The response cache: identical requests at temperature 0 (or with cache=true) answered at once."""

    enabled: bool = True
    max_entries: Annotated[int, Meta(ge=1, le=10_000_000)] = 1000
    max_mb: Annotated[float, Meta(gt=0, le=100_000)] = 64.0
    ttl_secs: Annotated[float, Meta(gt=0, le=30 * 86_400)] = 300.0
    # Also share answers with other executors through the NATS KV bucket LLOOM_CACHE
    # (JetStream); only among executors that serve a model name from the same source.
    shared: bool = False
    shared_max_mb: Annotated[float, Meta(gt=0, le=1_000_000)] = 256.0
    # Public keys (N...) of other executors whose shared entries this one serves; its own always.
    # Entries signed by any other key are refused (a miss): see docs/security.md.
    trusted_keys: list[Annotated[str, Meta(pattern=r"^N[A-Z2-7]{55}$")]] = []


HUB_SCHEMES = ("nats-leaf", "nats", "tls", "ws", "wss")


def _check_hub_url(url: str) -> None:
    """A hub URL goes into the embedded server's config file: no quotes, spaces or braces (percent-encode them)."""
    shown = url.split("@")[-1]
    if any(c.isspace() or not c.isprintable() or c in "\"'\\{}<>`" for c in url):
        raise ValueError(f"hub url {shown!r}: spaces, quotes, braces and control characters must be percent-encoded")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError as e:
        raise ValueError(f"hub url {shown!r}: {e}") from None
    if not parts.hostname:
        raise ValueError(f"hub url {shown!r}: give the hub's host (nats-leaf://host:7422)")


class HubConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Join a hub as a leaf node: the embedded nats-server keeps serving this machine and links
    to the hub (executor/process/leaf.py; docs/deployment.md). Only for the embedded server."""

    # nats-leaf://host:7422 (tls:// for TLS; ws:// or wss:// through a websocket port).
    url: str | None = None
    # One way to authenticate to the hub: a .creds file (JWT), an nkey seed file, or a user and password.
    credentials: str | None = None
    nkey_file: str | None = None
    user: str | None = None
    password: str | None = None
    # TLS to the hub: the CA of its certificate; a client certificate and key for mutual TLS.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # This server's JetStream domain, kept apart from the hub's (default: lloom-leaf-<node id or host>).
    domain: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None

    def __post_init__(self) -> None:
        if self.url is not None:
            scheme = self.url.partition("://")[0].lower() if "://" in self.url else ""
            if scheme not in HUB_SCHEMES:
                raise ValueError(f"hub url {self.url.split('@')[-1]!r}: use one of {', '.join(s + '://' for s in HUB_SCHEMES)}")
            _check_hub_url(self.url)
        ways = [n for n in ("credentials", "nkey_file", "user") if getattr(self, n)]
        if len(ways) > 1:
            raise ValueError(f"use one way to authenticate to the hub, not {' and '.join(ways)}")
        if self.password and not self.user:
            raise ValueError("a hub password needs a user")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a hub TLS client certificate needs its key (tls_cert and tls_key go together)")


# The gateway's default port: none of the usual local servers' (LiteLLM 4000, Ollama 11434,
# LM Studio 1234, vLLM 8000, llama.cpp 8080, dev servers 3000/5000/8888/9090, NATS 4222/8222).
GATEWAY_PORT = 8640


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The OpenAI-compatible HTTP gateway (executor/gateway/, `lloom-gateway`; docs/gateway.md)."""

    # In `lloom-executor`: None runs it with the single-machine start (embedded NATS) only.
    enabled: bool | None = None
    # host:port; loopback by default: without API keys, anyone who can reach the port can use it.
    listen: str = f"127.0.0.1:{GATEWAY_PORT}"
    max_body_mb: Annotated[float, Meta(gt=0, le=1024)] = 8.0
    # Seconds a client has to send a request's body; a trickled body (slowloris) gets 408 after.
    body_timeout_secs: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    # Host names, besides loopback ones, a loopback-bound gateway answers to (e.g. a reverse
    # proxy's public name): any other Host is refused (DNS rebinding, executor/gateway/guard.py).
    allowed_hosts: Annotated[list[Annotated[str, Meta(min_length=1, max_length=253)]], Meta(max_length=64)] = []
    # A request's whole deadline (routing, failover, the answer).
    default_timeout_secs: Annotated[float, Meta(gt=0, le=3600)] = 120.0
    # A request body not fully received this long after its headers is answered 408 (a stalled client).
    body_timeout_secs: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    # On SIGTERM: stop accepting, let open requests and streams finish this long, then close.
    drain_secs: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    # Named in receipts as the client (so `lloom receipts report` shows the gateway's usage).
    client_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = "gateway"
    # Receipts of answered jobs kept in memory for /v1/generation (the stream is read otherwise).
    remember_generations: Annotated[int, Meta(ge=0, le=10_000_000)] = 10_000
    # Require API keys (`Authorization: Bearer`, made with `lloom-gateway keys create`; docs/gateway-keys.md).
    api_keys: bool = False
    # How long a request's budget hold counts if its gateway dies before settling it.
    hold_ttl_secs: Annotated[float, Meta(gt=0, le=86400)] = 600.0
    # The live status page at GET / (docs/status-page.md).
    status_page: bool = True


class TelemetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Metrics and traces (executor/telemetry/, docs/observability.md); everything off by default."""

    # host:port of the Prometheus scrape endpoint (GET /metrics), e.g. "127.0.0.1:9464"; empty: none.
    # Off by default: a port that opens unasked is a surprise (and a second one on a shared host
    # collides); it tells who can reach it the served models and the load (docs/security.md).
    prometheus_listen: Annotated[str, Meta(pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[^:\s]+):[0-9]{1,5}$")] = ""
    # An OTLP/HTTP collector base URL (e.g. "http://127.0.0.1:4318"): metrics and traces go there.
    # Needs the `otlp` extra (pip install 'lloom[otlp]'); empty: nothing is exported.
    otlp_endpoint: str = ""
    # service.name of this process's metrics and spans.
    service_name: Annotated[str, Meta(min_length=1, max_length=128)] = "lloom-executor"
    # How often metrics are pushed to the OTLP endpoint.
    otlp_interval_secs: Annotated[float, Meta(gt=0, le=3_600)] = 15.0
    # Series per metric beyond which further models are counted as model="other".
    max_models: Annotated[int, Meta(ge=1, le=10_000)] = 100

    @property
    def enabled(self) -> bool:
        return bool(self.prometheus_listen or self.otlp_endpoint)


class ExecutorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    node: NodeConfig = NodeConfig()
    nats: NatsConnectOptions = NatsConnectOptions()
    llm_client: LlmClientConfig = LlmClientConfig()
    logging: LoggingConfig = LoggingConfig()
    models: list[ModelConfig] = []
    receipts: ReceiptsConfig = ReceiptsConfig()
    executors: ExecutorsConfig = ExecutorsConfig()
    cache: CacheConfig = CacheConfig()
    batching: BatchingConfig = BatchingConfig()
    tokens: TokensConfig = TokensConfig()
    hub: HubConfig = HubConfig()
    gateway: GatewayConfig = GatewayConfig()
    telemetry: TelemetryConfig = TelemetryConfig()


def default_config_path() -> Path:
    """`$LLOOM_CONFIG`, else `$XDG_CONFIG_HOME/lloom/executor.toml` (~/.config by default)."""
    if env := os.environ.get("LLOOM_CONFIG"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "lloom" / "executor.toml"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, *, key: str, source: str, environ: dict[str, str] | os._Environ[str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {key} refers to ${{{name}}}, which is not set in the environment")

    return _VAR.sub(sub, value)


def load_config(
    path: Path | None = None, *, environ: dict[str, str] | os._Environ[str] | None = None
) -> tuple[ExecutorConfig, Path | None]:
    """Load `path`, or the default file if it exists, else the defaults.

    Returns the config and the file it came from (None for built-in defaults).
    An explicitly named file that does not exist is an error.
    """
    environ = os.environ if environ is None else environ
    source: Path | None = path
    if path is None:
        candidate = default_config_path()
        source = candidate if candidate.exists() else None
    if source is None:
        return ExecutorConfig(), None
    try:
        data = source.read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read config: {e.strerror}") from e
    return parse_config(data, source=str(source), environ=environ), source


def parse_config(data: bytes | str, *, source: str, environ: dict[str, str] | os._Environ[str]) -> ExecutorConfig:
    try:
        cfg = msgspec.toml.decode(data, type=ExecutorConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {e}") from e
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    def expanded(struct, keys: tuple[str, ...], where: str):  # type: ignore[no-untyped-def]
        changes = {
            key: expand_env(value, key=f"{where}.{key}", source=source, environ=environ)
            for key in keys
            if (value := getattr(struct, key)) is not None
        }
        return msgspec.structs.replace(struct, **changes) if changes else struct

    llm = expanded(cfg.llm_client, ("api_key", "api_key_file", "base_url", "model_path", "llama_server"), "llm_client")
    backends = [
        expanded(b, ("api_key", "api_key_file", "base_url"), f"executors.backends[{i}]")
        for i, b in enumerate(cfg.executors.backends)
    ]
    for where, entry in [("llm_client", llm), *((f"executors.backends[{i}]", b) for i, b in enumerate(backends))]:
        if entry.api_key and entry.api_key_file:
            raise ConfigError(f"{source}: {where} sets both api_key and api_key_file; keep one")
    strings = tuple(f for f in NatsConnectOptions.__struct_fields__ if f not in ("tls_handshake_first", "connect_timeout_secs"))
    try:
        nats_options = expanded(cfg.nats, strings, "nats")
    except ValueError as e:  # e.g. ${NATS_USER} and ${NATS_TOKEN} both set
        raise ConfigError(f"{source}: [nats]: {e}") from e
    hub_keys = tuple(f for f in HubConfig.__struct_fields__ if f != "domain")
    try:
        hub = expanded(cfg.hub, hub_keys, "hub")
    except ValueError as e:
        raise ConfigError(f"{source}: [hub]: {e}") from e
    if hub.url and cfg.node.nats_url:
        raise ConfigError(f"{source}: [hub] url links the embedded server to a hub; [node] nats_url uses another server: keep one")
    return msgspec.structs.replace(
        cfg, llm_client=llm, nats=nats_options, hub=hub, executors=msgspec.structs.replace(cfg.executors, backends=backends)
    )


DEFAULT_CONFIG_TOML = """\
# Lloom executor configuration. Every key is optional; the values shown are the defaults.
# Validate with `lloom-executor check`; run with `lloom-executor --config THIS_FILE`.

[node]
# Stable identity on the network (default: host name plus a random suffix).
# id = "my-executor"
# Join an existing NATS server or cluster. When unset, the node starts an
# embedded nats-server on 127.0.0.1:embedded_nats_port, or joins the one another
# executor of this machine runs there (and takes it over if that executor stops).
# nats_url = "nats://127.0.0.1:4222"
embedded_nats_port = 4222
# Jobs run at once; one more gets a fast `busy` reply so the caller tries another executor.
max_concurrent_jobs = 32
# Deadline for jobs whose caller sent none.
default_timeout_secs = 300
# On SIGTERM/SIGINT: stop taking jobs, give in-flight ones this long, then exit.
drain_timeout_secs = 30
# Requests asking for more max_tokens than this are refused.
max_tokens_cap = 32768
# Long jobs ask their caller this often whether it still waits (and stop if not).
liveness_interval_secs = 5
# Running jobs get a keepalive this often, so callers tell a slow job from a dead executor.
keepalive_secs = 1
# Replies are kept this long after a job ends (within result_retention_bytes), and sent
# again to a caller that lost them in a NATS outage; a stream keeps its latest
# stream_retention_bytes.
result_retention_secs = 30
result_retention_bytes = 16777216
stream_retention_bytes = 262144
# How often the backend's model list is re-read.
model_refresh_secs = 30
# Catalogue heartbeats; clients drop this executor after 2.5 silent periods.
heartbeat_interval_secs = 0.5
# Signing key file (default: ~/.local/share/lloom/<id>.nk if id is set, else a new key per start).
# identity_file = "/var/lib/lloom/executor.nk"
# An operator's endorsement of this key (scripts/endorse.py); clients trusting the operator trust us.
# endorsement_file = "/var/lib/lloom/endorsement.json"

[nats]
# How to reach a secured NATS bus (nats_url above); see docs/security.md. Use one way to
# authenticate. ${VAR} is taken from the environment: keep secrets out of this file.
# The LLOOM_NATS_* variables and the --user/--creds/--nkey/--tls-* flags override these.
# user = "executor-1"
# password = "${LLOOM_NATS_PASSWORD}"
# token = "${LLOOM_NATS_TOKEN}"
# nkey_file = "/etc/lloom/executor-1.nk"        # an nkey user seed (SU...)
# creds_file = "/etc/lloom/executor-1.creds"    # a JWT .creds file (nsc)
# tls_ca = "/etc/lloom/nats-ca.pem"             # the CA that signed the server's certificate
# tls_cert = "/etc/lloom/executor-1.pem"        # client certificate, for mutual TLS
# tls_key = "/etc/lloom/executor-1-key.pem"
# tls_hostname = "nats.example.org"             # default: the URL's host
# tls_handshake_first = false
# inbox_prefix = "_INBOX_executor-1"            # what the server's permissions let this user read
connect_timeout_secs = 5

[hub]
# Join a shared network from this machine: the embedded nats-server becomes a leaf node of
# this hub (same as `lloom-executor --hub URL`). Local clients keep using 127.0.0.1; the
# executor's models appear in the hub's catalogue. See docs/deployment.md.
# url = "nats-leaf://hub.example.org:7422"   # tls://... for TLS
# credentials = "/etc/lloom/laptop-1.creds"  # or nkey_file = "...", or user = "..." + password = "${LLOOM_HUB_PASSWORD}"
# tls_ca = "/etc/lloom/hub-ca.pem"
# domain = "lloom-leaf-my-laptop"            # this server's JetStream domain (default: from [node] id or the host name)

[llm_client]
# lmstudio | openai | ollama | vllm | llamacpp | openai_compatible | local (a llama-server
# child process) | auto (probe local servers; when none answers, run "local" if it is set up)
backend = "auto"
# Defaults per backend: lmstudio http://localhost:1234/v1, ollama http://localhost:11434/v1,
# vllm http://localhost:8000/v1, llamacpp http://localhost:8080/v1, openai https://api.openai.com/v1
# base_url = "http://localhost:1234/v1"
# Taken from the environment at start-up; never write the key itself here.
# api_key = "${OPENAI_API_KEY}"
# Or a file holding the key: re-read when it changes and on SIGHUP (rotation without a restart).
# api_key_file = "/run/secrets/openai_api_key"
timeout_secs = 300
# Serve only these models (default: every model the backend lists).
# models = ["llama-2-13b"]
max_connections = 100
# auto: the lean HTTP/1.1 pool, or aiohttp when HTTP_PROXY/HTTPS_PROXY/ALL_PROXY applies to
# base_url (and NO_PROXY does not exclude it) | http1 | aiohttp (proxies, gzip)
transport = "auto"
# Image URLs passed on to the backend, which fetches them from its own host (a caller could
# make it fetch cloud metadata or its loopback): data_only (inline data: images only) |
# public_only (refuse URLs naming localhost, private, loopback, link-local or reserved IPs;
# names are not resolved, so a name or a redirect to a private address still gets through) |
# any (e.g. OpenAI's API, which fetches from its own network). See docs/security.md.
image_urls = "data_only"
# backend = "local": the model, either a prepared one, served under its own name
# (smollm2-135m-instruct: the default, set up by `lloom-executor setup-local`; or
# gemma3-270m: the `local` extra's base model), or any GGUF file (model_path); the name
# it is served under (default: the local model's name, else the file's stem), a llama.cpp
# built-in chat template (default: the file's own), context length (default: the model's
# own), threads (default: one less than the CPU count), and the llama-server binary
# (default: the one `lloom-executor setup-local` built into ~/.cache/lloom).
# local_model = "smollm2-135m-instruct"
# model_path = "/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"
# model_name = "qwen2.5-0.5b"
# chat_template = "chatml"
# context_length = 4096
# threads = 2
# llama_server = "/usr/local/bin/llama-server"

# What the network catalogue says about each served model (repeat the table per model).
# Prices are decimal strings in US dollars per million tokens.
# [[models]]
# name = "gpt-4o"
# input_price = "2.50"
# output_price = "10.00"
# category = "quality"       # fast | balanced | quality (default: fast if >= 50 tokens/s measured)
# features = ["chat", "stream", "tools", "json_schema"]  # default: chat, stream + what the backend says
# context_length = 128000    # default: what the backend reports

[tokens]
# Tokens are counted locally to check the usage a backend reports (a mismatch is logged,
# counted and put in the receipt). tiktoken encoding files live here (default:
# ${LLOOM_CACHE_DIR:-~/.cache/lloom}/tiktoken); `lloom-executor setup-tokenizers` installs
# them once. Without them, OpenAI models' tokens are estimated (and the receipt says so).
# encodings_dir = "/var/lib/lloom/tiktoken"
# Models that are not OpenAI's: a model-name glob -> a Hugging Face tokenizer.json (needs
# the `tokenizers` extra), a SentencePiece .model (needs `sentencepiece`), or
# "tiktoken:<encoding>". The first match wins; other models are estimated.
# tokenizers = { "llama-3*" = "/models/llama-3/tokenizer.json", "my-azure-gpt4" = "tiktoken:cl100k_base" }
# Reported and counted tokens differing by more than this fraction (and 8 tokens) mismatch.
mismatch_tolerance = 0.1
# "always", "never", or the fraction of jobs to check (e.g. 0.05), chosen by job id.
verify = "always"

[receipts]
# Every job's signed usage receipt goes to the JetStream stream LLOOM_RECEIPTS, through
# an on-disk outbox that keeps it until the stream acknowledges it.
enabled = true
# outbox_dir = "~/.local/share/lloom/receipts/<executor id>"   (the default)
duplicate_window_secs = 7200
sync_interval_secs = 0.2
# Each receipt is written to the outbox before its job's reply leaves; this also fsyncs each
# batch first (power-loss safe, ~0.2-0.3 ms a batch). A job whose receipt cannot be written
# fails with `receipts_unavailable`, and the executor takes no jobs until it can write again.
fsync_each_batch = false
# Receipts waiting for JetStream kept in memory (~2 KB each); the rest wait on disk only.
memory_window = 4096
# Receipts heal themselves: at start and this often, acknowledged receipts missing from the
# stream are re-published (those of earlier identities' outboxes on this machine at start). 0: only at start.
reconcile_interval_secs = 300

# Several backends behind this executor (the design document's shape). When any
# [[executors.backends]] is given, it replaces [llm_client].
# [[executors.backends]]
# name = "primary"
# type = "openai"
# base_url = "https://api.openai.com/v1"
# api_key = "${OPENAI_API_KEY}"
# models = ["gpt-4", "gpt-3.5-turbo"]
#
# [[executors.backends]]
# name = "local"
# type = "lmstudio"
# base_url = "http://localhost:1234/v1"
# models = ["llama-2-13b", "mistral-7b"]
#
# [executors.load_balancing]
# strategy = "round_robin"           # or "least_connections", "weighted"
# health_check_interval_secs = 30
# failure_threshold = 3              # consecutive failures that open a backend's breaker
# breaker_cooldown_secs = 5          # then one probe request decides
# [[executors.load_balancing.weights]]
# backend = "primary"
# weight = 70
#
# [executors.retry]                  # when every backend failed: back off and go round again
# max_retries = 3
# initial_delay_ms = 1000
# max_delay_ms = 30000
# exponential_base = 2.0
#
# [[executors.fallbacks]]            # when no backend can serve a model
# model = "gpt-4"
# strategy = "degrade"               # secondary (+ secondary = ["backup"]) | degrade | queue | reject
# degrade_model = "gpt-3.5-turbo"
# degrade_max_tokens = 256
#
# [executors.queue]                  # queue: jobs wait in JetStream (LLOOM_JOBS) until a backend is back
# consume_all = false                # also run jobs clients submit for this executor's other models
# ack_wait_secs = 30
# max_deliver = 5
# job_timeout_secs = 600
# result_ttl_secs = 86400            # results wait this long in the LLOOM_RESULTS bucket

[cache]
# Identical requests at temperature 0 (or with "cache": true) are answered from memory,
# marked `cached` in the result and its receipt.
enabled = true
max_entries = 1000
max_mb = 64
ttl_secs = 300
shared = false          # true: also share answers with other executors (NATS KV bucket LLOOM_CACHE)
# Shared entries are signed; only this executor's own and these executors' keys are served.
# trusted_keys = ["NABC..."]

[batching]
# Concurrent embedding jobs for one model share a backend call (inputs arrays).
enabled = true
window_ms = 0           # 0: no added wait; batches grow while max_calls calls run
max_inputs = 256
max_calls = 2

[gateway]
# The OpenAI-compatible HTTP gateway (docs/gateway.md). Unset `enabled`: on with the embedded
# NATS (no nats_url) only. Without API keys anyone who can reach `listen` can use it.
# enabled = true
listen = "127.0.0.1:8640"
max_body_mb = 8.0
body_timeout_secs = 30.0  # to send a request's body; a trickled one gets 408
allowed_hosts = []      # Host names besides loopback a loopback gateway answers (a reverse proxy's)
default_timeout_secs = 120.0
drain_secs = 30.0       # on SIGTERM: open requests and streams get this long to finish
client_id = "gateway"   # named in receipts
remember_generations = 10000
api_keys = false        # true: every request needs a key (lloom-gateway keys create)
status_page = true      # GET /: the live status page of the network

[telemetry]
# Metrics for Prometheus on this address (GET /metrics), e.g. "127.0.0.1:9464"; empty: no port
# opens. Loopback unless a scraper elsewhere needs it: it shows the served models and the load.
prometheus_listen = ""
# An OTLP/HTTP collector (e.g. "http://127.0.0.1:4318") for metrics and traces; needs
# pip install 'lloom[otlp]'. Empty: nothing is exported and no span is recorded.
otlp_endpoint = ""
service_name = "lloom-executor"
# docs/observability.md lists the metrics and spans.

[logging]
level = "info"          # debug | info | warning | error
# targets = ["executor.backends"]   # only these loggers at `level`, the rest at info
format = "auto"         # auto (console on a terminal, JSON otherwise) | console | json
"""
