"""The front end: the FastAPI application of a ChatServer.

    POST /v1/chat/completions   one completion, as JSON or as server-sent events
    GET  /v1/models             the one model served (and /v1/models/{id})
    GET  /health                200 while the server runs

`_Guard`, ASGI middleware before any endpoint, checks the Host header, the
API key and the body's size. A request is parsed (gptcourse.serve.protocol),
prepared in a worker thread (gptcourse.serve.prompt), submitted to the
engine as a Sequence, and its events come back through an asyncio queue; a
client that leaves cancels its sequence at once.
"""
import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .engine import EngineBusy, Sequence
from .output import ContentBeforeCalls, assistant_message
from .protocol import APIError, error_body, parse_request

log = logging.getLogger("gptcourse.serve")


def _error_response(status, message, param=None, code=None, headers=None):
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def usage(prompt_tokens, completion_tokens, cached_tokens=0):
    """The usage block of a response: what a paid API bills. cached_tokens: the
    prompt tokens whose keys and values came from the prefix cache (OpenAI
    bills them at a discount)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ----------------------------------------------------------------------------
# Before any endpoint: the host, the key, the body's size
# ----------------------------------------------------------------------------

class _Guard:
    """ASGI middleware, before any endpoint: the Host header, the API key and
    the body size (Content-Length, or counted as it arrives)."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message, code = refusal
            return await _error_response(status, message, code=code)(scope, receive, send)
        limit, received = self.server.max_body_bytes, 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(413, f"the request body is larger than the limit of {limit} bytes",
                                   code="request_too_large")
            return message

        return await self.app(scope, counted_receive, send)

    def _refusal(self, scope, headers):
        """(status, message, code) of a request refused before it is read, or None."""
        server = self.server
        if server.api_key is None and not server.host_allowed(headers.get("host", "")):
            return (403, f"Host header {headers.get('host', '')!r} does not name this server; without "
                         f"an API key it answers only requests to {server.url}", "invalid_host")
        if server.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {server.api_key}".encode()):
                return 401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", "invalid_api_key"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > server.max_body_bytes):
            return (413, f"the request body ({length} bytes) is larger than the limit of "
                         f"{server.max_body_bytes} bytes", "request_too_large")
        return None


# ----------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------

