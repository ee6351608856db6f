"""An OpenAI-compatible HTTP API for the course's GPT: chat completions on this machine.

A web API is a program that answers requests sent over HTTP. The
chat-completions API of OpenAI is one ``POST /v1/chat/completions`` whose
JSON body holds the conversation (``messages`` with roles) and the decoding
knobs (``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``,
``stream``); the answer is JSON with the assistant's message, why it stopped
(``finish_reason``) and how many tokens were read and written (``usage``),
which is what a paid service bills. This module serves any
``gptcourse.gpt.GPT`` behind the same two endpoints,

    POST /v1/chat/completions   one completion, as JSON or as server-sent events
    GET  /v1/models             the one model served

with the standard library only (``http.server``), so plain ``urllib`` and the
official ``openai`` client both talk to it unchanged::

    server = serve(model, tokenizer)          # http://127.0.0.1:<free port>
    ...                                       # requests to server.url + "/v1"
    server.shutdown()

or, from a shell, ``python -m gptcourse.serve`` (see ``--help``).

How a request becomes text: the messages are written into one transcript by
``gptcourse.chat.format_chat`` (ending with ``Assistant:``), encoded, and the
model continues it token by token exactly as ``GPT.generate`` does (the last
``block_size`` tokens are all it sees). Generation stops at ``max_tokens`` or
when the model starts a new turn (a newline and a role name, such as
``"\\nUser:"``) or writes one of the request's ``stop`` strings; neither is
returned. One model call runs at a time (a lock), so concurrent requests are
safe and take turns token by token.

Safety: the server has no authentication unless ``api_key`` is set, so it
listens on the loopback interface only (this machine) and refuses any other
address unless ``allow_remote=True``. Every request is validated; a bad one
gets a 4xx status and an OpenAI-style JSON error, never a traceback:

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
    >>> error_body(404, "no such model", param="model", code="model_not_found")
    {'error': {'message': 'no such model', 'type': 'not_found_error', 'param': 'model', 'code': 'model_not_found'}}
"""
import argparse
import hmac
import ipaddress
import json
import logging
import math
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from .chat import ROLE_NAMES, check_messages, format_chat

log = logging.getLogger("gptcourse.serve")

MAX_TOKENS_CAP = 512          # the most tokens one request may ask for
DEFAULT_MAX_TOKENS = 100      # when the request does not say
MAX_BODY_BYTES = 1 << 20      # 1 MiB of JSON per request
# A new turn starts with a newline and a role name: the model's answer is over.
TURN_STOPS = tuple(f"\n{name}:" for name in ROLE_NAMES.values())

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 411: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error"}
# Request fields this server understands; anything else is refused (as OpenAI does).
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "n", "stream", "stream_options", "stop", "seed", "user",
          "frequency_penalty", "presence_penalty", "logprobs"}


# ----------------------------------------------------------------------------
# Errors
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


