"""Tools: a language model that calls a calculator, and the loop that runs it.

ChatGPT plugins (2023) and today's function calling rest on one loop:

    1. the model writes a *call*, in a fixed syntax, instead of an answer;
    2. the program parses the call and runs the tool;
    3. the tool's result is appended to the context;
    4. the model reads it and writes the answer.

The course's syntax, one text per question, one character per token:

    Q: What is 48213 times 937?
    A: <calc>48213*937</calc>[45175581] 45175581

The model writes everything after "A: " except the bracketed result, which
the program inserts after running the call. The calculator is safe: a tiny
parser for integers, + - * and parentheses, never ``eval``.

    >>> calculate("48213*937")
    45175581
    >>> parse_call("<calc>2+3*4</calc>")
    ToolCall(name='calc', argument='2+3*4', args=('+', 2, ('*', 3, 4)))
    >>> parse_call("<calc>2+3</calc")
    Traceback (most recent call last):
    ...
    ValueError: a call must end with '</calc>', got '<calc>2+3</calc'
"""

import re
from dataclasses import dataclass, field

import torch

from .calculator import (CALCULATOR, MAX_EXPRESSION_CHARS, MAX_NUMBER_DIGITS, MAX_RESULT_DIGITS,  # noqa: F401
                         TOOLS, Tool, ToolCall, calculate, evaluate, parse_call, parse_expression)
from .sampling import TextDecoder, decode, end_of_turn_ids, model_step, sample_next
from .tool_task import (ALPHABET, MAX_DIGITS, TEMPLATES, Problem, encode_examples, example_batches,  # noqa: F401
                        format_example, format_prompt, make_problems, make_tokenizer, tool_data,
                        tool_model_config, train_tool_model)

# ----------------------------------------------------------------------------
# The tool loop
# ----------------------------------------------------------------------------

@dataclass
class ToolRun:
    """What happened for one question.

    segments: the transcript as (who, text) pairs, who in {"prompt", "model", "tool"};
    calls: (call text as written, result text fed back) for every call;
    answer: the final answer (None if the model did not finish);
    stop: why the loop stopped: "answered", "too many calls", "too long", "context full".
    """
    question: str
    segments: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    answer: str = None
    stop: str = ""

    @property
    def text(self):
        return "".join(text for _, text in self.segments)

    def _add(self, who, text):
        if self.segments and self.segments[-1][0] == who:
            self.segments[-1] = (who, self.segments[-1][1] + text)
        else:
            self.segments.append((who, text))

    def called(self, call, result):
        """Record a call and its bracketed result "[...]"; returns the result."""
        self.calls.append((call, result[1:-1]))
        self._add("tool", result)
        return result


