"""The front end: the FastAPI application of a ChatServer.

    POST /v1/chat/completions   one completion, as JSON or as server-sent events
    GET  /v1/models             the one model served (and /v1/models/{id})
    GET  /health                200 while the server runs

`_Guard`, ASGI middleware before any endpoint, checks the Host header, the
API key and the body's size, and names the client (its API key when the
server has several, else its address). `ClientLimits` caps each client's
requests in flight and tokens per minute. A request is parsed
(gptcourse.serve.protocol), prepared in a worker thread
(gptcourse.serve.prompt), charged to its client, submitted to the engine as
a Sequence, and its events come back through an asyncio queue; a client
that leaves cancels its sequence at once, and every way a request ends
gives its client's slot back.
"""
import asyncio
import collections
import hmac
import json
import logging
import math
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .engine import EngineBusy, Sequence
from .params import positive_int
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
# Per-client limits
# ----------------------------------------------------------------------------

class ClientLimits:
    """Each client's requests in flight and tokens per minute.

    enter(client) -> a Slot, or APIError 429 (with Retry-After) when the
    client already has max_requests in flight. slot.charge(tokens) counts a
    request's prompt and most completion tokens against the client's
    tokens_per_minute (a sliding window of the last 60 s), or raises 429
    with Retry-After: the seconds until enough of the window has passed.
    slot.close(unused) refunds the tokens not used and gives the slot back
    (a second close does nothing). clock: seconds, for the tests.
    """
    window = 60.0

    def __init__(self, max_requests=8, tokens_per_minute=200_000, clock=time.monotonic):
        self.max_requests = positive_int("max_client_requests", max_requests)
        self.tokens_per_minute = positive_int("client_tokens_per_minute", tokens_per_minute)
        self.clock = clock
        self.lock = threading.Lock()
        self.in_flight = collections.Counter()                 # client -> requests in flight
        self.charges = collections.defaultdict(collections.deque)   # client -> [time, tokens] entries

    def enter(self, client):
        with self.lock:
            n = self.in_flight[client]
            if n >= self.max_requests:
                raise APIError(429, f"Rate limit reached for {client}: {n} requests in flight, at most "
                                    f"{self.max_requests} at a time. Wait for one to end.",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.in_flight[client] = n + 1
        return Slot(self, client)

    def used(self, client):
        """Tokens charged to client in the last 60 s (forgetting older charges)."""
        with self.lock:
            return self._used(client, self.clock())

    def _used(self, client, now):
        charges = self.charges[client]
        while charges and charges[0][0] <= now - self.window:
            charges.popleft()
        if not charges:
            del self.charges[client]
            return 0
        return sum(c[1] for c in charges)

    def _charge(self, client, tokens):
        limit = self.tokens_per_minute
        if tokens > limit:
            raise APIError(429, f"Request too large for {client}: {tokens} tokens (the prompt and "
                                f"max_tokens) is more than the limit of {limit} tokens per minute. "
                                f"Send a shorter prompt or a smaller max_tokens.",
                           code="rate_limit_exceeded", headers={"Retry-After": str(int(self.window))})
        with self.lock:
            now = self.clock()
            used = self._used(client, now)
            if used + tokens > limit:                          # wait until old charges leave the window
                freed, wait = 0, self.window
                for when, n in self.charges[client]:
                    freed += n
                    if used - freed + tokens <= limit:
                        wait = when + self.window - now
                        break
                wait = max(1, math.ceil(wait))
                raise APIError(429, f"Rate limit reached for {client}: {used} of {limit} tokens per "
                                    f"minute used, this request needs {tokens}. Please try again in "
                                    f"{wait} s.", code="rate_limit_exceeded",
                               headers={"Retry-After": str(wait)})
            entry = [now, tokens]
            self.charges[client].append(entry)
            return entry

    def _close(self, client, entry, unused):
        with self.lock:
            if entry is not None and unused > 0:
                entry[1] -= min(unused, entry[1])
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]

    def state(self):
        """What /health reports: clients with requests in flight, and those requests."""
        with self.lock:
            return {"clients_in_flight": len(self.in_flight), "client_requests_in_flight": sum(self.in_flight.values())}


