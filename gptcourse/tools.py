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

import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import TextDecoder, decode, end_of_turn_ids, model_step, sample_next

# ----------------------------------------------------------------------------
# The calculator: a recursive-descent parser, never eval
# ----------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 64   # longer arguments are refused
MAX_NUMBER_DIGITS = 12      # per number in the expression
MAX_RESULT_DIGITS = 30      # per intermediate result: no 9**9**9 surprises

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def _tokens(expression):
    """'12 + 3*4' -> ['12', '+', '3', '*', '4']; ValueError for other characters."""
    out = []
    for number, symbol in _TOKEN.findall(expression):
        if number:
            if len(number) > MAX_NUMBER_DIGITS:
                raise ValueError(f"number {number[:15]}... has {len(number)} digits; "
                                 f"the calculator takes at most {MAX_NUMBER_DIGITS}")
            out.append(number)
        elif symbol.strip():
            if symbol not in "+-*()":
                raise ValueError(f"unexpected character {symbol!r} in {expression!r}: "
                                 f"the calculator knows digits, + - * and parentheses")
            out.append(symbol)
    return out


def parse_expression(expression):
    """Parse an arithmetic expression into a tree of tuples.

    Grammar (usual precedence, left to right):
        expr   := term (('+' | '-') term)*
        term   := factor ('*' factor)*
        factor := '-' factor | NUMBER | '(' expr ')'

    >>> parse_expression("2+3*4")
    ('+', 2, ('*', 3, 4))
    >>> parse_expression("(2+3)*-4")
    ('*', ('+', 2, 3), ('neg', 4))
    """
    if not isinstance(expression, str):
        raise ValueError(f"an expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(expression)} characters is too long "
                         f"(at most {MAX_EXPRESSION_CHARS})")
    tokens = _tokens(expression)
    if not tokens:
        raise ValueError("empty expression: the call has no argument")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth):
        node = term(depth)
        while peek() in ("+", "-"):
            node = (take(), node, term(depth))
        return node

    def term(depth):
        node = factor(depth)
        while peek() == "*":
            take()
            node = ("*", node, factor(depth))
        return node

    def factor(depth):
        if depth > 20:
            raise ValueError(f"expression {expression!r} is nested too deeply")
        token = peek()
        if token is None:
            raise ValueError(f"expression {expression!r} ends where a number was expected")
        if token == "-":
            take()
            return ("neg", factor(depth + 1))
        if token == "(":
            take()
            node = expr(depth + 1)
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            take()
            return node
        if token.isdigit():
            return int(take())
        raise ValueError(f"unexpected {token!r} in {expression!r} where a number was expected")

    tree = expr(0)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {expression!r} after a complete expression")
    return tree


def evaluate(tree):
    """The value of a tree from parse_expression (a Python int, exact).

    >>> evaluate(('-', 7, ('*', 2, 5)))
    -3
    """
    if isinstance(tree, int):
        return tree
    if tree[0] == "neg":
        return -evaluate(tree[1])
    op, a, b = tree[0], evaluate(tree[1]), evaluate(tree[2])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    if len(str(abs(value))) > MAX_RESULT_DIGITS:
        raise ValueError(f"result has more than {MAX_RESULT_DIGITS} digits")
    return value


def calculate(expression):
    """Parse and evaluate: calculate("48213*937") == 45175581."""
    return evaluate(parse_expression(expression))


# ----------------------------------------------------------------------------
# Tools and calls
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A tool the model may call: `parse` checks the argument text and turns
    it into structured arguments (ValueError if it cannot), `run` computes
    the result text from them."""
    name: str
    description: str
    parse: Callable
    run: Callable


CALCULATOR = Tool("calc", "exact integer arithmetic: + - * and parentheses",
                  parse=parse_expression, run=lambda tree: str(evaluate(tree)))
TOOLS = {CALCULATOR.name: CALCULATOR}


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name, the argument as written, and the
    structured arguments its `parse` made of it."""
    name: str
    argument: str
    args: object


_OPEN_TAG = re.compile(r"<([a-z_]+)>")


