"""The aiohttp application: the OpenAI-compatible endpoints over a connected `LloomClient`.

    app = make_app(client, config.gateway, admission=OPEN, extra_routes=[status_page.register])

Collaborators come in through the factory: the client (its NATS connection, catalogue and
trust), the `[gateway]` config, the `admission` seam (keys, rate limits, budgets;
executor/gateway/admission.py) and `extra_routes`, functions that add routes (the status
page plugs in there). The per-request path stays lean: one typed decode of the body, one
typed encode of the answer, no dicts, no logging at info.

Responses carry `X-Lloom-Job-Id` (also the response `id`, and what `/v1/generation`
takes), `X-Lloom-Executor` and `X-Lloom-Receipt` (`<executor id>#<receipt seq>`). A
stream's headers leave with its first chunk, which names the executor the queue group
picked (its last chunk names it again, in `provider`, once the receipt verified it); a
stream has no `X-Lloom-Receipt` (its receipt comes at the end).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal

from aiohttp import web

from executor.config import GatewayConfig
from executor.gateway import convert, dispatch, observe
from executor.gateway.admission import OPEN, Admission
from executor.gateway.errors import (
    BadRequestBody,
    BodyTooLarge,
    NotFound,
    RequestTimeout,
    error_body,
    error_response,
)
from executor.gateway.generation import Generations
from executor.gateway.guard import guard, header_token
from executor.gateway.models_list import model_cards, model_list
from executor.gateway.openai_types import ErrorBody, ErrorDetail, GenerationBody, encoder
from executor.gateway.routing import plan, split_suffix
from executor.gateway.sse import DONE, ChunkWriter, error_event
from protocol.client import DEFAULT_COMPLETION_ESTIMATE, LloomClient
from protocol.errors import LloomError
from protocol.estimate import estimate_tokens
from protocol.messages import ChatRequest, StreamChunk
from protocol.receipts import SignedReceipt

RouteRegistrar = Callable[[web.Application], None]
# Wraps every request (executor/gateway/observe.py `observed`: metrics and spans when telemetry is on).
Middleware = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]],
                      Awaitable[web.StreamResponse]]  # fmt: skip
JSON = "application/json"
CLIENT_KEY: web.AppKey[LloomClient] = web.AppKey("lloom_client", LloomClient)
_encode = encoder.encode


def _json(obj: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(obj), content_type=JSON, headers=headers)


def _reply_headers(job_id: str, executor: str | None, receipt: SignedReceipt | None) -> dict[str, str]:
    # Ids come from the network (a reply, an announcement): only well-formed ones become headers.
    headers = {"X-Lloom-Job-Id": job_id}
    if header_token(executor):
        headers["X-Lloom-Executor"] = executor  # type: ignore[assignment]
    if receipt is not None and header_token(receipt.receipt.executor_id):
        headers["X-Lloom-Receipt"] = f"{receipt.receipt.executor_id}#{receipt.receipt.seq}"
    return headers


async def relay(opened: dispatch.OpenedStream, encode: Callable[[StreamChunk], bytes],
                write: Callable[[bytes], Awaitable[None]]) -> None:  # fmt: skip
    """Copy a stream's chunks to the HTTP response, coalescing those that arrive together.

    A reader task takes chunks as they come (the chunks NATS delivered in one read come
    without a pause) and the writer sends whatever has gathered in one write: one syscall
    per burst instead of one per chunk, and no added wait (the writer runs as soon as the
    reader has to wait). Raises the stream's error after writing what came before it."""
    pending: list[bytes] = []
    ready = asyncio.Event()
    failed: list[Exception] = []
    finished = False

    async def read() -> None:
        nonlocal finished
        try:
            async for chunk in opened.chunks:
                pending.append(encode(chunk))
                ready.set()
        except Exception as e:  # the stream's typed error (or a bug): raised to the handler below
            failed.append(e)
        finally:
            finished = True
            ready.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if pending:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                await write(data)
            if finished and not pending:
                break
    finally:
        if not reader.done():
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    if failed:
        raise failed[0]