# ----------------------------------------------------------------------------
# Checking a request
# ----------------------------------------------------------------------------

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_request(body, model_name, tokenizer, max_tokens_cap=MAX_TOKENS_CAP,
                  default_max_tokens=DEFAULT_MAX_TOKENS):
    """Check a chat-completions body (a dict); return the generation settings.

    Raises APIError (400, or 404 for a model this server does not serve)
    naming the offending field. Returns a dict with prompt_ids, max_tokens,
    temperature, top_p (None for 1), stop, seed, stream, include_usage.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}",
                       param=unknown[0], code="unknown_parameter")
    if "model" not in body:
        raise APIError(400, "missing required field 'model'", param="model")
    if not isinstance(body["model"], str):
        raise APIError(400, f"model must be a string, got {body['model']!r}", param="model")
    if body["model"] != model_name:
        raise APIError(404, f"The model {body['model']!r} does not exist; this server serves "
                            f"{model_name!r} (see GET /v1/models)",
                       param="model", code="model_not_found")
    if "messages" not in body:
        raise APIError(400, "missing required field 'messages'", param="messages")
    try:
        messages = check_messages(body["messages"])
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None

    # decoding knobs, with OpenAI's defaults and ranges
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both",
                       param="max_completion_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_tokens_cap)
    elif not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_cap:
        raise APIError(400, f"{name} must be an integer from 1 to {max_tokens_cap} on this server, "
                            f"got {max_tokens!r}", param=name)
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number from 0 to 2, got {temperature!r}",
                       param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(400, f"this server returns one choice per request: n must be 1, got {n!r}",
                       param="n")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 63):
        raise APIError(400, f"seed must be a non-negative integer below 2**63, got {seed!r}",
                       param="seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop must be a non-empty string or a list of up to 4 of them, "
                            f"got {body.get('stop')!r}", param="stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "stream_options must be {\"include_usage\": true|false} and needs "
                            "\"stream\": true", param="stream_options")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError(400, f"user must be a string, got {body['user']!r}", param="user")
    for field, neutral in (("frequency_penalty", 0), ("presence_penalty", 0), ("logprobs", False)):
        if body.get(field) not in (None, neutral):
            raise APIError(400, f"{field} is not supported by this server (only {neutral!r})",
                           param=field)

    # the transcript, in tokens; a character the model never saw cannot be encoded
    for i, m in enumerate(messages):
        try:
            tokenizer.encode(m["content"])
        except ValueError as e:
            raise APIError(400, f"messages[{i}].content: {e}; this model reads only the "
                                f"characters it was trained on",
                           param=f"messages[{i}].content", code="unsupported_character") from None
    prompt_ids = tokenizer.encode(format_chat(messages))
    return dict(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=float(temperature),
                top_p=None if top_p == 1 else float(top_p), stop=TURN_STOPS + tuple(stop or ()),
                seed=seed, stream=bool(stream),
                include_usage=bool(options and options.get("include_usage")))


# ----------------------------------------------------------------------------
# Generation, one token at a time
# ----------------------------------------------------------------------------

def generate_tokens(model, prompt_ids, max_new_tokens, temperature=1.0, top_p=None,
                    generator=None, lock=None):
    """Yield the ids of up to max_new_tokens new tokens, one at a time.

    The steps of ``model.generate(torch.tensor([prompt_ids]), ...)``
    (``GPT.stream``), so greedy decoding, or sampling with equally seeded
    generators, agrees exactly. Each model call holds `lock` (if given), so
    several threads can share one model.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)              # (1, T)
    steps = model.stream(idx, max_new_tokens, temperature, None, top_p, generator=generator)
    for _ in range(max_new_tokens):
        with lock or nullcontext():
            next_id = next(steps)
        yield next_id.item()