def parse_call(text, tools=None):
    """'<name>argument</name>' -> ToolCall, or ValueError saying what is wrong.

    Refused: no or unbalanced tags, a tool not in `tools` (default TOOLS),
    a newline inside, an argument the tool's parser refuses (bad characters,
    numbers too long, ...). Never raises anything but ValueError for a str.
    """
    tools = TOOLS if tools is None else tools
    if not isinstance(text, str):
        raise ValueError(f"a call must be a str, got {type(text).__name__}")
    shown = text if len(text) <= 60 else text[:57] + "..."
    match = _OPEN_TAG.match(text)
    if not match:
        raise ValueError(f"a call must start with '<name>', got {shown!r}")
    name = match.group(1)
    if name not in tools:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(sorted(tools)) or 'none'}")
    close = f"</{name}>"
    if not text.endswith(close) or len(text) < len(match.group(0)) + len(close):
        raise ValueError(f"a call must end with {close!r}, got {shown!r}")
    argument = text[len(match.group(0)):-len(close)]
    if "\n" in argument:
        raise ValueError(f"a call must fit on one line, got {shown!r}")
    if "<" in argument or ">" in argument:
        raise ValueError(f"unbalanced tags in {shown!r}")
    try:
        args = tools[name].parse(argument)
    except ValueError as e:
        raise ValueError(f"bad argument for {name}: {e}") from None
    except Exception as e:  # a tool's own parser must not crash the loop
        raise ValueError(f"bad argument for {name}: {type(e).__name__}: {e}") from None
    return ToolCall(name, argument, args)


# ----------------------------------------------------------------------------
# The data: questions that need the calculator
# ----------------------------------------------------------------------------

# Every character a transcript may hold: printable ASCII and the newline.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(string.digits + "<>[]+-*/") <= set(ALPHABET)

TEMPLATES = {
    "+": ["What is {a} plus {b}?", "{a}+{b}=?", "Add {a} and {b}."],
    "-": ["What is {a} minus {b}?", "{a}-{b}=?", "From {a} take {b}."],
    "*": ["What is {a} times {b}?", "{a}*{b}=?", "Multiply {a} by {b}."],
}


MAX_DIGITS = 4      # the course's problems: whole numbers of 1 to 4 digits


@dataclass(frozen=True)
class Problem:
    """One question, the call that answers it, and the true answer."""
    question: str
    expression: str     # the calculator argument, e.g. "48213*937"
    answer: int
    digits: int         # digits of the longer operand: the problem's size

    @property
    def key(self):
        return self.expression


