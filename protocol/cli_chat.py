"""`lloom complete`'s options for the chat API beyond plain text: tools, JSON output,
images, sampling options, reasoning.

    lloom complete -m M --tools tools.json "weather in Paris?"     # tool calls printed as JSON
    lloom complete -m M --json-schema city.json "where is the Eiffel tower?"
    lloom complete -m M --image photo.png "what is in this picture?"
    lloom complete -m M --show-reasoning --seed 7 "why?"

`chat_fields` turns the options into `ChatRequest` fields (reading the files), and
raises `ChatInputError` with a message naming the option for anything unusable: the
CLI prints it and exits 2, never a traceback. An image PATH is sent inline as a data
URL; what does not fit the NATS server's max_payload is refused by the client with
`payload_too_large` (send an http(s) URL instead: the backend fetches it).
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import sys
from pathlib import Path
from typing import Any

import msgspec

from protocol.chat_types import ToolCall

# OpenAI's own ceiling for an image; larger files are refused before they are read.
MAX_IMAGE_BYTES = 20 * 2**20
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


class ChatInputError(Exception):
    """An option's value cannot be used; the message says which and why."""


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat API options (OpenAI's names)")
    g.add_argument("--tools", metavar="FILE", help="a JSON array of tool definitions (OpenAI's `tools`);"
                   " tool calls the model makes are printed as JSON")  # fmt: skip
    g.add_argument("--tool-choice", metavar="CHOICE", help="none, auto, required, or the name of a function to call")
    g.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against the JSON schema in FILE"
                   " (response_format json_schema, strict)")  # fmt: skip
    g.add_argument("--json-object", action="store_true", help="answer with a JSON object (response_format json_object)")
    g.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image for the model (repeatable): an http(s) URL, or a file sent inline as a data URL")  # fmt: skip
    g.add_argument("--seed", type=int)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--show-reasoning", action="store_true", help="print the model's reasoning (to stderr)")


def _read_json(option: str, path: str) -> Any:
    try:
        return msgspec.json.decode(Path(path).read_bytes())
    except OSError as e:
        raise ChatInputError(f"{option} {path}: cannot be read ({e.strerror})") from None
    except msgspec.DecodeError as e:
        raise ChatInputError(f"{option} {path}: not JSON ({e})") from None


def image_url(spec: str) -> str:
    """An http(s) or data: URL as given; a file, read and encoded as a data URL."""
    if spec.startswith(("http://", "https://", "data:")):
        return spec
    path = Path(spec)
    media = mimetypes.guess_type(path.name)[0]
    if media not in _IMAGE_TYPES:
        raise ChatInputError(f"--image {spec}: not a PNG, JPEG, GIF or WebP file (by its name), nor an http(s) URL")
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ChatInputError(f"--image {spec}: {size} bytes, over {MAX_IMAGE_BYTES}; send an http(s) URL")
        data = path.read_bytes()
    except OSError as e:
        raise ChatInputError(f"--image {spec}: cannot be read ({e.strerror})") from None
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def user_content(prompt: str, images: list[str]) -> str | list[dict[str, Any]]:
    if not images:
        return prompt
    return [{"type": "text", "text": prompt}, *({"type": "image_url", "image_url": {"url": image_url(i)}} for i in images)]


def chat_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the chat API options ask for (None: not asked)."""
    fields: dict[str, Any] = {
        "seed": args.seed,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
    }
    if args.tools:
        tools = _read_json("--tools", args.tools)
        if not isinstance(tools, list):
            raise ChatInputError(f"--tools {args.tools}: must hold a JSON array of tool definitions")
        fields["tools"] = tools
    if args.tool_choice:
        choice = args.tool_choice
        fields["tool_choice"] = choice if choice in ("none", "auto", "required") else {
            "type": "function", "function": {"name": choice}}  # fmt: skip
    if args.json_schema and args.json_object:
        raise ChatInputError("--json-schema and --json-object: give one of them")
    if args.json_schema:
        schema = _read_json("--json-schema", args.json_schema)
        if not isinstance(schema, dict):
            raise ChatInputError(f"--json-schema {args.json_schema}: must hold a JSON schema object")
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(args.json_schema).stem)[:64] or "answer"
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                             "strict": True}}  # fmt: skip
    elif args.json_object:
        fields["response_format"] = {"type": "json_object"}
    return fields


def print_tool_calls(calls: list[ToolCall] | None) -> None:
    """The calls the model asked for, one JSON array on stdout (what a script reads)."""
    if calls:
        sys.stdout.write(msgspec.json.encode(calls).decode() + "\n")


def print_reasoning(text: str | None) -> None:
    if text:
        sys.stderr.write(f"[reasoning] {text.strip()}\n")
