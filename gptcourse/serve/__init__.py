"""An OpenAI-compatible chat API for the course's models, on FastAPI and uvicorn.

A web API is a program that answers requests sent over HTTP. OpenAI's
chat-completions API is one ``POST /v1/chat/completions`` whose JSON body
holds the conversation (``messages`` with roles) and the decoding knobs
(``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``,
``logprobs``, ``tools``, ``stream``); the answer is JSON with the
assistant's message, why it stopped (``finish_reason``) and how many tokens
were read and written (``usage``), which is what a paid service bills.
This package serves either model of the course behind the same endpoints::

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

The modules, split the way vLLM splits a server, a request passing through
them from top to bottom:

    protocol.py   the request: pydantic models of OpenAI's schema and its rules;
                  errors in OpenAI's shape (APIError, error_body, parse_request)
    app.py        the front end: the FastAPI app, the Host/key/size guard,
                  JSON answers and server-sent events
    server.py     ChatServer and serve(): uvicorn in a thread, a deadline for
                  receiving a request, loopback unless there is an API key
    prompt.py     a request -> PreparedRequest: the template, the tools, the
                  limits that depend on the model
    params.py     SamplingParams, what the engine reads; positive_int
    engine.py     the scheduler: Engine (continuous batching) and Sequence
    runner.py     the model runner: the rows of a batch (LlamaBatch, WindowBatch)
                  on gptcourse.batching's forward steps
    output.py     tokens -> what the client reads: text, stop strings,
                  logprobs, tool calls
    cli.py        ``python -m gptcourse.serve`` (__main__.py) and checkpoints

Each piece comes from a well-kept library rather than being hand-written
where one exists: HTTP (parsing, keep-alive, header size limits,
server-sent events) is uvicorn and Starlette, through FastAPI; checking a
request is pydantic. Special tokens are never made from message text, so
"<|im_start|>system" typed by a user cannot forge a turn.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
    >>> error_body(404, "no such model", param="model", code="model_not_found")
    {'error': {'message': 'no such model', 'type': 'not_found_error', 'param': 'model', 'code': 'model_not_found'}}
"""
try:
    import fastapi  # noqa: F401
    import h11  # noqa: F401
    import pydantic  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:                      # pragma: no cover
    raise ImportError(f"gptcourse.serve needs FastAPI, uvicorn and pydantic: "
                      f"pip install 'gptcourse[serve]' ({e})") from e

from .app import build_app, usage
from .cli import load_checkpoint, main, read_api_key, save_checkpoint
from .engine import Engine, Sequence
from .output import ContentBeforeCalls, TextOutput, assistant_message, logprob_entry, parse_tool_calls
from .params import SamplingParams, positive_int
from .prompt import (TOOLS_PROMPT, TURN_STOPS, PreparedRequest, chat_messages, completion_budget, offered_tools,
                     prepare, tool_prefill)
from .protocol import (ERROR_TYPES, MAX_STOP_CHARS, MAX_STOP_STRINGS, APIError, AssistantMessage,
                       ChatCompletionRequest, Content, DeveloperMessage, FunctionCall, FunctionDefinition, Message,
                       NamedFunction, NamedToolChoice, ResponseFormat, StreamOptions, SystemMessage, TextPart,
                       ToolDefinition, AssistantToolCall, ToolMessage, UserMessage, error_body, parse_request)
from .runner import LlamaBatch, WindowBatch, make_batch
from .server import (DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, MAX_CONTEXT, MAX_TOKENS_CAP, ChatServer, check_bind,
                     is_loopback, serve)
from ..sampling import StopMatcher

__all__ = ["APIError", "AssistantMessage", "ChatCompletionRequest", "ChatServer", "Content", "ContentBeforeCalls",
           "DEFAULT_MAX_TOKENS", "DeveloperMessage", "ERROR_TYPES", "Engine", "FunctionCall", "FunctionDefinition",
           "LlamaBatch", "MAX_BODY_BYTES", "MAX_CONTEXT", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "MAX_TOKENS_CAP",
           "Message", "NamedFunction", "NamedToolChoice", "PreparedRequest", "ResponseFormat", "SamplingParams",
           "Sequence", "StopMatcher", "StreamOptions", "SystemMessage", "TOOLS_PROMPT", "TURN_STOPS", "TextOutput",
           "TextPart", "ToolDefinition", "AssistantToolCall", "ToolMessage", "UserMessage", "WindowBatch", "assistant_message",
           "build_app", "chat_messages", "check_bind", "completion_budget", "error_body", "is_loopback",
           "load_checkpoint", "logprob_entry", "main", "make_batch", "offered_tools", "parse_request",
           "parse_tool_calls", "positive_int", "prepare", "read_api_key", "save_checkpoint", "serve",
           "tool_prefill", "usage"]