def _add_error_handlers(app):
    @app.exception_handler(APIError)
    async def _api_error(request, e):
        return _error_response(e.status, e.message, e.param, e.code, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        if e.status_code == 404:
            return _error_response(404, f"unknown path {request.url.path!r}: this server has POST "
                                        f"/v1/chat/completions and GET /v1/models", code="unknown_url")
        if e.status_code == 405:
            return _error_response(405, f"{request.url.path} does not take {request.method}",
                                   headers=e.headers)
        return _error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return _error_response(500, "internal server error")


def build_app(server):
    """The FastAPI application of a ChatServer."""
    app = FastAPI(title="gptcourse chat API", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.state()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != server.model_name:
            raise APIError(404, f"The model {name!r} does not exist", param="model", code="model_not_found")
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(server, request)

    return app


async def _complete(server, request):
    """POST /v1/chat/completions: check, prepare, submit; answer as JSON or a stream."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"send the body as JSON with the header 'Content-Type: application/json' "
                            f"(got {ctype or 'none'!r})")
    try:
        raw = await request.body()
    except ClientDisconnect:                                  # it left mid-body: no one to answer
        log.info("a client left while sending its request")
        return Response(status_code=400)
    req = parse_request(raw)
    if req.model != server.model_name:
        raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                            f"{server.model_name!r} (see GET /v1/models)", param="model",
                       code="model_not_found")
    job = await run_in_threadpool(server.prepare, req)        # tokenizing takes a while
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    def on_event(kind, data):                                 # from the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
        except RuntimeError:                                  # the event loop is closed
            pass

    seq = Sequence(job.prompt_ids, job.max_tokens, on_event, params=job.sampling, cache_salt=job.cache_salt)
    try:
        server.engine.submit(seq)
    except EngineBusy as e:                                   # the queue is full: come back later
        raise APIError(429, f"The server is busy: {e}. Please retry after a short wait.",
                       code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) from None
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    if req.stream:
        return StreamingResponse(_stream(request, seq, queue, job, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(request, seq, queue, job, head)


async def _whole(request, seq, queue, job, head):
    """The completion as one JSON response."""
    text, entries, finish, n_out = "", [], None, 0
    async for kind, data in _events(request, seq, queue):
        if kind == "text":
            text += data[0]
            entries += data[1]
        elif kind == "end":
            finish, n_out = data
        else:
            raise APIError(500, data, code="generation_failed")
    if finish is None:                                        # the client left
        return JSONResponse({}, status_code=499)
    message, finish = assistant_message(job, text, finish)
    return {"id": head["id"], "object": "chat.completion", "created": head["created"],
            "model": head["model"],
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": entries, "refusal": None} if job.logprobs else None,
                         "finish_reason": finish}],
            "usage": usage(len(job.prompt_ids), n_out, seq.cached_tokens)}


async def _disconnected(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _events(request, seq, queue):
    """The sequence's events as they come; the client leaving cancels it at once."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            kind, data = getter.result()
            yield kind, data
            if kind in ("end", "error"):
                return
    finally:
        watcher.cancel()
        seq.cancel()                                  # a no-op when it has ended


# ----------------------------------------------------------------------------
# Server-sent events
# ----------------------------------------------------------------------------

def _sse(obj):
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _chunk(head, choices, **extra):
    return _sse({"id": head["id"], "object": "chat.completion.chunk", "created": head["created"],
                 "model": head["model"], "choices": choices, **extra})


async def _stream(request, seq, queue, job, head):
    """Server-sent events: a role chunk, content chunks, a finish chunk, [usage], [DONE];
    a failure mid-stream is an error event in OpenAI's shape, then [DONE]."""
    extra = {"usage": None} if job.include_usage else {}

    def chunk(delta, finish=None, logprobs=None):
        return _chunk(head, [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra)

    yield chunk({"role": "assistant", "content": ""})
    buffered = bool(job.prefill)                      # the answer is a call: parsed from the whole text
    calls = ContentBeforeCalls() if job.tool_names and not buffered else None
    text, entries = "", []
    async for kind, data in _events(request, seq, queue):
        if kind == "text":
            piece, new = data
            if buffered:
                text += piece
                entries += new
                continue
            if calls is not None:
                piece = calls.feed(piece)
            if piece or new:
                yield chunk({"content": piece}, logprobs={"content": new, "refusal": None} if job.logprobs else None)
        elif kind == "error":
            yield _sse(error_body(500, data, code="generation_failed"))
            yield "data: [DONE]\n\n"
            return
        else:
            finish, n_out = data
            if buffered or calls is not None:
                message, finish = assistant_message(job, text if buffered else calls.text, finish)
                last = _last_delta(message, calls, entries if job.logprobs else None)
                if last is not None:
                    yield chunk(*last)
            yield chunk({}, finish)
            if job.include_usage:
                yield _chunk(head, [], usage=usage(len(job.prompt_ids), n_out, seq.cached_tokens))
            yield "data: [DONE]\n\n"
            return


def _last_delta(message, calls, entries):
    """With tools offered: (the delta, its logprobs) that ends the content and carries
    the calls parsed from the whole answer, or None when there is nothing to add.
    calls: the ContentBeforeCalls that streamed the content, or None when the
    whole answer was held back (a required call); entries: its logprob entries,
    None without logprobs."""
    buffered = calls is None
    delta = {"content": message["content"] if buffered else calls.rest(message["content"])}
    if "tool_calls" in message:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    if not (buffered or delta["content"] or "tool_calls" in delta):
        return None
    return delta, ({"content": entries, "refusal": None} if entries is not None and buffered else None)
