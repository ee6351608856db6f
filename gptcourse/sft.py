"""Supervised fine-tuning (SFT): a base model learns to answer from chat transcripts.

Instruction tuning is ordinary next-token training on transcripts in the
chat template, with one change: the loss counts only the tokens the model
should learn to *write*, the assistant's answers (and the end-of-turn marker
that teaches it to stop). The system and user turns are context, never
targets: a model trained on them too spends its capacity imitating users.

    conversation --encode_conversation--> ids (N,), answer_mask (N,)
    examples     --sft_batch------------> x (B, T), y (B, T), mask (B, T)
    model(x)     --sft_loss(logits, y, mask)--> mean cross-entropy on the answers

The template (encode_conversation) is picked by the tokenizer:

* a tokenizer with ChatML's special tokens (SmolLM2's, gptcourse.llama) gets
  ChatML exactly as gptcourse.chat.encode_chatml writes it, the format the
  instruction-tuned model was trained on: the answer is the assistant's
  content and its ``<|im_end|>`` (the ``\\n`` after it is not);
* any other tokenizer (a CharTokenizer, the course's BPETokenizer) gets the
  course's plain-text template, gptcourse.chat.format_chat, with every
  message ended by a newline ("User: ...\\nAssistant: ...\\n"): the answer is
  " content\\n", everything the model writes after the cue "Assistant:",
  the newline being its end of turn.

Both are the ids of the same text a chat client builds for the model
(format_chat / format_chatml), so a model tuned here is prompted there.
"""

import torch
import torch.nn.functional as F

from .chat import ROLE_NAMES, SMOLLM2_SYSTEM, _with_system, check_messages

CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def sft_loss(logits, targets, answer_mask):
    """Mean cross-entropy over the answer's targets only.

    logits (B, T, V), targets (B, T) next-token ids, answer_mask (B, T) bool:
    True where the target token belongs to an assistant answer (its end of
    turn included). Equal to F.cross_entropy(logits[mask], targets[mask]):
    every answer token weighs the same, whatever its sequence. Computed in
    float32 at least (bfloat16 logits are widened; float64 stays float64).
    Raises ValueError when the mask selects nothing (the loss would be 0/0).

        >>> logits = torch.zeros(1, 3, 4)                      # uniform: log 4 per token
        >>> round(sft_loss(logits, torch.tensor([[1, 2, 3]]),
        ...                torch.tensor([[False, True, True]])).item(), 4)
        1.3863
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be (B, T) = {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    if answer_mask.shape != targets.shape:
        raise ValueError(f"answer_mask must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(answer_mask.shape)}")
    if answer_mask.dtype != torch.bool:
        raise ValueError(f"answer_mask must be a bool tensor, got dtype {answer_mask.dtype}")
    if not answer_mask.any():
        raise ValueError("answer_mask selects no target: there is no answer token to learn from")
    picked = logits[answer_mask]                                       # (N, V): the answer positions
    return F.cross_entropy(picked.to(torch.promote_types(picked.dtype, torch.float32)), targets[answer_mask])


def _encoder(tokenizer, encode):
    """text -> ids: `encode` if given, else tokenizer.encode, with special-token
    text in the messages kept as plain text where the tokenizer can."""
    if encode is not None:
        if not callable(encode):
            raise ValueError(f"encode must be a function str -> list of ids, got {encode!r:.80}")
        return lambda text: list(encode(text))
    if getattr(tokenizer, "special", None):
        return lambda text: list(tokenizer.encode(text, allow_special=False))
    return lambda text: list(tokenizer.encode(text))


def _split_encode(encode, prefix, content):
    """ids(prefix), ids(content) such that together they are ids(prefix + content)
    whenever the tokenizer allows it (the ids a chat client sends), so that the
    answer mask can be cut at the boundary between the two."""
    head = encode(prefix)
    whole = encode(prefix + content)
    if whole[:len(head)] == head:
        return head, whole[len(head):]
    return head, encode(content)                       # a token across the boundary: cut it there


def uses_chatml(tokenizer):
    """True when the tokenizer has ChatML's markers as special tokens (SmolLM2's):
    encode_conversation then writes ChatML, otherwise the course's format_chat."""
    special = getattr(tokenizer, "special", None) or {}
    return all(marker in special for marker in CHATML_MARKERS)


