"""A test double of an OpenAI-compatible chat server (the `/v1` dialect spoken by
LM Studio, vLLM, llama.cpp and Ollama), for fast protocol tests that must not
depend on a real model. It serves `GET /v1/models`, `GET /health`,
`POST /v1/embeddings` (deterministic vectors, inputs arrays, usage), the legacy
`POST /v1/completions` (prompt arrays, one choice per prompt, usage) and
`POST /v1/chat/completions` (plain JSON and SSE streaming) with the real wire
format (and, when set, the model descriptions llama-server, Ollama and LM Studio
give at the root: `GET /props`, `POST /api/show`, `GET /api/v0/models`), produces
deterministic content (`tok0 tok1 ...`) with exact usage
arithmetic, or a scripted answer (tool calls, reasoning: tests/doubles/openai_script.py),
log probabilities when asked, records what it was sent, refuses what
api.openai.com refuses (unknown arguments, malformed tools, messages, formats:
tests/doubles/openai_rules.py) with its error body, and can inject faults (HTTP errors,
stalls, slowness, connection resets, malformed or truncated bodies) one request
at a time or persistently. It depends only on the standard library, aiohttp and
msgspec so that it stays independent of the code it is used to test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from tests.doubles.openai_rules import COMPLETION_FIELDS, EMBEDDING_FIELDS, Refused, check_chat, check_fields
from tests.doubles.openai_script import Answer

FaultKind = Literal["status", "stall", "slow", "reset", "malformed_json", "wrong_shape",
                    "truncated", "malformed_sse", "no_usage"]


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour; build it with the classmethods, not directly."""

    kind: FaultKind
    code: int = 0
    message: str = ""
    # A tuple rather than a dict keeps the frozen dataclass hashable.
    headers: tuple[tuple[str, str], ...] = ()
    error_code: str | None = None
    delay_s: float = 0.0
    after_chunks: int = 0

    @classmethod
    def status(cls, code: int, message: str = "injected fault", *,
               headers: dict[str, str] | None = None,
               error_code: str | None = None) -> Fault:
        """Reply HTTP `code` with an OpenAI error object (and extra `headers`)."""
        return cls("status", code=code, message=message,
                   headers=tuple((headers or {}).items()), error_code=error_code)

    @classmethod
    def stall(cls) -> Fault:
        """Accept the request and never answer, until the client goes away."""
        return cls("stall")

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        """Wait `delay_s` before the response, or before every SSE event."""
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        return cls("slow", delay_s=delay_s)

    @classmethod
    def reset(cls, after_chunks: int = 0) -> Fault:
        """Abort the TCP connection (an RST), before any byte or after N content
        chunks of a stream; a non-stream request is always cut before any byte."""
        if after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")
        return cls("reset", after_chunks=after_chunks)

    @classmethod
    def malformed_json(cls) -> Fault:
        """200 with Content-Type application/json and a body that is not JSON."""
        return cls("malformed_json")

    @classmethod
    def wrong_shape(cls) -> Fault:
        """200 with valid JSON that is not a chat completion."""
        return cls("wrong_shape")

    @classmethod
    def truncated(cls) -> Fault:
        """200 announcing more Content-Length than is sent, then close."""
        return cls("truncated")

    @classmethod
    def malformed_sse(cls, after_chunks: int = 1) -> Fault:
        """In a stream, after N content chunks, slip in `data: {not json` and go on;
        a non-stream request gets the malformed_json treatment instead."""
        if after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")
        return cls("malformed_sse", after_chunks=after_chunks)

    @classmethod
    def no_usage(cls) -> Fault:
        """Answer normally but never report `usage`."""
        return cls("no_usage")


def embedding_of(text: str, dims: int) -> list[float]:
    """A deterministic unit-ish vector for `text` (so tests can check which vector is whose)."""
    digest = hashlib.sha256(text.encode()).digest() * (dims // 32 + 1)
    return [round(b / 255, 3) for b in digest[:dims]]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class _Exchange:
    """Per-request state the disconnect bookkeeping needs to see."""

    delay_s: float = 0.0
    # Set when the double itself closed the connection, so the resulting
    # cancellation is not mistaken for the client going away.
    self_closed: bool = False
    response: web.StreamResponse | None = None


def _error(status: int, message: str, code: str | None = None, *,
           headers: dict[str, str] | None = None) -> web.Response:
    # api.openai.com says "requests" in `type` for rate limits.
    type_ = ("requests" if status == 429 else
             "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.Response(status=status, headers=headers, content_type="application/json",
                        body=msgspec.json.encode(body))


def _words(content: Any) -> int:
    # Content is either a string or, in the multimodal form, a list of parts.
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_words(p.get("text")) for p in content if isinstance(p, dict))
    return 0