def _check_loop_args(max_calls, max_new_tokens):
    if not isinstance(max_calls, int) or max_calls < 0:
        raise ValueError(f"max_calls must be a non-negative integer, got {max_calls!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def _one_call_too_many(run, call, max_calls):
    """True (and the run stops) when run already made max_calls calls."""
    if len(run.calls) < max_calls:
        return False
    run.calls.append((call, None))
    run.stop = "too many calls"
    return True


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def greedy_next(model, ids):
    """The most likely next token id after the list `ids` (the last block_size of them)."""
    idx = torch.tensor([ids], dtype=torch.long, device=_device_of(model))
    return int(sample_next(model_step(model, use_cache=False)(idx), temperature=0))


def tool_result(call_text, tools):
    """Run one call written by the model; the text to feed back, errors included.

    Never raises for a str: a malformed call or a failing tool gives
    'error: ...' as the result, which the model then reads.
    """
    try:
        call = parse_call(call_text, tools)
        return str(tools[call.name].run(call.args))
    except Exception as e:   # a tool must never crash the loop
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return f"error: {message}"


def sanitize_result(text, tokenizer=None, max_chars=40):
    """Tool output as the model may see it: one line, no '[', ']', '<', '>'
    (so a result can never close its brackets or open a call of its own),
    at most max_chars. tokenizer: a character-level model's, whose unknown
    characters become '?' too; None: a chat model's rule, which also drops
    '|' and '\\r' (no special-token markup such as <|im_end|>)."""
    banned = "[]<>\n" if tokenizer is not None else "[]<>|\n\r"
    safe = "".join("?" if c in banned or (tokenizer is not None and c not in tokenizer.stoi) else c
                   for c in str(text))
    return safe if len(safe) <= max_chars else safe[:max_chars - 3] + "..."


def answer_of(line):
    """The final answer in the line the model wrote: what follows the last
    tool result ']' or call '</name>' (or the whole line), stripped.

    >>> answer_of("<calc>6*7</calc>[42] 42"), answer_of("<calc>6*7</calc>41")
    ('42', '41')
    """
    return re.split(r"[\]>]", line)[-1].strip()


def run_tool_loop(model, tokenizer, question, tools=None, *, use_tools=True, max_calls=2,
                  max_new_tokens=64, max_call_chars=48):
    """Answer `question` with greedy decoding, running the tools the model calls.

    The model writes one character at a time after format_prompt(question).
    A call starts at '<' and ends at its second '>' (the end of '</name>'),
    at a newline, or after max_call_chars characters. With use_tools=True
    the program then parses and runs it and appends '[result]' (or
    '[error: ...]') to the context, and the model goes on. With
    use_tools=False nothing is run or appended: the model must write the
    result itself. The answer ends at a newline.

    Stops after max_new_tokens characters written by the model, or when the
    model makes more than max_calls calls. Returns a ToolRun.
    """
    tools = TOOLS if tools is None else tools
    _check_loop_args(max_calls, max_new_tokens)
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    run = ToolRun(question)
    prompt = format_prompt(question)
    run._add("prompt", prompt)
    ids = tokenizer.encode(prompt)
    device = _device_of(model)
    step = model_step(model, use_cache=False)   # the model's own forward pass over the last block_size
    steps = decode(step, torch.tensor([ids], device=device), max_new_tokens, temperature=0)
    # the answer line so far (tool results included), where its open call starts, tokens written
    line, call_start, written = "", None, 0
    while True:
        if written >= max_new_tokens:
            run.stop = "too long"
            return run
        if block_size is not None and len(ids) > block_size:
            run.stop = "context full"
            return run
        next_id = int(next(steps))
        char = tokenizer.decode([next_id])
        ids.append(next_id)
        written += 1
        line += char
        run._add("model", char)
        if call_start is None:
            if char == "\n":
                run.answer, run.stop = answer_of(line[:-1]), "answered"
                return run
            if char == "<" and use_tools:
                call_start = len(line) - 1
            continue
        call = line[call_start:]
        if not (call.count(">") == 2 or char == "\n" or len(call) >= max_call_chars):
            continue
        call_start = None
        if _one_call_too_many(run, call, max_calls):
            return run
        result = run.called(call, "[" + sanitize_result(tool_result(call, tools), tokenizer) + "]")
        result_ids = tokenizer.encode(result)
        ids.extend(result_ids)
        line += result
        # the loop goes on: the step reads the last token and the result, then writes
        steps = decode(step, torch.tensor([[next_id, *result_ids]], device=device),
                       max_new_tokens - written, temperature=0)


def accuracy(model, tokenizer, problems, tools=None, use_tools=True):
    """Fraction of problems answered exactly right, and the list of hits (bools)."""
    hits = [run_tool_loop(model, tokenizer, p.question, tools, use_tools=use_tools).answer
            == str(p.answer) for p in problems]
    return sum(hits) / max(1, len(hits)), hits


# ----------------------------------------------------------------------------
# The same loop on a real chat model (ChatML, gptcourse.llama)
# ----------------------------------------------------------------------------

# What tells a chat model about the calculator: a system message, and two worked
# examples as earlier turns (a 135M model follows examples far better than instructions).
CHAT_TOOL_SYSTEM = ("You can use a calculator: write <calc>EXPRESSION</calc> with integers, + - * "
                    "and parentheses, and the result appears in brackets.")
CHAT_TOOL_EXAMPLES = [
    {"role": "user", "content": "What is 12 times 34?"},
    {"role": "assistant", "content": "<calc>12*34</calc>[408] 12 times 34 is 408."},
    {"role": "user", "content": "How much is 500 + 250?"},
    {"role": "assistant", "content": "<calc>500+250</calc>[750] 500 + 250 is 750."},
]


def _clean_result(text, max_chars=40):
    """A tool result as a chat model may read it: sanitize_result's chat rule."""
    return sanitize_result(text, None, max_chars)


@torch.no_grad()
def chat_tool_loop(model, tokenizer, messages, tools=None, *, use_tools=True, max_calls=2,
                   max_new_tokens=48, max_call_chars=48):
    """run_tool_loop for a chat model: answer the conversation `messages`,
    running the tools the model calls, with the course's call syntax.

    The model (e.g. gptcourse.llama.load_gguf()) writes its turn after the
    ChatML prompt (gptcourse.chat.encode_chatml), greedily. A call starts at
    '<' and ends with '</name>', a newline or max_call_chars characters; the
    program then runs it (parse_call: malformed calls and unknown tools give
    'error: ...') and appends '[result]' to the assistant's turn, encoded as
    plain text (no special tokens), and the model goes on from its KV cache.
    The turn ends at an end-of-turn token (gptcourse.sampling.end_of_turn_ids:
    <|im_end|>, or any special token). Returns a ToolRun whose answer is the
    text after the last result (or the whole turn when there was no call).
    """
    from .chat import encode_chatml, format_chatml
    tools = TOOLS if tools is None else tools
    _check_loop_args(max_calls, max_new_tokens)
    if "<|im_end|>" not in tokenizer.special:
        raise ValueError("the tokenizer has no <|im_end|> token: chat_tool_loop needs a ChatML model")
    end = end_of_turn_ids(tokenizer)
    run = ToolRun(messages[-1]["content"])
    run._add("prompt", format_chatml(messages))
    prompt_ids = encode_chatml(messages, tokenizer)    # no special token from the messages' text
    device = _device_of(model)
    step = model_step(model)                           # the KV cache, kept across tool calls
    read = list(prompt_ids)                            # the tokens the step has read or will read next
    steps = decode(step, torch.tensor([prompt_ids], device=device), max_new_tokens, temperature=0)
    turn, text, call_start, written = "", TextDecoder(tokenizer), None, 0
    while True:
        next_id = next(steps, None)
        if next_id is None or written >= max_new_tokens:
            run.stop = "too long"
            return run
        token = int(next_id[0, 0])
        written += 1
        if token in end:
            run.answer, run.stop = answer_of(turn), "answered"
            return run
        read.append(token)
        piece = text.piece(token)
        if not piece:                                  # an unfinished UTF-8 character
            continue
        turn += piece
        run._add("model", piece)
        if call_start is None:
            if "<" in piece and use_tools:
                call_start = turn.rindex("<")
            else:
                continue
        call = _finished_call(turn[call_start:], max_call_chars)
        if call is None:
            continue
        call_start, turn = None, turn[:call_start] + call
        if _one_call_too_many(run, call, max_calls):
            return run
        turn += run.called(call, "[" + sanitize_result(tool_result(call.strip(), tools)) + "]")
        # the turn so far as text (the result holds no markup), encoded
        ids = prompt_ids + tokenizer.encode(turn, allow_special=False)
        steps, read = _go_on(model, step, read, ids, max_new_tokens - written, device), ids
        text = TextDecoder(tokenizer)


def _finished_call(call, max_call_chars):
    """The text of a call once it is finished, else None: up to '</name>' (anything
    after it is dropped), or with a newline, or max_call_chars characters long."""
    closed = re.search(r"</[a-z_]+>", call)
    if closed:
        return call[:closed.end()]
    return call if "\n" in call or len(call) >= max_call_chars else None


def _go_on(model, step, read, ids, max_new_tokens, device):
    """decode() from `ids`: from the KV cache of `step`, which holds read[:-1]
    (the last token it wrote is not read yet), when ids continue read; else
    with a fresh cache from the whole of ids."""
    if ids[:len(read)] == read:
        return decode(step, torch.tensor([ids[len(read) - 1:]], device=device), max_new_tokens, temperature=0)
    return decode(model_step(model), torch.tensor([ids], device=device), max_new_tokens, temperature=0)


# ----------------------------------------------------------------------------
# Many questions at once: batched greedy decoding for a chat model
# ----------------------------------------------------------------------------

@torch.no_grad()
def greedy_batch(model, prompts, max_new_tokens, stop_ids=(), stop=None, tokenizer=None, memory=None):
    """Greedy continuations of many prompts, decoded together (a gptcourse.llama.Llama).

    prompts: n lists of token ids (None: a row that sits this call out).
    Their longest common beginning (a shared system message and examples) is
    read once, in one row, and its keys and values are copied to every row;
    then every row reads the rest of its prompt, all rows in one forward pass
    (gptcourse.batching.llama_step), and each later step decodes one token for
    every row still running. A row stops at a token of stop_ids (not kept),
    once its decoded text contains the string `stop` (kept; needs the
    tokenizer), or after max_new_tokens. Returns n lists of new token ids:
    those of greedy decoding one prompt at a time (tests/test_tools.py).

    memory: a dict that keeps the rows' keys and values (and their tokens)
    after the call. A later call with the same dict and as many prompts reads
    each prompt only from where it departs from what its row already holds:
    the second turn of a conversation costs only its new tokens.
    """
    from .batching import llama_step
    if not prompts or any(p is not None and (not isinstance(p, (list, tuple)) or len(p) < 1)
                          for p in prompts) or all(p is None for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists (or None)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if stop is not None and tokenizer is None:
        raise ValueError("stop needs the tokenizer (to decode each row's text)")
    n = len(prompts)
    live = [r for r in range(n) if prompts[r] is not None]
    longest = max(len(prompts[r]) for r in live) + max_new_tokens
    if longest > model.config.block_size:
        raise ValueError(f"a prompt and its {max_new_tokens} new tokens need {longest} positions; "
                         f"the model has {model.config.block_size}")
    model.eval()
    cache, held, chunks = _batch_cache(model, prompts, live, memory, longest)
    new = [[] for _ in range(n)]
    running = [r in live for r in range(n)]
    stop_ids = set(stop_ids)
    for _ in range(max_new_tokens):
        tokens = sample_next(llama_step(model, chunks, cache), temperature=0)[:, 0].tolist()   # (n,)
        chunks = [[] for _ in range(n)]
        for r in range(n):
            if not running[r]:
                continue
            if tokens[r] in stop_ids:
                running[r] = False
                continue
            new[r].append(tokens[r])
            if stop is not None and stop in tokenizer.decode(new[r]):
                running[r] = False
            elif len(new[r]) < max_new_tokens:
                chunks[r] = [tokens[r]]
                held[r].append(tokens[r])
            else:
                running[r] = False
        if not any(chunks):
            break
    if memory is not None:
        memory["cache"], memory["ids"] = cache, held
    return new


def _batch_cache(model, prompts, live, memory, longest):
    """greedy_batch's RaggedKVCache (room for `longest` tokens a row), the tokens
    each row holds, and the chunk of its prompt each row reads first: from
    where the prompt departs from what the row holds (memory's tokens, or the
    live prompts' longest common beginning, read once in one row and copied)."""
    from .batching import common_prefix
    held = memory.get("ids") if memory is not None else None
    if held is not None and len(held) != len(prompts):
        raise ValueError(f"memory holds {len(held)} rows, but {len(prompts)} prompts were given")
    cache, held = (memory["cache"], held) if held is not None else _shared_prefix_cache(model, prompts, live)
    cache.reserve(longest)
    chunks = [[] for _ in prompts]
    for r in live:
        same = min(common_prefix([held[r], prompts[r]]), len(prompts[r]) - 1)
        cache.lengths[r] = same
        held[r] = list(prompts[r])
        chunks[r] = list(prompts[r][same:])
    return cache, held, chunks


def _shared_prefix_cache(model, prompts, live):
    from .batching import RaggedKVCache, common_prefix, llama_step
    config, n = model.config, len(prompts)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    cache = RaggedKVCache(config.n_layer, n, config.n_kv_head, config.head_size, config.block_size,
                          dtype=dtype, device=device)
    held = [[] for _ in range(n)]
    first = [prompts[r] for r in live]
    shared = min(common_prefix(first), min(map(len, first)) - 1)   # leaving each row >= 1 token
    if shared:
        one = RaggedKVCache(config.n_layer, 1, config.n_kv_head, config.head_size, shared,
                            dtype=dtype, device=device)
        llama_step(model, [first[0][:shared]], one)
        k, v = one.get(0)
        for r in live:
            cache.put(r, k, v)
            held[r] = list(first[0][:shared])
    return cache, held