def encode_conversation(tokenizer, messages, block_size, encode=None, *, default_system=SMOLLM2_SYSTEM):
    """A whole conversation as training ids and the mask of what the model must learn to write.

    messages: a list of {"role", "content"} dicts (gptcourse.chat.check_messages),
    usually ending with an assistant turn. Returns (ids list[int],
    answer_mask list[bool]) of the same length: True on the tokens of every
    assistant turn's content and on its end-of-turn marker.

    The template follows the tokenizer (see the module's docstring): ChatML
    with the tokenizer's <|im_start|>/<|im_end|> ids when it has them (then
    a conversation with no system message gets `default_system` first, as
    SmolLM2's template and encode_chatml do; None: none), otherwise
    format_chat's "Role: content" lines, each ended by "\\n". `encode`
    (str -> ids) replaces tokenizer.encode for the text pieces.

    A model with a context of block_size tokens trains on ids[:-1] -> ids[1:],
    so the conversation may have at most block_size + 1 tokens; a longer one
    raises ValueError (cutting it would cut the answer and its end of turn).

        >>> from gptcourse.tokenizers import CharTokenizer
        >>> talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        >>> tok = CharTokenizer("User: hi\\nAssistant: yo\\n")
        >>> ids, mask = encode_conversation(tok, talk, block_size=64)
        >>> tok.decode(ids)
        'User: hi\\nAssistant: yo\\n'
        >>> tok.decode([i for i, m in zip(ids, mask) if m])
        ' yo\\n'
    """
    check_messages(messages)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    encode = _encoder(tokenizer, encode)
    ids, mask = [], []

    def add(piece_ids, answer):
        ids.extend(piece_ids)
        mask.extend([answer] * len(piece_ids))

    if uses_chatml(tokenizer):
        start, end = (tokenizer.special[m] for m in CHATML_MARKERS)
        newline = encode("\n")
        for m in _with_system(messages, default_system):
            answer = m["role"] == "assistant"
            head, content = _split_encode(encode, f"{m['role']}\n", m["content"])
            add([start, *head], False)
            add([*content, end], answer)
            add(newline, False)
    else:
        for m in messages:
            answer = m["role"] == "assistant"
            head, content = _split_encode(encode, f"{ROLE_NAMES[m['role']]}:", f" {m['content']}\n")
            add(head, False)
            add(content, answer)
    if len(ids) > block_size + 1:
        raise ValueError(f"the conversation has {len(ids)} tokens, more than block_size + 1 = "
                         f"{block_size + 1} (a model with context {block_size} trains on "
                         f"ids[:-1] -> ids[1:]): shorten it or drop it")
    return ids, mask


def sft_batch(examples, block_size, pad_id=0):
    """Stack (ids, answer_mask) examples into a right-padded training batch.

    examples: a non-empty list of (ids, answer_mask) as encode_conversation
    returns them, each with 2 to block_size + 1 tokens. Returns
    x (B, T) long = ids[:-1], y (B, T) long = ids[1:] (the next tokens) and
    mask (B, T) bool = answer_mask[1:] (aligned with y: True where y is an
    answer token), T the longest example's length - 1. The padding is
    pad_id in x and y and False in mask, so sft_loss never sees it (and a
    causal model's real positions never see it: it comes after them).

        >>> x, y, mask = sft_batch([([5, 6, 7], [False, True, True]), ([8, 9], [False, True])], 8)
        >>> x.tolist(), y.tolist(), mask.tolist()
        ([[5, 6], [8, 0]], [[6, 7], [9, 0]], [[True, True], [True, False]])
    """
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError("examples must be a non-empty list of (ids, answer_mask) pairs")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    rows = []
    for i, example in enumerate(examples):
        if not isinstance(example, (list, tuple)) or len(example) != 2:
            raise ValueError(f"examples[{i}] must be an (ids, answer_mask) pair")
        ids, answer_mask = (list(v.tolist() if torch.is_tensor(v) else v) for v in example)
        if len(ids) != len(answer_mask):
            raise ValueError(f"examples[{i}]: {len(ids)} ids but {len(answer_mask)} mask entries")
        if not 2 <= len(ids) <= block_size + 1:
            raise ValueError(f"examples[{i}] has {len(ids)} tokens; need 2 to block_size + 1 = "
                             f"{block_size + 1}")
        rows.append((ids, [bool(m) for m in answer_mask]))
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, (ids, answer_mask) in enumerate(rows):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        y[b, :n] = torch.tensor(ids[1:])
        mask[b, :n] = torch.tensor(answer_mask[1:])
    return x, y, mask