class OpenAIDouble:
    """An in-process OpenAI-compatible server; see the module docstring."""

    def __init__(
        self,
        models: Sequence[str] = ("double-model",),
        *,
        api_key: str | None = None,
        echo_key: bool = False,
        completion_tokens: int = 8,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.models: list[str] = list(models)
        self.api_key = api_key  # None: any key (or none) is accepted; may be changed while serving
        self.echo_key = echo_key
        self.completion_tokens = completion_tokens
        self.host = host
        self.port = port
        self.faults: list[Fault] = []
        self.fault: Fault | None = None
        self.requests: list[dict[str, Any]] = []
        # Scripted answers, one per chat request in order (tests/doubles/openai_script.py).
        self.answers: list[Answer] = []
        self.array_requests: list[dict[str, Any]] = []  # bodies of /v1/embeddings and /v1/completions
        self.request_headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.started = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnects = 0
        self.completed = 0
        # Inputs per /v1/embeddings call, in call order; `embed_delay_s` stands for the
        # forward pass (one per call, whatever its size: that is why batching pays).
        self.embedding_calls: list[int] = []
        self.text_calls: list[int] = []  # prompts per /v1/completions call
        self.text_call_temperatures: list[Any] = []  # and the temperature it asked for
        self.embed_delay_s = 0.0
        self.embed_dimensions = 8
        # Model descriptions at the server's root, as llama-server (`/props`), Ollama
        # (`/api/show`) and LM Studio (`/api/v0/models`) give them; None: 404, as vLLM.
        self.props: dict[str, Any] | None = None  # build with llama_props()
        self.ollama_capabilities: dict[str, list[str]] | None = None  # model -> /api/show `capabilities`
        self.lmstudio_models: list[dict[str, Any]] | None = None  # /api/v0/models `data`
        self.probe_calls: list[str] = []  # the paths of those asked, in order
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._runner is None:
            raise RuntimeError("OpenAIDouble is not started")
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        if self._runner is not None:
            return
        # Real servers take long prompts; aiohttp's default cap is only 1 MiB.
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/completions", self._text_completions)
        app.router.add_get("/health", self._health)
        self._add_probe_routes(app)
        # handler_cancellation turns a client disconnect into a CancelledError
        # inside the handler, which is how stalls and slow streams notice it.
        # The short shutdown timeout keeps stop() from waiting on stalls.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        self._stopping = False

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        for task in list(self._handlers):
            task.cancel()
        await runner.cleanup()

    async def __aenter__(self) -> OpenAIDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- plain endpoints ---------------------------------------------------

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or (
                request.headers.get("Authorization") == f"Bearer {self.api_key}"):
            return None
        if self.echo_key:  # as some servers do: the rejected key, in full, in the error body
            sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return _error(401, f"Incorrect API key provided: {sent}.", "invalid_api_key")
        return _error(401, "Incorrect API key provided.", "invalid_api_key")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _list_models(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "double"}
                for m in self.models]
        return web.Response(body=msgspec.json.encode({"object": "list", "data": data}),
                            content_type="application/json")

    # -- model descriptions (capability probes) ---------------------------

    def _add_probe_routes(self, app: web.Application) -> None:
        app.router.add_get("/props", self._props)
        app.router.add_post("/api/show", self._ollama_show)
        app.router.add_get("/api/v0/models", self._lmstudio_models)

    async def _props(self, request: web.Request) -> web.Response:
        self.probe_calls.append(request.path)
        if self.props is None:
            return _error(404, "File Not Found", "not_found")
        return web.json_response(self.props)

    async def _ollama_show(self, request: web.Request) -> web.Response:
        self.probe_calls.append(request.path)
        if self.ollama_capabilities is None:
            return _error(404, "page not found")
        try:
            name = msgspec.json.decode(await request.read()).get("model")
        except (msgspec.DecodeError, AttributeError):
            return web.json_response({"error": "invalid request"}, status=400)
        if name not in self.ollama_capabilities:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response({"modelfile": "", "details": {"format": "gguf"},
                                  "capabilities": self.ollama_capabilities[name]})

    async def _lmstudio_models(self, request: web.Request) -> web.Response:
        self.probe_calls.append(request.path)
        if self.lmstudio_models is None:
            return _error(404, "Unexpected endpoint or method.")
        return web.json_response({"object": "list", "data": self.lmstudio_models})

    # -- embeddings --------------------------------------------------------

    async def _array_request(self, request: web.Request, ex: _Exchange, field: str,
                             ) -> tuple[Any, list[str], Fault | None] | web.StreamResponse:
        """What the array endpoints share: faults, auth, a non-empty `field` of strings
        (items starting with REJECT are refused, for fault tests), a known model."""
        try:
            body: Any = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            body = None
        fault = self.faults.pop(0) if self.faults else self.fault
        if fault is not None and fault.kind == "status":
            return await self._finish(request, ex, _error(fault.code, fault.message, fault.error_code,
                                                          headers=dict(fault.headers)))
        if (denied := self._unauthorized(request)) is not None:
            return await self._finish(request, ex, denied)
        if isinstance(body, dict):
            self.array_requests.append(body)
            try:
                check_fields(body, EMBEDDING_FIELDS if field == "input" else COMPLETION_FIELDS)
            except Refused as e:
                return await self._finish(request, ex, _error(400, e.message))
        items = body.get(field) if isinstance(body, dict) else None
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not items or not all(isinstance(t, str) and t for t in items):
            return await self._finish(request, ex, _error(400, f"'{field}' must be a non-empty string or array of them."))
        if any(t.startswith("REJECT") for t in items):
            return await self._finish(request, ex, _error(400, f"This {field} is not allowed."))
        model = body.get("model")
        if model not in self.models:
            return await self._finish(request, ex, _error(404, f"The model '{model}' does not exist", "model_not_found"))
        if self.embed_delay_s:
            await asyncio.sleep(self.embed_delay_s)  # the behaviour: a forward pass that takes time
        return body, items, fault

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        ex = _Exchange()
        checked = await self._array_request(request, ex, "input")
        if isinstance(checked, web.StreamResponse):
            return checked
        body, inputs, fault = checked
        self.embedding_calls.append(len(inputs))
        dims = body.get("dimensions") or self.embed_dimensions
        data = [{"object": "embedding", "index": i, "embedding": embedding_of(text, dims)}
                for i, text in enumerate(inputs)]
        tokens = sum(_words(t) for t in inputs)
        payload: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if fault is None or fault.kind != "no_usage":
            payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return await self._finish(request, ex, web.Response(body=msgspec.json.encode(payload),
                                                            content_type="application/json"))

    async def _text_completions(self, request: web.Request) -> web.StreamResponse:
        """Legacy completions: each prompt's answer is `echo:<its first word>` then `tok1 ...`."""
        ex = _Exchange()
        checked = await self._array_request(request, ex, "prompt")
        if isinstance(checked, web.StreamResponse):
            return checked
        body, prompts, _ = checked
        self.text_calls.append(len(prompts))
        self.text_call_temperatures.append(body.get("temperature"))
        max_tokens = body.get("max_tokens")
        n = self.completion_tokens if max_tokens is None else min(self.completion_tokens, max_tokens)
        finish = "length" if max_tokens is not None and max_tokens < self.completion_tokens else "stop"
        choices = [{"index": i, "text": " ".join([f"echo:{p.split()[0]}"] + [f"tok{k}" for k in range(1, n)]),
                    "finish_reason": finish, "logprobs": None} for i, p in enumerate(prompts)]
        prompt_tokens = sum(_words(p) for p in prompts)
        payload = {"id": f"cmpl-double-{next(self._ids)}", "object": "text_completion", "created": int(time.time()),
                   "model": body["model"], "choices": choices,
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n * len(prompts),
                             "total_tokens": prompt_tokens + n * len(prompts)}}
        return await self._finish(request, ex, web.Response(body=msgspec.json.encode(payload),
                                                            content_type="application/json"))

    # -- chat completions --------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.in_flight += 1
        self.started.set()
        ex = _Exchange()
        try:
            return await self._serve_chat(request, ex)
        except asyncio.CancelledError:
            if not ex.self_closed and not self._stopping:
                self._note_disconnect()
            raise
        except ConnectionResetError:
            if not ex.self_closed:
                self._note_disconnect()
            # Raising would make aiohttp log a 500 traceback; handing back a
            # response lets it fail quietly on the dead transport instead.
            return ex.response or web.Response()
        finally:
            self.in_flight -= 1
            self._handlers.discard(task)

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def _serve_chat(self, request: web.Request, ex: _Exchange) -> web.StreamResponse:
        try:
            body: Any = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            body = None
        if isinstance(body, dict):
            self.requests.append(body)
            self.request_headers.append(dict(request.headers))

        # Faults that replace the answer come before auth and validation: they
        # stand for the server (or a proxy in front of it) failing whatever was
        # asked. The others distort an answer, so they need a valid request.
        fault = self.faults.pop(0) if self.faults else self.fault
        kind = fault.kind if fault else None
        stream = isinstance(body, dict) and body.get("stream") is True
        if fault is not None and kind == "slow":
            ex.delay_s = fault.delay_s
        if fault is not None and kind == "status":
            return await self._finish(request, ex, _error(
                fault.code, fault.message, fault.error_code, headers=dict(fault.headers)))
        if kind == "stall":
            await asyncio.get_running_loop().create_future()
        if kind == "malformed_json" or (kind == "malformed_sse" and not stream):
            return await self._finish(request, ex, web.Response(
                body=b'{"id": "x", "choices": [', content_type="application/json"))
        if kind == "wrong_shape":
            return await self._finish(request, ex, web.json_response({"hello": "world"}))
        if fault is not None and kind == "reset" and (fault.after_chunks == 0 or not stream):
            return self._abort(request, ex)
        if (denied := self._unauthorized(request)) is not None:
            return await self._finish(request, ex, denied)
        try:
            model, max_tokens = self._validate(body)
        except _BadRequest as err:
            return await self._finish(request, ex, _error(err.status, err.message, err.code))

        n = self.completion_tokens if max_tokens is None else min(self.completion_tokens,
                                                                  max_tokens)
        pieces = [f"tok{i} " for i in range(n)]
        cut_short = max_tokens is not None and max_tokens < self.completion_tokens
        finish = "length" if cut_short else "stop"
        answer = self.answers.pop(0) if self.answers else None
        reasoning: list[str] = []
        if answer is not None:
            pieces, reasoning, finish = answer.texts(pieces), answer.reasoning_pieces(), answer.finish(finish)
        prompt = sum(_words(m.get("content")) for m in body["messages"] if isinstance(m, dict))
        # Each streamed piece stands for a token, tool-call pieces included.
        n = len(pieces) + len(reasoning) + (len(answer.tool_pieces()) if answer is not None else 0)
        usage = None if kind == "no_usage" else {
            "prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if usage is not None and reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": len(reasoning)}
        logprobs = _logprobs(pieces, body.get("top_logprobs") or 0) if body.get("logprobs") else None
        head = {"id": f"chatcmpl-double-{next(self._ids)}", "created": int(time.time()),
                "model": model}

        if stream and kind != "truncated":
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, ex, fault, head, pieces, finish,
                                      usage, include_usage, answer, reasoning, logprobs)
        message = (answer.message("".join(pieces)) if answer is not None
                   else {"role": "assistant", "content": "".join(pieces)})
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs, "refusal": None}
        completion: dict[str, Any] = {"object": "chat.completion", **head, "choices": [choice]}
        if usage is not None:
            completion["usage"] = usage
        encoded = msgspec.json.encode(completion)
        if kind == "truncated":
            return await self._truncate(request, ex, encoded)
        return await self._finish(request, ex, web.Response(
            body=encoded, content_type="application/json"))

    def _validate(self, body: Any) -> tuple[str, int | None]:
        if not isinstance(body, dict):
            raise _BadRequest(400, "We could not parse the JSON body of your request.")
        try:
            check_chat(body)
        except Refused as e:
            raise _BadRequest(400, e.message) from None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(400, "'messages' must be a non-empty array.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(400, "You must provide a model parameter.")
        if model not in self.models:
            raise _BadRequest(404, f"The model '{model}' does not exist", "model_not_found")
        # Newer clients send max_completion_tokens instead of the deprecated name.
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (
                type(max_tokens) is not int or max_tokens < 1):  # bool is an int too
            raise _BadRequest(400, "'max_tokens' must be a positive integer.")
        return model, max_tokens

    async def _finish(self, request: web.Request, ex: _Exchange,
                      resp: web.StreamResponse) -> web.StreamResponse:
        # Sending it here rather than returning it to aiohttp lets a failed
        # write surface in _chat (as a disconnect) and keeps `completed` honest.
        if ex.delay_s:
            await asyncio.sleep(ex.delay_s)  # the behaviour: Fault.slow, a backend slow to answer
        ex.response = resp
        await resp.prepare(request)
        await resp.write_eof()
        self.completed += 1
        return resp

    def _abort(self, request: web.Request, ex: _Exchange) -> web.StreamResponse:
        ex.self_closed = True
        transport = request.transport
        assert transport is not None
        # Zero linger turns the close into a real RST instead of a polite FIN.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        # aiohttp fails to write this on the aborted transport and drops it
        # quietly (a ConnectionError in finish_response), with no traceback.
        return ex.response or web.Response()

    async def _truncate(self, request: web.Request, ex: _Exchange,
                        full: bytes) -> web.StreamResponse:
        resp = ex.response = web.StreamResponse()
        resp.content_type = "application/json"
        resp.content_length = len(full)
        await resp.prepare(request)
        await resp.write(full[: len(full) // 2])
        ex.self_closed = True
        assert request.transport is not None
        # close() rather than abort() so the partial body is flushed first.
        request.transport.close()
        return resp

    async def _stream(self, request: web.Request, ex: _Exchange, fault: Fault | None,
                      head: dict[str, Any], pieces: list[str], finish: str,
                      usage: dict[str, Any] | None, include_usage: bool, answer: Answer | None = None,
                      reasoning: Sequence[str] = (), logprobs: list[dict[str, Any]] | None = None,
                      ) -> web.StreamResponse:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            # With include_usage, OpenAI puts usage: null on every other chunk.
            usage_field = {"usage": None} if include_usage else {}
            return msgspec.json.encode({"object": "chat.completion.chunk", **head,
                                        "choices": choices, **usage_field, **extra})

        def delta(d: dict[str, Any], finish_reason: str | None = None, lp: Any = None) -> bytes:
            one: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish_reason}
            if lp is not None:
                one["logprobs"] = {"content": [lp], "refusal": None}
            return chunk([one])

        # The whole stream is planned up front so faults are just edits of it;
        # None marks where the connection gets reset.
        events: list[bytes | None] = [delta({"role": "assistant", "content": ""})]
        field = answer.reasoning_field if answer is not None else "reasoning_content"
        events += [delta({field: r}) for r in reasoning]
        events += [delta({"content": p}, lp=logprobs[i] if logprobs else None) for i, p in enumerate(pieces)]
        tool_pieces = answer.tool_pieces() if answer is not None else []
        events += [delta({"tool_calls": [p]}) for p in tool_pieces]
        if answer is not None and answer.cut_after_tool_pieces is not None:
            cut_at = len(events) - len(tool_pieces) + answer.cut_after_tool_pieces
            events[cut_at:] = [None]
        events.append(delta({}, finish))
        if include_usage and usage is not None:
            events.append(chunk([], usage=usage))
        events.append(b"[DONE]")
        if fault is not None and fault.kind in ("reset", "malformed_sse"):
            cut = 1 + min(fault.after_chunks, len(pieces))
            if fault.kind == "reset":
                events[cut:] = [None]
            else:
                events.insert(cut, b"{not json")

        resp = ex.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for event in events:
            if event is None:
                return self._abort(request, ex)
            if ex.delay_s:
                await asyncio.sleep(ex.delay_s)  # the behaviour: Fault.slow, a gap before every event
            await resp.write(b"data: " + event + b"\n\n")
        await resp.write_eof()
        self.completed += 1
        return resp


def _logprobs(pieces: Sequence[str], top: int) -> list[dict[str, Any]]:
    """Made-up but well-formed log probabilities, one per piece (each piece is a token here)."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [{**entry(p, -0.25), "top_logprobs": [entry(p, -0.25 * (k + 1)) for k in range(top)]} for p in pieces]


def llama_props(*, supports_tools: bool = False, vision: bool = False, thinking: bool = False,
                n_ctx: int = 4096) -> dict[str, Any]:
    """A `/props` answer shaped like llama-server's (fields as a real build returns them)."""
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    if thinking:
        template += "{% if enable_thinking %}<think>{% endif %}"
    return {
        "default_generation_settings": {"n_ctx": n_ctx, "params": {"reasoning_format": "none"}},
        "total_slots": 1,
        "model_alias": "double-model",
        "modalities": {"vision": vision, "video": False, "audio": False},
        "chat_template": template,
        "chat_template_caps": {"supports_tools": supports_tools, "supports_tool_calls": supports_tools,
                               "supports_parallel_tool_calls": False, "supports_system_role": True,
                               "supports_reasoning_effort": False, "supports_preserve_reasoning": False},
        "build_info": "b0-double",
    }


async def _serve(args: argparse.Namespace) -> None:
    models = [m for m in args.models.split(",") if m]
    async with OpenAIDouble(models, api_key=args.api_key, host=args.host, port=args.port,
                            completion_tokens=args.completion_tokens) as double:
        print(double.base_url, flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the OpenAI-compatible test double.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--models", default="double-model", help="comma-separated ids")
    parser.add_argument("--completion-tokens", type=int, default=8)
    parser.add_argument("--api-key", default=None)
    try:
        asyncio.run(_serve(parser.parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