class Gateway:
    """The handlers and what they share."""

    def __init__(self, client: LloomClient, config: GatewayConfig, admission: Admission,
                 generations: Generations) -> None:  # fmt: skip
        self.client = client
        self.config = config
        self.admission = admission
        self.generations = generations
        self.timeout = config.default_timeout_secs

    async def _body(self, request: web.Request) -> bytes:
        try:
            if request.content.is_eof():  # all of it arrived with the headers (the usual case): no timer
                return await request.read()
            async with asyncio.timeout(self.config.body_timeout_secs):
                return await request.read()
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.config.body_timeout_secs:g} s"
                                 " ([gateway] body_timeout_secs)") from None  # fmt: skip
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"the request body is over the gateway's limit of {self.config.max_body_mb:g} MB"
                               " ([gateway] max_body_mb)") from None  # fmt: skip

    async def _estimate(self, job: ChatRequest) -> Decimal | None:
        if not self.admission.wants_estimate:
            return None
        prompt = sum(estimate_tokens(m.content) for m in job.messages)
        completion = job.max_tokens or job.max_completion_tokens or DEFAULT_COMPLETION_ESTIMATE
        costs = [o.pricing.cost(prompt, completion) for _, o in (await self.client.catalog()).offers(job.model)]
        return max(costs, default=Decimal(0))

    # -- chat --

    async def chat(self, request: web.Request) -> web.StreamResponse:
        model: str | None = None
        try:
            data = await self._body(request)
            grant = await self.admission.authorize(request)
            body = convert.decode_chat(data)
            model = body.model or (body.models[0] if body.models else None)
            if model is None:
                raise BadRequestBody("give `model` (or `models`, the models to try in order)", param="model")
            job = convert.chat_request(body, split_suffix(model)[0])
            observe.asked(job.model)
            route = plan(body, job)
            await self.admission.hold(grant, await self._estimate(job))
        except Exception as e:  # typed refusals; anything else is a 500 (logged by error_response)
            return error_response(e, model)
        receipt: SignedReceipt | None = None
        try:
            if body.stream:
                resp, receipt = await self._stream(request, body, route, job)
                return resp
            if route.direct and len(route.models) == 1:  # the fast path: the model's queue group
                reply = await self.client.complete(job, timeout=self.timeout)
            else:
                reply = await dispatch.complete(self.client, route, job, self.timeout)
            receipt = reply.receipt
            self.generations.remember(receipt)
            observe.answered(reply.usage)
            return _json(convert.chat_completion(reply), _reply_headers(reply.job_id, reply.executor_id, receipt))
        except LloomError as e:
            receipt = e.receipt if isinstance(e.receipt, SignedReceipt) else None
            return error_response(e, route.models[-1] if len(route.models) > 1 else model)
        finally:
            await self.admission.settle(grant, receipt)

    async def _stream(self, request: web.Request, body, route, job: ChatRequest,  # type: ignore[no-untyped-def]
                      ) -> tuple[web.StreamResponse, SignedReceipt | None]:  # fmt: skip
        """Relay a stream; the response and the receipt that bills it (None if it ended in an error)."""
        opened = await dispatch.open_stream(self.client, route, job, self.timeout)
        try:
            stream = opened.stream
            resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                **_reply_headers(stream.job_id, opened.target.executor or stream.executor, None),
            })  # fmt: skip
            await resp.prepare(request)
            writer = ChunkWriter(stream.job_id, opened.target.model)
            head = writer.role()
            if opened.first is not None:
                head += writer.chunk(opened.first)
            await resp.write(head)
            observe.first_chunk()
            try:
                await relay(opened, writer.chunk, resp.write)
            except LloomError as e:
                _, err, _ = error_body(e)
                await resp.write(error_event(err) + DONE)
                observe.stream_failed(err.error.code or "")
                receipt = e.receipt if isinstance(e.receipt, SignedReceipt) else None
                return resp, receipt
            end = stream.end
            assert end is not None
            self.generations.remember(end.receipt)
            observe.answered(end.usage)
            tail = writer.finish(end.finish_reason.value, end.executor_id)
            if body.stream_options is not None and body.stream_options.include_usage:
                tail += writer.usage(convert.usage_out(end.usage, end.receipt))
            await resp.write(tail + DONE)
            await resp.write_eof()
            return resp, end.receipt
        finally:
            await opened.aclose()

    # -- text completions and embeddings --

    async def completions(self, request: web.Request) -> web.Response:
        model = None
        grant = None
        receipt = None
        try:
            data = await self._body(request)
            grant = await self.admission.authorize(request)
            body = convert.decode_completion(data)
            model = body.model
            observe.asked(model)
            await self.admission.hold(grant, None)
            prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            reply = await self.client.complete_text(body.model, prompt, max_tokens=body.max_tokens,
                                                    temperature=body.temperature, top_p=body.top_p,
                                                    stop=convert.stop_list(body.stop), timeout=self.timeout)  # fmt: skip
            receipt = reply.receipt
            self.generations.remember(receipt)
            observe.answered(reply.usage)
            return _json(convert.text_completion(reply), _reply_headers(reply.job_id, reply.executor_id, receipt))
        except Exception as e:
            return error_response(e, model)
        finally:
            if grant is not None:
                await self.admission.settle(grant, receipt)

    async def embeddings(self, request: web.Request) -> web.Response:
        model = None
        grant = None
        receipt = None
        try:
            data = await self._body(request)
            grant = await self.admission.authorize(request)
            body = convert.decode_embedding(data)
            model = body.model
            observe.asked(model)
            await self.admission.hold(grant, None)
            inputs = [body.input] if isinstance(body.input, str) else body.input
            reply = await self.client.embed(body.model, inputs, dimensions=body.dimensions, timeout=self.timeout)
            receipt = reply.receipt
            self.generations.remember(receipt)
            observe.answered(reply.usage)
            return _json(convert.embedding_list(reply, body.encoding_format), _reply_headers(reply.job_id, reply.executor_id, receipt))
        except Exception as e:
            return error_response(e, model)
        finally:
            if grant is not None:
                await self.admission.settle(grant, receipt)

    # -- the catalogue and receipts --

    async def models(self, request: web.Request) -> web.Response:
        return _json(model_list(await self.client.catalog()))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["id"]
        for card in model_cards(await self.client.catalog()):
            if card.id == name:
                return _json(card)
        served = (await self.client.catalog()).model_names()
        return error_response(NotFound(f"no executor serves model {name!r} (served: {', '.join(served) or 'none'})",
                                       param="model"))  # fmt: skip

    async def generation(self, request: web.Request) -> web.Response:
        job_id = request.query.get("id", "")
        if not job_id:
            return error_response(BadRequestBody("give the generation's id: /v1/generation?id=...", param="id"))
        if header_token(job_id) is None:  # not a job id: no scan of the stream for it
            return error_response(BadRequestBody("a generation id is 1-64 characters of A-Z a-z 0-9 _ -", param="id"))
        try:
            found = await self.generations.find(job_id)
        except Exception as e:  # the stream unreachable: say so, typed
            return error_response(LloomError(f"cannot read the receipts stream: {e}"))
        if found is None:
            return error_response(NotFound(f"no receipt for generation {job_id!r} (yet: receipts reach the stream"
                                           " within seconds of the answer)", param="id"))  # fmt: skip
        return _json(GenerationBody(found))


