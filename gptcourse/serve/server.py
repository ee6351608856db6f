"""The server: a ChatServer runs the app of gptcourse.serve.app on uvicorn, in
a background thread, with an Engine (gptcourse.serve.engine) behind it.

Safety: without an API key the server listens on the loopback interface only
(this machine) and answers only requests whose ``Host`` header names it (a
web page cannot reach it through DNS rebinding); any other address needs a
key, checked before a model is loaded. uvicorn restarts its timer on every
byte, so a client sending one byte every few seconds would hold a connection
forever: `_DeadlineProtocol` adds a deadline for receiving a whole request.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
"""
import ipaddress
import json
import logging
import socket
import threading
import time

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..chat import ROLE_NAMES, SMOLLM2_SYSTEM, format_chat
from .app import ClientLimits, _Guard, build_app
from .engine import Engine
from .params import positive_int
from .prompt import model_scorer, prepare
from .protocol import error_body

log = logging.getLogger("gptcourse.serve")

MAX_TOKENS_CAP = 1024         # the most tokens one request may ask for
DEFAULT_MAX_TOKENS = 256      # when the request does not say
MAX_BODY_BYTES = 1 << 20      # 1 MiB of JSON per request
MAX_CONTEXT = 2048            # prompt + completion tokens of the real model (it has 8192)


