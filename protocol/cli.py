"""`lloom`: the command-line client of the network.

    lloom complete --model qwen2.5:7b "Why is the sky blue?"
    lloom complete --model qwen2.5:7b --stream --max-tokens 64 - < prompt.txt
    lloom --nats nats://10.0.0.5:4222 complete --model gpt-4o --json "hi"

The text goes to stdout; a summary line (model, finish reason, token usage, the
executor that served it) to stderr, so the text can be piped. Errors print
their wire code and message; exit codes: 0 ok, 1 the job failed, 2 bad usage
or no connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import msgspec

from protocol.client import DEFAULT_URL, LloomClient
from protocol.errors import LloomError
from protocol.messages import ChatRequest, ChatResponse, Message, Role, StreamEnd, Usage


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lloom", description="Client of the Lloom executor network.")
    p.add_argument(
        "--nats",
        metavar="URL",
        default=os.environ.get("LLOOM_NATS_URL", DEFAULT_URL),
        help=f"NATS server (default: $LLOOM_NATS_URL or {DEFAULT_URL})",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("complete", help="run a chat completion on the network")
    c.add_argument("prompt", help="the user message; - reads it from stdin")
    c.add_argument("--model", "-m", required=True)
    c.add_argument("--system", help="a system message to put first")
    c.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--temperature", type=float)
    c.add_argument("--top-p", type=float)
    c.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the whole answer (default 120)")
    c.add_argument("--executor", help="send to this executor id instead of any executor serving the model")
    c.add_argument("--json", action="store_true", help="print the normalized response as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [Message(Role.SYSTEM, args.system)] if args.system else []
    messages.append(Message(Role.USER, prompt))
    try:
        request = msgspec.convert(
            {
                "model": args.model,
                "messages": messages,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "stream": args.stream,
            },
            ChatRequest,
            from_attributes=True,
        )
    except msgspec.ValidationError as e:
        print(f"lloom: invalid request: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_complete(args, request))


async def _complete(args: argparse.Namespace, request: ChatRequest) -> int:
    try:
        client = await LloomClient.connect(args.nats)
    except ConnectionError as e:
        print(f"lloom: {e}; is an executor (lloom-executor) or nats-server running there?", file=sys.stderr)
        return 2
    async with client:
        return await _run_job(args, request, client)


async def _run_job(args: argparse.Namespace, request: ChatRequest, client: LloomClient) -> int:
    try:
        if request.stream:
            async with client.stream(request, timeout=args.timeout, executor=args.executor) as stream:
                parts = []
                async for chunk in stream:
                    parts.append(chunk.delta)
                    if not args.json:
                        sys.stdout.write(chunk.delta)
                        sys.stdout.flush()
            assert stream.end is not None
            _finish(args, stream.end, "".join(parts))
        else:
            reply = await client.complete(request, timeout=args.timeout, executor=args.executor)
            if not args.json:
                sys.stdout.write(reply.content)
            _finish(args, reply, reply.content)
    except LloomError as e:
        if request.stream and not args.json:
            sys.stdout.write("\n")
        print(f"lloom: {e.code.value}: {e.message}", file=sys.stderr)
        if e.available_models:
            print(f"lloom: available models: {', '.join(e.available_models)}", file=sys.stderr)
        return 1
    return 0


def _finish(args: argparse.Namespace, result: ChatResponse | StreamEnd, content: str) -> None:
    if args.json:
        data = msgspec.to_builtins(result)
        data["content"] = content
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
        return
    sys.stdout.write("\n")
    print(f"[{result.model} via {result.executor_id}: {result.finish_reason.value}, {_usage(result.usage)}]", file=sys.stderr)


def _usage(u: Usage) -> str:
    approx = " (estimated)" if u.estimated else ""
    return f"tokens prompt {u.prompt_tokens} + completion {u.completion_tokens} = {u.total_tokens}{approx}"


if __name__ == "__main__":
    sys.exit(main())