class Completion:
    """The assistant's answer being generated: iterate for the text in pieces.

    Pieces are released as soon as they cannot be the beginning of a stop
    string, so joined they are the returned text (stop string excluded).
    Afterwards: .text, .finish_reason ("stop" or "length") and
    .completion_tokens (every token generated, the stop string's included).
    """

    def __init__(self, model, tokenizer, prompt_ids, max_tokens, temperature=0.0, top_p=None,
                 stop=TURN_STOPS, seed=None, lock=None):
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, prompt_ids
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.stop, self.seed, self.lock = tuple(stop), seed, lock
        self.text, self.finish_reason, self.completion_tokens = "", None, 0

    def _generator(self):
        if self.temperature == 0:
            return None                                   # greedy: no randomness
        device = next(self.model.parameters()).device
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)

    def _held_back(self, text):
        """How many last characters of text could still grow into a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)

    def __iter__(self):
        generated, sent = "", 0
        tokens = generate_tokens(self.model, self.prompt_ids, self.max_tokens, self.temperature,
                                 self.top_p, self._generator(), self.lock)
        for token in tokens:
            self.completion_tokens += 1
            before = len(generated)
            generated += self.tokenizer.decode([token])
            found = [i for s in self.stop
                     if (i := generated.find(s, max(0, before - len(s) + 1))) >= 0]
            if found:
                self.text, self.finish_reason = generated[:min(found)], "stop"
                tokens.close()
                if len(self.text) > sent:
                    yield self.text[sent:]
                return
            safe = len(generated) - self._held_back(generated)
            if safe > sent:
                yield generated[sent:safe]
                sent = safe
        self.text, self.finish_reason = generated, "length"
        if len(generated) > sent:
            yield generated[sent:]


# ----------------------------------------------------------------------------
# The HTTP server
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
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's full DNS name, which can
        # stall on a machine without a network; the name is not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"                 # keep-alive, as clients expect
    default_request_version = "HTTP/1.0"          # answer even a garbled request line with
                                                  # a status line and headers
    server_version = "gptcourse"
    timeout = 30                                  # seconds a socket may stay silent

    # ---- plumbing -----------------------------------------------------------
    def log_message(self, format, *args):        # quiet: no request log in a notebook
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status, obj, headers=()):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_api_error(self, e, headers=()):
        self._discard_body()
        self.close_connection = True
        self._send_json(e.status, error_body(e.status, e.message, e.param, e.code), headers)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (bad request line, header too long) as JSON too
        self.close_connection = True
        self._body_read = True
        self._send_json(code, error_body(code, message or self.responses.get(code, ("error",))[0]))

    def _discard_body(self, limit=16 * MAX_BODY_BYTES):
        """Read an unread request body, so the client gets our answer, not a reset."""
        if getattr(self, "_body_read", True):
            return
        self._body_read = True
        try:
            n = int(self.headers.get("Content-Length", 0))
            while 0 < n <= limit:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except (ValueError, OSError):
            pass

    # ---- routing ----------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def __getattr__(self, name):                  # do_PUT, do_DELETE, ...: answered 405
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self):
        self._body_read = self._headers_sent = False
        app = self.server.app
        try:
            path = urlsplit(self.path).path.rstrip("/")
            if path == "/v1/chat/completions":
                allowed, handler = "POST", self._chat_completions
            elif path == "/v1/models":
                allowed, handler = "GET", self._models
            elif path.startswith("/v1/models/"):
                allowed, handler = "GET", lambda: self._model(path[len("/v1/models/"):])
            else:
                raise APIError(404, f"unknown path {path or '/'!r}: this server has "
                                    f"POST /v1/chat/completions and GET /v1/models",
                               code="unknown_url")
            if self.command != allowed:
                e = APIError(405, f"{path} takes {allowed}, not {self.command}")
                return self._send_api_error(e, headers=[("Allow", allowed)])
            if app.api_key is not None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {app.api_key}".encode()):
                    raise APIError(401, "missing or wrong API key (header "
                                        "'Authorization: Bearer <key>')", code="invalid_api_key")
            handler()
        except APIError as e:
            self._send_api_error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True          # the client went away
        except Exception:
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            if not self._headers_sent:
                self._send_json(500, error_body(500, "internal server error"))

    # ---- endpoints --------------------------------------------------------
    def _models(self):
        self._send_json(200, {"object": "list", "data": [self.server.app.model_card()]})

    def _model(self, name):
        app = self.server.app
        if name != app.model_name:
            raise APIError(404, f"The model {name!r} does not exist", param="model",
                           code="model_not_found")
        self._send_json(200, app.model_card())

    def _read_json(self):
        app = self.server.app
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"send the body as JSON with the header 'Content-Type: "
                                f"application/json' (got {ctype or 'none'!r})")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "send a Content-Length header (chunked bodies are not accepted)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "missing Content-Length header")
        try:
            length = int(length)
        except ValueError:
            raise APIError(400, f"bad Content-Length {length!r}") from None
        if length < 0:
            raise APIError(400, f"bad Content-Length {length!r}")
        if length > app.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes is larger than the limit of "
                                f"{app.max_body_bytes} bytes", code="request_too_large")
        raw = self.rfile.read(length)
        self._body_read = True
        if len(raw) < length:
            self.close_connection = True
            raise APIError(400, f"the body ended after {len(raw)} of {length} bytes")

        def no_constant(name):
            raise ValueError(f"{name} is not valid JSON")

        try:
            return json.loads(raw, parse_constant=no_constant)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e})",
                           code="invalid_json") from None

    def _chat_completions(self):
        app = self.server.app
        req = parse_request(self._read_json(), app.model_name, app.tokenizer,
                            app.max_tokens_cap, app.default_max_tokens)
        completion = Completion(app.model, app.tokenizer, req["prompt_ids"], req["max_tokens"],
                                req["temperature"], req["top_p"], req["stop"], req["seed"],
                                app.lock)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": app.model_name}
        prompt_tokens = len(req["prompt_ids"])
        if not req["stream"]:
            text = "".join(completion)
            self._send_json(200, {
                "id": head["id"], "object": "chat.completion", "created": head["created"],
                "model": app.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": completion.finish_reason}],
                "usage": usage(prompt_tokens, completion.completion_tokens)})
            return
        # server-sent events: one "data: {chunk}" event per piece, then [DONE]
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        extra = {"usage": None} if req["include_usage"] else {}

        def send(choices, **fields):
            chunk = {"id": head["id"], "object": "chat.completion.chunk",
                     "created": head["created"], "model": app.model_name,
                     "choices": choices, **extra, **fields}
            self.wfile.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        def choice(delta, finish_reason=None):
            return [{"index": 0, "delta": delta, "logprobs": None,
                     "finish_reason": finish_reason}]

        send(choice({"role": "assistant", "content": ""}))
        for piece in completion:
            send(choice({"content": piece}))
        send(choice({}, completion.finish_reason))
        if req["include_usage"]:
            send([], usage=usage(prompt_tokens, completion.completion_tokens))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def usage(prompt_tokens, completion_tokens):
    """The usage block of a response: what a paid API bills."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatServer:
    """A running chat-completions server (see `serve`): .url, .port, .shutdown().

    A context manager: ``with serve(model, tok) as server: ...`` shuts it
    down at the end of the block.
    """

    def __init__(self, model, tokenizer, host="127.0.0.1", port=0, model_name="gptcourse-char",
                 allow_remote=False, max_tokens_cap=MAX_TOKENS_CAP,
                 default_max_tokens=DEFAULT_MAX_TOKENS, max_body_bytes=MAX_BODY_BYTES,
                 api_key=None):
        if not hasattr(model, "config") or not hasattr(model, "blocks"):
            raise ValueError(f"model must be a gptcourse.gpt.GPT, got {type(model).__name__}")
        if not model.config.causal:
            raise ValueError("model must be causal (a GPT) to write text")
        try:
            tokenizer.encode(format_chat([{"role": r, "content": ""} for r in ROLE_NAMES]))
        except ValueError as e:
            raise ValueError(f"the tokenizer cannot encode the chat transcript format: {e}") from None
        if not isinstance(model_name, str) or not model_name or "/" in model_name:
            raise ValueError(f"model_name must be a non-empty string without '/', got {model_name!r}")
        for name, value in (("max_tokens_cap", max_tokens_cap), ("max_body_bytes", max_body_bytes),
                            ("default_max_tokens", default_max_tokens)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(port) or not 0 <= port < 65536:
            raise ValueError(f"port must be an integer from 0 (any free port) to 65535, got {port!r}")
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"refusing to listen on {host!r}: that address may be reachable from other "
                f"machines, and this server has no authentication by default. Use 127.0.0.1 "
                f"(this machine only), or pass allow_remote=True (--allow-remote) and an api_key.")
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_tokens_cap, self.default_max_tokens = max_tokens_cap, default_max_tokens
        self.max_body_bytes, self.api_key = max_body_bytes, api_key
        self.lock = threading.Lock()              # one model call at a time
        self.created = int(time.time())
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0] if host else None
        cls = _HTTPServer6 if family == socket.AF_INET6 else _HTTPServer
        self._httpd = cls((host, port), _Handler)
        self._httpd.app = self
        self.host, self.port = self._httpd.server_address[:2]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"gptcourse.serve:{self.port}", daemon=True)
        self._thread.start()

    def model_card(self):
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "gptcourse"}

    @property
    def running(self):
        return self._thread.is_alive()

    def shutdown(self):
        """Stop serving and close the listening socket (safe to call twice)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

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

    port=0 lets the operating system pick a free port (see .port / .url).
    options: model_name ("gptcourse-char"), allow_remote (False: loopback
    only), max_tokens_cap (512), default_max_tokens (100), max_body_bytes
    (1 MiB), api_key (None: no authentication). Returns a running ChatServer.
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gptcourse.serve",
        description="Serve the course's GPT behind an OpenAI-compatible API "
                    "(POST /v1/chat/completions, GET /v1/models).",
        epilog="Example: python -m gptcourse.serve --port 8000, then\n"
               "  curl http://127.0.0.1:8000/v1/chat/completions "
               "-H 'Content-Type: application/json' \\\n"
               "    -d '{\"model\": \"gptcourse-char\", \"max_tokens\": 40, "
               "\"messages\": [{\"role\": \"user\", \"content\": \"What is a list?\"}]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    parser.add_argument("--steps", type=int, default=600,
                        help="training steps when there is no checkpoint (default 600)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="load the model from PATH; if PATH does not exist, train and save it there")
    parser.add_argument("--model-name", default="gptcourse-char", help="the model's name in the API")
    parser.add_argument("--max-tokens-cap", type=int, default=MAX_TOKENS_CAP,
                        help=f"the most tokens one request may ask for (default {MAX_TOKENS_CAP})")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow an address other machines can reach (use with --api-key)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")

    from pathlib import Path
    from .chat import train_course_model

    if args.checkpoint and Path(args.checkpoint).exists():
        model, tokenizer = load_checkpoint(args.checkpoint, args.device)
        print(f"loaded {args.checkpoint}", flush=True)
    else:
        print(f"training the course model for {args.steps} steps...", flush=True)
        model, tokenizer, history = train_course_model(args.steps, device=args.device)
        print(f"val loss {history.val_loss[-1]:.2f}", flush=True)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, model, tokenizer)
            print(f"saved {args.checkpoint}", flush=True)
    try:
        server = serve(model, tokenizer, args.host, args.port, model_name=args.model_name,
                       allow_remote=args.allow_remote, max_tokens_cap=args.max_tokens_cap,
                       api_key=args.api_key)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"serving {args.model_name} at {server.url}/v1 (Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops it as cleanly as Ctrl-C
    server.wait()
    print("stopped", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
