"""`lloom`: the command-line client of the network.

    lloom complete --model qwen2.5:7b "Why is the sky blue?"
    lloom complete --model qwen2.5:7b --stream --max-tokens 64 - < prompt.txt
    lloom complete --model gpt-4o --json --nats nats://10.0.0.5:4222 "hi"
    lloom complete --route cheapest --min-context 8192 "hi"
    lloom models [--json] [--watch]
    lloom receipts verify --stream        lloom receipts report --stream
    lloom complete --model qwen2.5:7b --queue "hi"     # durable: prints the job id
    lloom result <job id> [--timeout 600 | --no-wait]
    lloom embed --model nomic-embed-text "first text" "second text"   # one JSON line per input
    lloom complete -m M --tools tools.json | --json-schema s.json | --image cat.png "..."  # protocol/cli_chat.py

The global options `--nats`, `--timeout`, `--json` and `--trust FILE` (a keyring:
only the executors it names or its operators endorse are used and believed; see
protocol/trust.py) (where a command has a use for them) go before or after the subcommand (`protocol/cli_common.py`). The text
goes to stdout; a summary line (model, finish reason, token usage, the executor
that served it) to stderr, so the text can be piped. Errors print their wire code
and message (a model nobody serves: the models served and the closest name);
exit codes: 0 ok, 1 the job failed, 2 bad usage or no connection, 3 the job waits
in the durable queue (its id on stdout) or its result is not there yet, 130
cancelled with Ctrl-C (the job is cancelled at its executor too).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from decimal import Decimal

import msgspec

from protocol import cli_chat, receipts_cli
from protocol.announcements import ModelCategory
from protocol.chat_checks import check_chat_request
from protocol.catalog import ExecutorEntry
from protocol.cli_common import GlobalOption, GlobalOptions, connect_options, run
from protocol.client import DEFAULT_TIMEOUT_S, DEFAULT_URL, LloomClient
from protocol.errors import InvalidRequest, JobQueued, LloomError, NoExecutors, ResultPending
from protocol.messages import ChatRequest, ChatResponse, Message, Role, StreamEnd, Usage
from protocol.routing import Category, Cheapest, Constraints, Fastest, ModelRequest, Specific, category_of
from protocol.trust import TRUST_ENV, Trust, TrustError


def _options() -> GlobalOptions:
    """The options `lloom` takes before or after its subcommand."""
    return GlobalOptions(
        GlobalOption("--nats", os.environ.get("LLOOM_NATS_URL", DEFAULT_URL),
                     {"metavar": "URL", "help": f"NATS server (default: $LLOOM_NATS_URL or {DEFAULT_URL})"}),
        GlobalOption("--timeout", DEFAULT_TIMEOUT_S, {"type": float, "metavar": "S",
                     "help": f"seconds to wait for the whole answer (default {DEFAULT_TIMEOUT_S:g})"}),
        GlobalOption("--json", False, {"action": "store_true", "help": "print JSON instead of text"}),
        GlobalOption("--trust", os.environ.get(TRUST_ENV) or None, {"metavar": "FILE",
                     "help": f"keyring of trusted executor (N...) and operator (O...) keys, one per line"
                             f" (default: ${TRUST_ENV}; none: trust each executor id's first key)"}),
    )  # fmt: skip


def _parser(opts: GlobalOptions) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lloom", description="Client of the Lloom executor network.")
    opts.add_to(p)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("complete", help="run a chat completion on the network",
                       parents=[opts.parent("nats", "timeout", "json", "trust")])  # fmt: skip
    c.add_argument("prompt", help="the user message; - reads it from stdin")
    c.add_argument("--model", "-m", help="the model (optional with --route)")
    c.add_argument("--system", help="a system message to put first")
    c.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--temperature", type=float)
    c.add_argument("--top-p", type=float)
    c.add_argument("--executor", help="send to this executor id instead of any executor serving the model")
    c.add_argument("--sealed", action="store_true",
                   help="seal the prompt and the answer end to end: only the executor can read them"
                        " (routed to an executor announcing a curve key; see docs/security.md)")  # fmt: skip
    c.add_argument("--queue", action="store_true",
                   help="put the job in the durable queue and print its id (then: lloom result ID)")  # fmt: skip
    r = c.add_argument_group("routing (picks an executor from the live catalogue)")
    r.add_argument("--route", choices=["cheapest", "fastest", "fast", "balanced", "quality"],
                   help="choose the model too: cheapest, fastest, or one of a category")  # fmt: skip
    r.add_argument("--max-input-price", type=Decimal, help="USD per 1M prompt tokens")
    r.add_argument("--max-output-price", type=Decimal, help="USD per 1M completion tokens")
    r.add_argument("--max-cost", type=Decimal, help="USD for this request's estimated tokens")
    r.add_argument("--min-context", type=int, help="minimum context length")
    r.add_argument("--feature", action="append", default=[], help="a required feature (repeatable)")
    r.add_argument("--hedge-after", type=float, help="seconds before also asking a second executor")
    cli_chat.add_options(c)
    e = sub.add_parser("embed", help="embeddings for one or more texts", parents=[opts.parent("nats", "timeout", "trust")])
    e.add_argument("texts", nargs="+", help="the texts; - reads one per line from stdin")
    e.add_argument("--model", "-m", required=True)
    e.add_argument("--dimensions", type=int)
    res = sub.add_parser("result", help="the result of a queued job", parents=[opts.parent("nats", "timeout", "json")])
    res.add_argument("job_id")
    res.add_argument("--no-wait", action="store_true", help="only look: exit 3 if it is not there yet")
    receipts_cli.add_parser(sub, opts)
    m = sub.add_parser("models", help="list the models the network serves, live", parents=[opts.parent("nats", "json", "trust")])
    m.add_argument("--watch", action="store_true", help="print it again on every change")
    return p


# A job that waits in the durable queue (complete) or whose result is not there yet (result).
EXIT_PENDING = 3


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    opts = _options()
    parser = _parser(opts)
    args = opts.resolve(parser, parser.parse_args(argv))
    if args.command == "models":
        return asyncio.run(_models(args))
    if args.command == "receipts":
        return asyncio.run(_receipts(args))
    if args.command == "result":
        return asyncio.run(_result(args))
    if args.command == "embed":
        return asyncio.run(_embed(args))
    if args.route is None and args.model is None:
        print("lloom: complete needs --model, or --route to let the network choose one", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        content = cli_chat.user_content(prompt, args.image)
        chat_fields = {k: v for k, v in cli_chat.chat_fields(args).items() if v is not None}
    except cli_chat.ChatInputError as e:
        print(f"lloom: {e}", file=sys.stderr)
        return 2
    messages = [Message(Role.SYSTEM, args.system)] if args.system else []
    messages.append({"role": "user", "content": content})  # type: ignore[arg-type]
    try:
        request = msgspec.convert(
            {
                "model": args.model or "any",
                "messages": messages,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "stream": args.stream,
                **chat_fields,
            },
            ChatRequest,
            from_attributes=True,
        )
        check_chat_request(request)
    except msgspec.ValidationError as e:
        print(f"lloom: invalid request: {e}", file=sys.stderr)
        return 2
    except InvalidRequest as e:
        print(f"lloom: {e.code.value}: {e.message}", file=sys.stderr)
        return 2
    return asyncio.run(_complete(args, request))


async def _connect(args: argparse.Namespace) -> LloomClient | None:
    try:
        trust = Trust.from_file(args.trust) if getattr(args, "trust", None) else Trust()
    except TrustError as e:
        print(f"lloom: {e}", file=sys.stderr)
        return None
    try:
        return await LloomClient.connect(args.nats, options=connect_options(args), trust=trust)
    except ValueError as e:
        print(f"lloom: NATS options: {e}", file=sys.stderr)
        return None
    except ConnectionError as e:
        # Only a server that did not answer makes "is one running?" the right question.
        found = any(word in str(e) for word in ("TLS", "credentials", "inbox", "permissions"))
        hint = "" if found else "; is an executor (lloom-executor) or nats-server running there?"
        print(f"lloom: {e}{hint}", file=sys.stderr)
        return None


async def _complete(args: argparse.Namespace, request: ChatRequest) -> int:
    client = await _connect(args)
    if client is None:
        return 2
    async with client:
        return await _run_job(args, request, client)


async def _embed(args: argparse.Namespace) -> int:
    texts = [line for line in sys.stdin.read().splitlines() if line] if args.texts == ["-"] else args.texts
    client = await _connect(args)
    if client is None:
        return 2
    async with client:
        try:
            reply = await client.embed(args.model, texts, dimensions=args.dimensions, timeout=args.timeout)
        except LloomError as err:
            _print_error(err)
            return 1
    # One JSON object per line, then the summary on stderr, as for completions.
    for text, vector in zip(texts, reply.embeddings, strict=True):
        sys.stdout.write(msgspec.json.encode({"input": text, "embedding": vector}).decode() + "\n")
    print(f"[{reply.model} via {reply.executor_id}: {len(reply.embeddings)} embeddings, "
          f"{reply.usage.prompt_tokens} prompt tokens, batched with {reply.batched_with}]", file=sys.stderr)  # fmt: skip
    return 0


async def _result(args: argparse.Namespace) -> int:
    client = await _connect(args)
    if client is None:
        return 2
    async with client:
        try:
            if args.no_wait:
                reply = await client.fetch(args.job_id)
                if reply is None:
                    print(f"lloom: job {args.job_id} has no result yet", file=sys.stderr)
                    return EXIT_PENDING
            else:
                reply = await client.result(args.job_id, timeout=args.timeout)
        except LloomError as e:
            _print_error(e)
            return EXIT_PENDING if isinstance(e, ResultPending) else 1
    if not args.json:
        sys.stdout.write(reply.content)
    _finish(args, reply, reply.content)
    return 0


async def _receipts(args: argparse.Namespace) -> int:
    if not args.stream:
        return await receipts_cli.run(args, None)
    client = await _connect(args)
    if client is None:
        return 2
    async with client:
        return await receipts_cli.run(args, client.nc)


def _routing(args: argparse.Namespace) -> dict[str, object]:
    """The route and constraints for `complete`, or nothing for the plain model subject."""
    route: ModelRequest | None = None
    if args.route == "cheapest":
        route = Cheapest()
    elif args.route == "fastest":
        route = Fastest()
    elif args.route is not None:
        route = Category(ModelCategory(args.route))
    limits = {
        "max_input_price": args.max_input_price,
        "max_output_price": args.max_output_price,
        "max_cost": args.max_cost,
        "min_context": args.min_context,
    }
    constraints = None
    if any(v is not None for v in limits.values()) or args.feature:
        constraints = Constraints(**limits, features=frozenset(args.feature))  # type: ignore[arg-type]
    if route is None and constraints is None:
        return {}
    return {"route": route or Specific(args.model), "constraints": constraints}


async def _models(args: argparse.Namespace) -> int:
    client = await _connect(args)
    if client is None:
        return 2
    async with client:
        catalog = await client.catalog()
        while True:
            entries = sorted(catalog.entries(), key=lambda e: e.executor_id)
            if args.json:
                sys.stdout.write(msgspec.json.encode([_entry_json(e) for e in entries]).decode() + "\n")
            else:
                sys.stdout.write(render_catalog(entries))
            sys.stdout.flush()
            if not args.watch:
                return 0
            # Expiries are noticed on read: look again at least every second.
            await catalog.wait_changed(timeout=1.0)
            if not args.json:
                sys.stdout.write("\n")


def _entry_json(entry: ExecutorEntry) -> dict[str, object]:
    return {
        "executor_id": entry.executor_id,
        "key": entry.key,
        "load": msgspec.to_builtins(entry.load),
        "models": msgspec.to_builtins(entry.models),
    }


def render_catalog(entries: list[ExecutorEntry]) -> str:
    rows = [("MODEL", "EXECUTOR", "BACKEND", "IN $/1M", "OUT $/1M", "CONTEXT", "CATEGORY", "LOAD", "LATENCY", "TOK/S", "OK")]
    for entry in entries:
        for o in entry.models:
            p = o.perf
            rows.append(
                (
                    o.name,
                    entry.executor_id,
                    o.backend,
                    str(o.pricing.input),
                    str(o.pricing.output),
                    str(o.context_length or "?"),
                    category_of(o).value + ("" if o.category else "*"),
                    f"{entry.load.in_flight}/{entry.load.capacity}",
                    f"{p.latency_ms:.0f} ms" if p.latency_ms is not None else "-",
                    f"{p.tokens_per_s:.0f}" if p.tokens_per_s is not None else "-",
                    "yes" if o.available else "no",
                )
            )
    if len(rows) == 1:
        return "no executors on the network\n"
    rows.sort(key=lambda r: (r[0] != "MODEL", r[0], r[1]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n(* category derived from measured speed)\n"


async def _run_job(args: argparse.Namespace, request: ChatRequest, client: LloomClient) -> int:
    routing = _routing(args)
    try:
        if args.queue:
            if args.sealed:  # the durable queue holds jobs in clear, in JetStream
                _print_error(InvalidRequest("--sealed cannot be combined with --queue: queued jobs are stored in clear"))
                return 2
            print(await client.submit(request))
            return 0
        if request.stream:
            async with client.stream(request, timeout=args.timeout, executor=args.executor, sealed=args.sealed,
                                     **routing) as stream:  # fmt: skip
                parts = []
                async for chunk in stream:
                    parts.append(chunk.delta)
                    if args.show_reasoning and chunk.reasoning:
                        sys.stderr.write(chunk.reasoning)
                        sys.stderr.flush()
                    if not args.json:
                        sys.stdout.write(chunk.delta)
                        sys.stdout.flush()
            assert stream.end is not None
            if args.show_reasoning and stream.reasoning:
                sys.stderr.write("\n")
            calls = stream.tool_calls
            if not args.json:
                cli_chat.print_tool_calls(calls)
            _finish(args, stream.end, "".join(parts), {"tool_calls": msgspec.to_builtins(calls)} if calls else None)
        else:
            reply = await client.complete(
                request, timeout=args.timeout, executor=args.executor, hedge_after=args.hedge_after,
                sealed=args.sealed, **routing,
            )  # fmt: skip
            if args.show_reasoning:
                cli_chat.print_reasoning(reply.reasoning_content)
            if not args.json:
                sys.stdout.write(reply.content)
                cli_chat.print_tool_calls(reply.tool_calls)
            _finish(args, reply, reply.content)
    except (LloomError, asyncio.CancelledError) as e:
        if request.stream and not args.json:
            sys.stdout.write("\n")  # end the partial line, so the message starts on its own
        if not isinstance(e, LloomError):
            raise  # Ctrl-C: the stream has cancelled the job; `run` reports it
        _print_error(e)
        if isinstance(e, JobQueued):
            print(e.job_id)  # stdout: what `lloom result` takes
            return EXIT_PENDING
        return 1
    return 0


def _print_error(e: LloomError) -> None:
    """`lloom: <code>: <message>`, and what the error knows about the models served."""
    if isinstance(e, NoExecutors) and e.available_models is not None:
        # The message already names the models served and the closest one.
        end = "" if e.message.endswith("?") else "."
        print(f"lloom: {e.code.value}: {e.message}{end} See `lloom models`.", file=sys.stderr)
        return
    print(f"lloom: {e.code.value}: {e.message}", file=sys.stderr)
    if e.available_models:
        print(f"lloom: available models: {', '.join(e.available_models)}", file=sys.stderr)


def _finish(args: argparse.Namespace, result: ChatResponse | StreamEnd, content: str,
            more: dict[str, object] | None = None) -> None:  # fmt: skip
    if args.json:
        data = msgspec.to_builtins(result)
        data["content"] = content
        data.update(more or {})
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
        return
    sys.stdout.write("\n")
    print(f"[{result.model} via {result.executor_id}: {result.finish_reason.value}, {_usage(result.usage)}]", file=sys.stderr)


def _usage(u: Usage) -> str:
    approx = " (estimated)" if u.estimated else ""
    reasoning = f" ({u.reasoning_tokens} of them reasoning)" if u.reasoning_tokens else ""
    return f"tokens prompt {u.prompt_tokens} + completion {u.completion_tokens}{reasoning} = {u.total_tokens}{approx}"


if __name__ == "__main__":
    sys.exit(main())