class Slot:
    """One request's place in its client's limits (see ClientLimits). .seq: its
    Sequence once submitted; close() cancels it (a no-op once it has ended)."""

    def __init__(self, limits, client):
        self.limits, self.client = limits, client
        self.entry, self.tokens, self.seq, self.closed = None, 0, None, False
        self.reading = None

    def charge_reading(self, nbytes):
        """Before tokenizing (once a prompt has passed the checks that cost nothing,
        its size bound among them): reading the request is charged as nbytes // 4
        tokens (about what a tokenizer makes of text), or 429 before any work. A
        request refused once read (a bad message, the real count too long) keeps
        this charge: tokenizing
        a prompt at the size bound costs up to 0.7 s of CPU (PretrainedBPE.min_tokens),
        so a client cannot have it done over and over for free. A request that goes
        on pays its tokens instead (charge)."""
        self.reading = self.limits._charge(self.client, max(1, nbytes // 4))

    def charge(self, prompt_tokens, max_tokens):
        reading, held = self.reading, 0
        if reading is not None:                               # replaced by the request's own tokens
            with self.limits.lock:
                held, reading[1] = reading[1], 0
        try:
            self.entry = self.limits._charge(self.client, prompt_tokens + max_tokens)
        except APIError:
            if reading is not None:                           # refused: the reading stays charged
                with self.limits.lock:
                    reading[1] = held
            raise
        self.reading = None
        self.tokens, self.max_tokens = prompt_tokens + max_tokens, max_tokens

    def close(self):
        """Give the slot back; refund the tokens not used: all of them if the sequence was
        never read, else the completion tokens it did not write."""
        if self.closed:
            return
        self.closed = True
        seq = self.seq
        if seq is not None:
            seq.cancel()
        if seq is None or seq.admitted is None:
            unused = self.tokens
        else:
            unused = self.max_tokens - len(seq.tokens)
        self.limits._close(self.client, self.entry, unused)


# ----------------------------------------------------------------------------
# Before any endpoint: the host, the key, the body's size
# ----------------------------------------------------------------------------

class _Guard:
    """ASGI middleware, before any endpoint: the Host header, the API key and
    the body size (Content-Length, or counted as it arrives). The client's
    name for its limits goes into scope["gptcourse.client"]: "API key #i"
    when the server has several keys, else "address A"."""

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
        if not server.api_keys and not server.host_allowed(headers.get("host", "")):
            return (403, f"Host header {headers.get('host', '')!r} does not name this server; without "
                         f"an API key it answers only requests to {server.url}", "invalid_host")
        client = scope.get("client")
        scope["gptcourse.client"] = f"address {client[0] if client else 'unknown'}"
        if server.api_keys and scope["path"] != "/health":
            given, found = headers.get("authorization", "").encode("latin-1"), None
            for i, key in enumerate(server.api_keys):                 # every key compared: no early exit
                if hmac.compare_digest(given, f"Bearer {key}".encode()):
                    found = i
            if found is None:
                return 401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", "invalid_api_key"
            if len(server.api_keys) > 1:                             # one shared key names no one
                scope["gptcourse.client"] = f"API key #{found + 1}"
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
        return {"status": "ok", **server.engine.state(), **server.limits.state()}

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
    """POST /v1/chat/completions: take a slot of the client's limits, then answer.
    Whatever way the request ends (an answer, a refusal, an error, the client
    leaving, the task cancelled), the slot is given back: here, or by the
    streamed response once it is sent."""
    slot = server.limits.enter(request.scope.get("gptcourse.client", "address unknown"))
    try:
        response = await _answer(server, request, slot)
        if isinstance(response, _SlotStream):
            response.slot, slot = slot, None                  # the stream closes it once sent
        return response
    finally:
        if slot is not None:
            slot.close()


class _SlotStream(StreamingResponse):
    """A StreamingResponse that closes its Slot when it ends, however it ends
    (even when the stream never started)."""
    slot = None

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.slot is not None:
                self.slot.close()


async def _answer(server, request, slot):
    """Check, prepare, charge, submit; answer as JSON or a stream."""
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
    # tokenizing takes a while: charged to the client once the cheap checks have passed
    job = await run_in_threadpool(server.prepare, req, lambda: slot.charge_reading(len(raw)))
    slot.charge(len(job.prompt_ids), job.max_tokens)
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    def on_event(kind, data):                                 # from the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
        except RuntimeError:                                  # the event loop is closed
            pass

    # the prefix-cache tenant: the client and its salt, so no two clients share entries
    tenant = (slot.client, job.cache_salt)
    seq = Sequence(job.prompt_ids, job.max_tokens, on_event, params=job.sampling, cache_salt=tenant)
    try:
        server.engine.submit(seq)
    except EngineBusy as e:                                   # the queue is full: come back later
        raise APIError(429, f"The server is busy: {e}. Please retry after a short wait.",
                       code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) from None
    slot.seq = seq
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    if req.stream:
        return _SlotStream(_stream(request, seq, queue, job, head), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(request, seq, queue, job, head)


def _overloaded(seq, message):
    """The APIError of a sequence that waited past the engine's max_queue_seconds."""
    return APIError(503, f"{message}. Please retry after a short wait.", code="queue_timeout",
                    headers={"Retry-After": str(seq.retry_after)})


async def _whole(request, seq, queue, job, head):
    """The completion as one JSON response."""
    text, entries, finish, n_out = "", [], None, 0
    async for kind, data in _events(request, seq, queue):
        if kind == "text":
            text += data[0]
            entries += data[1]
        elif kind == "end":
            finish, n_out = data
        elif seq.expired:
            raise _overloaded(seq, data)
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
            e = _overloaded(seq, data) if seq.expired else APIError(500, data, code="generation_failed")
            yield _sse(error_body(e.status, e.message, code=e.code))
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