class _DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with these additions:

    - a new connection must send its first byte within first_byte_timeout
      seconds (an idle connection holds nothing for long), and each whole
      request (headers and body) within request_timeout seconds of its first
      byte, else it is closed;
    - no more than max_connections connections in all, and no more than
      max_per_address from one address (so one client's idle connections cannot
      lock the others out): a connection over either cap gets a 503 in
      OpenAI's JSON shape, with Retry-After, and is closed.
    """
    request_timeout = 30.0
    first_byte_timeout = 5.0
    max_connections = 256
    max_per_address = 32

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline, self._seen_bytes = None, False
        peer = self.client[0] if self.client else None
        if len(self.connections) > self.max_connections:
            return self._refuse("the server has too many open connections")
        if peer is not None and sum(getattr(c, "client", None) is not None and c.client[0] == peer
                                    for c in self.connections) > self.max_per_address:
            return self._refuse(f"too many open connections from {peer} (at most {self.max_per_address})")
        self._deadline = self.loop.call_later(min(self.first_byte_timeout, self.request_timeout), self._too_slow)

    def _refuse(self, why):
        body = json.dumps(error_body(503, f"{why}; retry in a moment", code="too_many_connections")).encode()
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 1\r\nConnection: close\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.transport.close()

    def _start_deadline(self):
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _too_slow(self):
        self._deadline = None
        if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            log.info("closing a connection that did not send its request in time")
            self.transport.close()

    def data_received(self, data):
        if not self._seen_bytes:            # the first byte: now the whole request, in request_timeout
            self._seen_bytes = True
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
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


def api_key_list(api_key):
    """api_key (None, a key, or a list of keys, one per client) -> a tuple of keys;
    ValueError for a key that is not a string of at least 8 printable characters
    without spaces, or a key given twice."""
    keys = () if api_key is None else (api_key,) if isinstance(api_key, str) else api_key
    if not isinstance(keys, (list, tuple)) or (api_key is not None and not keys):
        raise ValueError(f"api_key must be a string or a non-empty list of strings, got {type(api_key).__name__}")
    for i, key in enumerate(keys):
        if not isinstance(key, str) or len(key) < 8 or not key.isprintable() or " " in key:
            raise ValueError(f"api_key must be a string of at least 8 printable characters without "
                             f"spaces (key #{i + 1} is not)")
    if len(set(keys)) != len(keys):
        raise ValueError("api_key: the same key is given twice; give each client its own")
    return tuple(keys)


def check_bind(host, api_key):
    """Refuse (ValueError) an address other machines may reach when there is no API key,
    and a key (or list of keys) that api_key_list refuses."""
    api_key = api_key_list(api_key) or None
    if api_key is None and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host!r}: that address may be reachable from other machines, "
            f"and without an API key anyone there could use this server. Use 127.0.0.1 (this "
            f"machine only), or set an API key (api_key=..., or for the command line "
            f"--api-key-file or the environment variable GPTCOURSE_API_KEY).")


def _check_model(model, tokenizer):
    """Whether model is the real chat model (a Llama, ChatML) rather than the course GPT;
    ValueError when it is neither, or its tokenizer cannot write its template."""
    from ..llama import Llama
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "blocks"):
        raise ValueError(f"model must be a gptcourse.gpt.GPT or gptcourse.llama.Llama, "
                         f"got {type(model).__name__}")
    if not model.config.causal:
        raise ValueError("model must be causal (a GPT) to write text")
    if isinstance(model, Llama):
        if "<|im_start|>" not in getattr(tokenizer, "special", {}):
            raise ValueError("a Llama model needs its ChatML tokenizer (gptcourse.llama.load_gguf)")
        return True
    try:
        tokenizer.encode(format_chat([{"role": r, "content": ""} for r in ROLE_NAMES]))
    except ValueError as e:
        raise ValueError(f"the tokenizer cannot encode the chat transcript format: {e}") from None
    return False


class ChatServer:
    """A running chat-completions server (see `serve`): .url, .port, .shutdown().

    A context manager: ``with serve(model, tok) as server: ...`` shuts it
    down at the end of the block. .engine is its gptcourse.serve.engine.Engine.
    """

    def __init__(self, model, tokenizer, host="127.0.0.1", port=0, model_name=None, api_key=None,
                 max_tokens_cap=MAX_TOKENS_CAP, default_max_tokens=DEFAULT_MAX_TOKENS,
                 max_body_bytes=MAX_BODY_BYTES, max_batch=16, max_context=MAX_CONTEXT,
                 max_step_tokens=256, prefix_cache_tokens=4096, max_waiting=64,
                 max_queue_seconds=60.0, max_client_requests=8, client_tokens_per_minute=200_000,
                 request_timeout=30.0, max_connections=256, max_connections_per_address=32,
                 default_system=SMOLLM2_SYSTEM,
                 log_requests=False):
        check_bind(host, api_key)
        self.chatml = _check_model(model, tokenizer)
        # "required" among several tools: the one whose name the model itself scores highest
        self._scorer = model_scorer(model) if self.chatml else None
        model_name = model_name or ("smollm2-135m-instruct" if self.chatml else "gptcourse-char")
        if not isinstance(model_name, str) or "/" in model_name:
            raise ValueError(f"model_name must be a non-empty string without '/', got {model_name!r}")
        for name, value in (("max_tokens_cap", max_tokens_cap), ("max_body_bytes", max_body_bytes),
                            ("default_max_tokens", default_max_tokens), ("max_batch", max_batch),
                            ("max_step_tokens", max_step_tokens), ("max_waiting", max_waiting),
                            ("max_context", max_context), ("max_connections", max_connections),
                            ("max_connections_per_address", max_connections_per_address)):
            positive_int(name, value)
        positive_int("prefix_cache_tokens", prefix_cache_tokens, least=0)
        if max_queue_seconds is not None and (isinstance(max_queue_seconds, bool)
                                              or not isinstance(max_queue_seconds, (int, float))
                                              or not 0 < max_queue_seconds < float("inf")):
            raise ValueError(f"max_queue_seconds must be a positive number of seconds or None, "
                             f"got {max_queue_seconds!r}")
        if not isinstance(request_timeout, (int, float)) or not request_timeout > 0:
            raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port must be an integer from 0 (any free port) to 65535, got {port!r}")
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_tokens_cap, self.default_max_tokens = max_tokens_cap, default_max_tokens
        self.max_body_bytes, self.api_key, self.max_context = max_body_bytes, api_key, max_context
        self.api_keys = api_key_list(api_key)
        self.limits = ClientLimits(max_client_requests, client_tokens_per_minute)
        self.default_system = default_system
        self.created = int(time.time())
        self._sock = self._bind(host, port)
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_step_tokens=max_step_tokens,
                             prefix_tokens=prefix_cache_tokens, max_waiting=max_waiting,
                             max_queue_seconds=max_queue_seconds, max_length=max_context if self.chatml else 1 << 30)
        self._start(request_timeout, max_connections, max_connections_per_address, log_requests)

    def _bind(self, host, port):
        """The listening socket; sets .host, .port, .url and the Host headers that name it."""
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
        return sock

    def _start(self, request_timeout, max_connections, max_per_address, log_requests):
        """uvicorn in a thread, on the socket; returns once it serves."""
        protocol = type("DeadlineProtocol", (_DeadlineProtocol,),
                        {"request_timeout": float(request_timeout), "max_connections": max_connections,
                         "max_per_address": max_per_address})
        self.app = _Guard(build_app(self), self)
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", access_log=log_requests,
                                log_level="info" if log_requests else "warning", timeout_keep_alive=5,
                                limit_concurrency=max_connections + 1,   # ours refuse first, in JSON
                                timeout_graceful_shutdown=2,
                                server_header=False, date_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.install_signal_handlers = lambda: None       # older uvicorn: not in a thread
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]},
                                        name=f"gptcourse.serve:{self.port}", daemon=True)
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

    def prepare(self, req, before_tokenizing=None):
        """A checked request -> a PreparedRequest (gptcourse.serve.prompt), in a worker thread.
        before_tokenizing(): called just before the messages are tokenized (the client's charge)."""
        return prepare(req, self.tokenizer, self.chatml, self.default_system, self.max_tokens_cap,
                       self.default_max_tokens, self.max_context, scorer=self._scorer,
                       before_tokenizing=before_tokenizing)

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
    api_key (None: no authentication, loopback only; a list of keys: one per
    client, each with its own limits and prefix-cache entries), max_batch (16
    sequences decoded together; 1: one at a time), max_step_tokens (256 new
    tokens per forward pass: a prompt longer than what is left of it is read
    in pieces), prefix_cache_tokens (4096: keys and values of recent
    conversations kept for prompts that start the same way; 0: none),
    max_tokens_cap (1024),
    default_max_tokens (256), max_context (2048 tokens, the real model),
    max_body_bytes (1 MiB), request_timeout (30 s to send a whole request;
    the first byte within 5 s of connecting), max_connections (256),
    max_connections_per_address (32), max_waiting (64 requests queued; one
    more gets 429), max_queue_seconds (60: a request queued longer gets 503
    with Retry-After; None: no limit), max_client_requests (8 requests in
    flight per client; one more gets 429), client_tokens_per_minute (200,000
    prompt + max_tokens per client per minute, unused ones refunded; over it,
    429 with Retry-After). A client is its API key when there are several
    keys, else its address. default_system (SmolLM2's system prompt),
    log_requests (False). Returns a running ChatServer.
    """
    return ChatServer(model, tokenizer, host=host, port=port, **options)