def make_problems(n, seed=0, max_digits=MAX_DIGITS, ops="+-*", exclude=()):
    """n random arithmetic questions, seeded; none whose expression is in `exclude`.

    The size d (digits of the longer operand) is uniform in 1..max_digits;
    the other operand has 1..d digits; the order of the two is random.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(max_digits, int) or not 1 <= max_digits <= MAX_NUMBER_DIGITS:
        raise ValueError(f"max_digits must be in 1..{MAX_NUMBER_DIGITS}, got {max_digits!r}")
    if not ops or set(ops) - set(TEMPLATES):
        raise ValueError(f"ops must be a non-empty string of {''.join(TEMPLATES)}, got {ops!r}")
    rng = random.Random(seed)
    exclude, seen, problems = set(exclude), set(), []

    def number(d):
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot find {n} distinct problems with max_digits={max_digits}")
        d = rng.randint(1, max_digits)
        a, b = number(d), number(rng.randint(1, d))
        if rng.random() < 0.5:
            a, b = b, a
        op = rng.choice(ops)
        expression = f"{a}{op}{b}"
        if expression in exclude or expression in seen:
            continue
        seen.add(expression)
        question = rng.choice(TEMPLATES[op]).format(a=a, b=b)
        problems.append(Problem(question, expression, calculate(expression), d))
    return problems


def format_prompt(question):
    """The text the model is given: 'Q: <question>\\nA: '."""
    if not isinstance(question, str) or "\n" in question:
        raise ValueError(f"a question must be a one-line str, got {question!r:.60}")
    return f"Q: {question}\nA: "


def format_example(problem, tool="calc"):
    """The whole training text of a problem, call and tool result included."""
    return (format_prompt(problem.question) + f"<{tool}>{problem.expression}</{tool}>"
            f"[{problem.answer}] {problem.answer}\n")


def make_tokenizer():
    """A character tokenizer over ALPHABET (96 symbols)."""
    from .tokenizers import CharTokenizer
    return CharTokenizer(ALPHABET)


def encode_examples(problems, tokenizer, block_size, mask_result=True):
    """Training tensors x, y: (N, block_size) each, one problem per row.

    Row i is format_example(problems[i]) from position 0, padded with
    newlines. y is x shifted by one, with -100 (ignored by the loss) where
    the next token is part of the prompt (the model is not asked to predict
    the question), past the end of the example, and, if mask_result, for
    the tool's result "[...]": the program writes it, the model must not
    learn to invent it. (Trained to predict it too, the course's model
    learns to copy the result into its answer far more slowly.)
    """
    n = len(problems)
    x = torch.full((n, block_size), tokenizer.encode("\n")[0], dtype=torch.long)
    y = torch.full((n, block_size), -100, dtype=torch.long)
    for i, p in enumerate(problems):
        text = format_example(p)
        ids = tokenizer.encode(text)
        if len(ids) > block_size + 1:
            raise ValueError(f"example of {len(ids)} tokens does not fit block_size={block_size}: "
                             f"{text!r}")
        ids = torch.tensor(ids)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, :len(ids) - 1] = ids[1:]
        start = len(format_prompt(p.question)) - 1       # y[start] is the first answer token
        y[i, :start] = -100
        if mask_result:
            lo = text.index("[", start)
            hi = text.index("]", lo)
            y[i, lo - 1:hi] = -100          # the targets text[lo..hi], "[" to "]"
    return x, y


def example_batches(train_xy, val_xy, batch_size, seed=0, device="cpu"):
    """A `batches(split)` function for gptcourse.train.train over (x, y) row tensors."""
    data = {"train": train_xy, "val": val_xy}
    gens = {split: torch.Generator().manual_seed(seed + i) for i, split in enumerate(data)}

    def batches(split):
        x, y = data[split]
        rows = torch.randint(len(x), (batch_size,), generator=gens[split])
        x, y = x[rows], y[rows]
        length = int((y != -100).any(0).nonzero().max()) + 1     # drop the padding
        return x[:, :length].to(device), y[:, :length].to(device)
    return batches


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
# The course's tool model
# ----------------------------------------------------------------------------

def tool_model_config(vocab_size=len(ALPHABET), **overrides):
    """2 layers, 4 heads, d=96, context 80 (the longest example with
    MAX_DIGITS=4 is 73 characters)."""
    from .gpt import GPTConfig
    config = dict(n_layer=2, n_head=4, n_embd=96, block_size=80, vocab_size=vocab_size)
    return GPTConfig(**{**config, **overrides})


def tool_data(n_train=20000, n_val=500, n_test=200, seed=0, max_digits=MAX_DIGITS):
    """(train, val, test) problem lists; no expression of val or test is in train."""
    test = make_problems(n_test, seed=seed + 1, max_digits=max_digits)
    val = make_problems(n_val, seed=seed + 2, max_digits=max_digits,
                        exclude={p.key for p in test})
    train = make_problems(n_train, seed=seed, max_digits=max_digits,
                          exclude={p.key for p in test + val})
    return train, val, test


def train_tool_model(steps=1500, seed=0, batch_size=32, lr=3e-3, device=None, progress=True,
                     mask_result=True, n_train=20000, max_digits=MAX_DIGITS, **config_overrides):
    """Train the course's tool-calling GPT; returns (model, tokenizer, history, (train, val, test))."""
    from .gpt import GPT
    from .train import pick_device, seed_everything, train

    device = pick_device(device)
    tokenizer = make_tokenizer()
    config = tool_model_config(tokenizer.vocab_size, **config_overrides)
    train_p, val_p, test_p = tool_data(n_train=n_train, seed=seed, max_digits=max_digits)
    xy = {name: encode_examples(ps, tokenizer, config.block_size, mask_result)
          for name, ps in (("train", train_p), ("val", val_p))}
    seed_everything(seed)
    model = GPT(config).to(device)
    batches = example_batches(xy["train"], xy["val"], batch_size, seed=seed, device=device)
    history = train(model, batches, steps=steps, lr=lr, warmup_steps=min(100, steps),
                    min_lr=lr / 10, weight_decay=0.1, eval_every=max(1, steps // 5),
                    eval_batches=10, device=device, seed=seed, progress=progress,
                    desc="tool GPT")
    model.eval()
    return model, tokenizer, history, (train_p, val_p, test_p)


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