async def _not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, content_type=JSON, body=_encode(ErrorBody(ErrorDetail(
        f"no such endpoint: {request.method} {request.path}", "invalid_request_error", "not_found"))))


def make_app(
    client: LloomClient,
    config: GatewayConfig,
    *,
    admission: Admission = OPEN,
    extra_routes: Iterable[RouteRegistrar] = (),
    generations: Generations | None = None,
    observer: Middleware | None = None,
) -> web.Application:
    # The observer (telemetry) is outermost, so refused requests are counted too.
    middlewares = [observer, guard(config)] if observer is not None else [guard(config)]
    app = web.Application(client_max_size=int(config.max_body_mb * 2**20), middlewares=middlewares)
    app[CLIENT_KEY] = client
    gw = Gateway(client, config, admission, generations or Generations(client.nc))
    app.router.add_post("/v1/chat/completions", gw.chat)
    app.router.add_post("/v1/completions", gw.completions)
    app.router.add_post("/v1/embeddings", gw.embeddings)
    app.router.add_get("/v1/models", gw.models)
    app.router.add_get("/v1/models/{id:.+}", gw.model)
    app.router.add_get("/v1/generation", gw.generation)
    for register in extra_routes:
        register(app)
    app.router.add_route("*", "/v1/{tail:.*}", _not_found)
    return app
