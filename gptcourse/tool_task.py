"""The course's tool task: arithmetic questions that need the calculator, their
training texts, and the small GPT trained on them (chapter 18).

    Q: What is 48213 times 937?
    A: <calc>48213*937</calc>[45175581] 45175581

One character per token (ALPHABET); the loss skips the question and, by
default, the tool's bracketed result, which the program writes. gptcourse.tools
runs the trained model in the tool loop.
"""
import random
import string
from dataclasses import dataclass

import torch

from .calculator import MAX_NUMBER_DIGITS, calculate

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


def train_tool_model(steps=1500, seed=0, batch_size=32, lr=3e-3, min_lr=3e-4, device=None, progress=True,
                     mask_result=True, n_train=20000, max_digits=MAX_DIGITS, **config_overrides):
    """Train the course's tool-calling GPT; returns (model, tokenizer, history, (train, val, test)).

    With steps=1100 it is chapter 18's run, bit for bit on the CPU: the same data, seed,
    schedule (100 warm-up steps, lr 3e-3 down to min_lr 3e-4: written as the chapter writes
    it, since lr / 10 is 0.00030000000000000003) and evaluations."""
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
                    min_lr=min_lr, weight_decay=0.1, eval_every=max(1, steps // 5),
                    eval_batches=10, device=device, seed=seed, progress=progress,
                    desc="tool GPT")
    model.eval()
    return model, tokenizer, history, (train_p, val_p, test_p)
