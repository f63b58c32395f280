"""A deliberately cheap OpenAI-wire-format backend for the benchmark (not a test double).

    python scripts/fast_openai_server.py --port 8001 --cpu 1 [--chunks 16] [--chunk-interval-ms 0]

Serves `GET /v1/models`, `POST /v1/embeddings` and `POST /v1/chat/completions` over HTTP/1.1 keep-alive:
a constant small completion, or with `"stream": true` an SSE stream of N chunks
(N = the request's `max_tokens` when given, else `--chunks`), optionally spaced
by `--chunk-interval-ms`, then a usage chunk when `stream_options.include_usage`,
then `data: [DONE]`. It prints `READY <port>` on stdout once it listens.

Embeddings and legacy completions (`POST /v1/completions`, prompt arrays)
stand for one accelerator: calls run one at a time, each taking
`--embed-call-ms` plus `--embed-input-ms` per input (a forward pass costs about
the same for one input as for a few); embeddings have `--embed-dims` floats.

It is a raw asyncio protocol on uvloop with pre-encoded responses, so that what
the benchmark measures is the relay in front of it and not this server: it
parses only the request line, Content-Length and the two JSON fields it needs.
Only stdlib, uvloop (optional) and msgspec (optional) are used, so it runs in
either venv; nothing from `tests/` is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable

try:
    import msgspec

    class _Opts(msgspec.Struct):
        include_usage: bool = False

    class _Req(msgspec.Struct):
        stream: bool = False
        max_tokens: int | None = None
        stream_options: _Opts | None = None

    _decode = msgspec.json.Decoder(_Req).decode

    def parse_body(body: bytes) -> tuple[bool, int | None, bool]:
        r = _decode(body)
        return r.stream, r.max_tokens, bool(r.stream_options and r.stream_options.include_usage)

except ImportError:  # the stdlib fallback is slower but equivalent

    def parse_body(body: bytes) -> tuple[bool, int | None, bool]:
        r = json.loads(body)
        opts = r.get("stream_options") or {}
        return bool(r.get("stream")), r.get("max_tokens"), bool(opts.get("include_usage"))


MODEL = "bench-model"
CONTENT = "Hello from the benchmark backend."


def _response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + body
    )  # fmt: skip


COMPLETION = _response(
    "200 OK",
    json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15},
        },
        separators=(",", ":"),
    ).encode(),
)
MODELS = _response(
    "200 OK", json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}).encode()
)
NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD_REQUEST = _response("400 Bad Request", b'{"error":{"message":"bad request","type":"invalid_request_error"}}')
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
)


def _sse(obj: dict) -> bytes:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    # One HTTP chunk per SSE event, as real servers send them.
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _chunk_obj(delta: dict, finish: str | None) -> dict:
    return {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }  # fmt: skip


FIRST = _sse(_chunk_obj({"role": "assistant", "content": "tok"}, None))
TOKEN = _sse(_chunk_obj({"content": "tok"}, None))
FINISH = _sse(_chunk_obj({}, "stop"))
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


def _usage_chunk(n: int) -> bytes:
    return _sse({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
        "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
    })  # fmt: skip


def _embeddings_body(n: int) -> bytes:
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{Device.vector}}}' for i in range(n))
    return (f'{{"object":"list","model":"{MODEL}","data":[{data}],'
            f'"usage":{{"prompt_tokens":{8 * n},"total_tokens":{8 * n}}}}}').encode()  # fmt: skip


def _texts_body(n: int) -> bytes:
    choices = ",".join(f'{{"index":{i},"text":"{CONTENT}","finish_reason":"stop"}}' for i in range(n))
    return (f'{{"object":"text_completion","model":"{MODEL}","choices":[{choices}],'
            f'"usage":{{"prompt_tokens":{8 * n},"completion_tokens":{8 * n},"total_tokens":{16 * n}}}}}').encode()  # fmt: skip


class Device:
    lock: asyncio.Lock
    call_s = 0.004
    input_s = 0.0001
    vector = "[]"
    calls = 0


class Http(asyncio.Protocol):
    """One keep-alive connection; requests are handled in order as they complete in the buffer."""

    chunks = 16
    interval = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""
        self.busy = False  # a paced stream is being written: later requests wait in buf

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"content-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i)
                length = int(lower[i + 15 : j if j >= 0 else len(lower)])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            if self._handle(line, body):
                return

    def _handle(self, line: bytes, body: bytes) -> bool:
        """Answer one request; True when the answer is paced and continues asynchronously."""
        for path, field, answer in ((b"/embeddings", "input", _embeddings_body), (b"/v1/completions", "prompt", _texts_body)):
            if line.startswith(b"POST ") and path in line:
                try:
                    items = json.loads(body)[field]
                    n = 1 if isinstance(items, str) else len(items)
                except Exception:
                    self.t.write(BAD_REQUEST)
                    return False
                self.busy = True
                asyncio.get_running_loop().create_task(self._device(n, answer))
                return True
        if line.startswith(b"POST ") and b"/chat/completions" in line:
            try:
                stream, max_tokens, usage = parse_body(body)
            except Exception:
                self.t.write(BAD_REQUEST)
                return False
            if not stream:
                self.t.write(COMPLETION)
                return False
            n = max_tokens or self.chunks
            if self.interval > 0:
                self.busy = True
                asyncio.get_running_loop().create_task(self._paced(n, usage))
                return True
            self.t.write(b"".join([STREAM_HEAD, FIRST, TOKEN * (n - 1), FINISH, _usage_chunk(n) if usage else b"", DONE]))
            return False
        if line.startswith(b"GET ") and b"/models" in line:
            self.t.write(MODELS)
        elif line.startswith(b"GET ") and b"/health" in line:
            self.t.write(_response("200 OK", b'{"status":"ok"}'))
        else:
            self.t.write(NOT_FOUND)
        return False

    async def _device(self, n: int, body: Callable[[int], bytes]) -> None:
        try:
            async with Device.lock:  # one forward pass at a time, as on one GPU
                await asyncio.sleep(Device.call_s + n * Device.input_s)
                Device.calls += 1
            if not self.t.is_closing():
                self.t.write(_response("200 OK", body(n)))
        finally:
            self.busy = False
        if self.buf and not self.t.is_closing():
            self._drain()

    async def _paced(self, n: int, usage: bool) -> None:
        try:
            self.t.write(STREAM_HEAD + FIRST)
            for _ in range(n - 1):
                await asyncio.sleep(self.interval)
                if self.t.is_closing():
                    return
                self.t.write(TOKEN)
            self.t.write(FINISH + (_usage_chunk(n) if usage else b"") + DONE)
        finally:
            self.busy = False
        if self.buf and not self.t.is_closing():
            self._drain()


async def main_async(args: argparse.Namespace) -> None:
    Http.chunks = args.chunks
    Http.interval = args.chunk_interval_ms / 1000.0
    Device.lock = asyncio.Lock()
    Device.call_s = args.embed_call_ms / 1000.0
    Device.input_s = args.embed_input_ms / 1000.0
    Device.vector = json.dumps([round((i % 17) / 17, 4) for i in range(args.embed_dims)], separators=(",", ":"))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, args.host, args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    p.add_argument("--chunks", type=int, default=16, help="stream length when the request has no max_tokens")
    p.add_argument("--chunk-interval-ms", type=float, default=0.0, help="pause between stream chunks (0: no pause)")
    p.add_argument("--embed-call-ms", type=float, default=4.0, help="time of one embeddings call (a forward pass)")
    p.add_argument("--embed-input-ms", type=float, default=0.1, help="added time per input in that call")
    p.add_argument("--embed-dims", type=int, default=384, help="floats per embedding")
    p.add_argument("--cpu", type=int, action="append", help="pin to this CPU (repeatable)")
    args = p.parse_args()
    if args.cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(args.cpu))
    try:
        import uvloop

        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
