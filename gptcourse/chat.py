"""Chat on top of a plain language model: the transcript is the context.

A chat model is still a next-token predictor. What makes it "chat" is a
transcript format: every message of the conversation so far (system
instructions, the user's turns, the assistant's earlier answers) is written
into one text, and the model continues that text after an ``Assistant:``
cue. Each new turn makes the text longer, and whatever no longer fits the
context window (``block_size`` tokens) is simply not seen.

    >>> print(format_chat([{"role": "system", "content": "Be brief."},
    ...                    {"role": "user", "content": "What is a list?"}]))
    System: Be brief.
    User: What is a list?
    Assistant:

The course's own model (``train_course_model``) is the chapter-11 GPT: a
character-level GPT trained on the Python documentation of ``pydoc_data``.
It was never tuned to follow instructions, so it continues the transcript as
documentation-like text; that is exactly what chapters 14-15 need to show
how a chat API works and where a model without instruction tuning fails.
"""

import torch

ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def check_messages(messages):
    """Raise ValueError naming the first bad message; return the list unchanged.

    A message is a dict with "role" (one of ROLES) and "content" (a str),
    as in the chat-completions API.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a str, "
                             f"got {type(content).__name__}")
    return messages


def format_chat(messages, add_generation_prompt=True):
    """The conversation as one text: one "Role: content" line per message.

    With add_generation_prompt=True the text ends with "Assistant:", the
    cue after which the model writes its answer.
    """
    check_messages(messages)
    lines = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


def train_course_model(steps=600, seed=0, device=None, progress=True):
    """Train the course's character-level GPT on the pydoc corpus (about 20 s on one CPU core).

    The chapter-11 recipe: GPTConfig "course-char" (4 layers, 4 heads,
    d=128, context 64), batch 12, AdamW at 1e-3 with 100 warm-up steps and a
    cosine decay to 1e-4. Seeded: the same weights on every run on a device.
    Returns (model, tokenizer, history); the model is in eval mode.
    """
    from . import data
    from .gpt import GPT, GPTConfig
    from .tokenizers import CharTokenizer
    from .train import lm_batches, pick_device, seed_everything, train

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = pick_device(device)
    text = data.load_corpus("pydoc")
    tokenizer = CharTokenizer(text)
    train_data, val_data = data.train_val_split(torch.tensor(tokenizer.encode(text)), 0.1)
    config = GPTConfig.from_name("course-char", vocab_size=tokenizer.vocab_size)
    seed_everything(seed)
    model = GPT(config).to(device)
    batches = lm_batches(train_data, val_data, block_size=config.block_size, batch_size=12,
                         seed=seed, device=device)
    history = train(model, batches, steps=steps, lr=1e-3, warmup_steps=min(100, steps),
                    min_lr=1e-4, weight_decay=0.1, eval_every=max(1, steps // 4),
                    eval_batches=20, device=device, seed=seed, progress=progress,
                    desc="course GPT")
    model.eval()
    return model, tokenizer, history
