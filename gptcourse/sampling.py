"""Turning next-token logits into a token: greedy, temperature, top-k, top-p;
the decoding loop every model of the course uses (decode, with a KV cache:
model_step); and beam search, which looks for the most likely whole
continuation. Also what every decoding loop shares: the one greedy rule
(is_greedy), the end-of-turn tokens of a chat model (end_of_turn_ids),
stop strings in linear time (StopMatcher) and text as it is generated
(TextDecoder).

logits: (B, V), one row of unnormalised scores per sequence.
"""
import codecs
from contextlib import contextmanager

import torch

from .attention import KVCache

MIN_TEMPERATURE = 1e-5       # below this, sampling is greedy (1e-38 would overflow to NaN)


def is_greedy(temperature, top_p=None):
    """The one greedy rule: True when temperature < MIN_TEMPERATURE (1e-5,
    so 0 is greedy) or top_p == 0. Greedy decoding takes the argmax and draws
    no random number; below 1e-5, dividing the logits would overflow.
    top_p None means no nucleus filter.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    return temperature < MIN_TEMPERATURE or (top_p is not None and top_p == 0)


def end_of_turn_ids(tokenizer):
    """The token ids that end a chat model's turn: every special token of the
    tokenizer (<|im_end|>, <|endoftext|>, ...), as the server stops. A model
    writes special tokens only at the end of its turn; a tokenizer with no
    `special` table gives the empty set.
    """
    return set(getattr(tokenizer, "special", {}).values())


def top_k_filter(logits, k):
    """Keep the k largest logits of each row, set the rest to -inf. (B, V) -> (B, V)

    Ties at the k-th value are all kept.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive integer, got {k!r}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling: keep the smallest set of most likely tokens whose
    probabilities sum to at least p; set the rest to -inf. (B, V) -> (B, V)

    A token is dropped when the tokens ranked above it already reach p, so
    the token that crosses p is kept and the most likely token always is.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p == 1.0:                        # the whole distribution: nothing to drop (a rounded
        return logits.clone()           # cumsum can reach 1.0 before the last token)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    mass_before = torch.cumsum(probs, dim=-1) - probs                  # mass ranked above
    # "reach p" up to rounding: 0.5 + 0.3 may come out as 0.7999999999999999 < 0.8
    drop_sorted = mass_before >= p * (1 - 16 * torch.finfo(probs.dtype).eps)
    drop_sorted[..., 0] = False                                        # even when p underflows
    drop = drop_sorted.scatter(-1, order, drop_sorted)                 # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token of each row. logits (B, V) -> ids (B, 1).

    Greedy (argmax, no random draw) when is_greedy(temperature): temperature
    below 1e-5, 0 included. Otherwise logits are divided by the temperature,
    filtered by top-k then top-p, and sampled. top_p must be in (0, 1]: a
    request's top_p == 0 (greedy by is_greedy) is decided before, by the caller.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {tuple(logits.shape)}")
    if is_greedy(temperature):
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ----------------------------------------------------------------------------
# The decoding loop
# ----------------------------------------------------------------------------

def model_step(model, use_cache=True):
    """The step function of `decode` for a language model with a KV cache
    (GPT, gptcourse.llama.Llama): model(idx, caches=...) -> (logits, _),
    model.blocks, model.config.block_size.

    step(new_ids (B, t)) -> logits (B, V) of the token after them. With
    use_cache=True the first call reads the prompt into one KVCache per block
    and each later call feeds only the newest token. Once the sequence no
    longer fits in block_size (or with use_cache=False) every call recomputes
    the last block_size tokens, the model's own forward pass. A model without
    config.block_size sees everything. A tool loop feeds the step more than
    one new token (the last token and a tool's result), and it goes on.
    step.select_rows(rows (K,)) keeps those sequences of the batch, in that
    order (repeats allowed), in the window and the caches: beam search's beams
    taking their parents' context.
    """
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    window, length, caches = None, 0, None           # what the model can see; the whole length

    def step(new_ids):
        nonlocal window, length, caches
        window = new_ids if window is None else torch.cat([window, new_ids], dim=1)
        window = window if block_size is None else window[:, -block_size:]
        length += new_ids.shape[1]
        if use_cache and (block_size is None or length <= block_size):
            if caches is None:                         # first step: fill the cache with the prompt
                caches = [KVCache() for _ in model.blocks]
            return model(new_ids, caches=caches)[0][:, -1, :]
        return model(window)[0][:, -1, :]              # recompute the whole (cropped) context

    def select_rows(rows):
        nonlocal window
        window = window[rows]
        for cache in caches or ():
            cache.select_rows(rows)
    step.select_rows = select_rows
    return step


def decode(step, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
           stop_ids=()):
    """The decoding loop: an iterator over the (B, 1) ids of each new token.

    step(new_ids (B, t)) -> logits (B, V) of the next token: called with the
    prompt idx (B, T) first, then with each new token (see model_step). Each
    token is sample_next(logits, temperature, top_k, top_p, generator), so
    a seeded generator gives the same tokens, whatever the step computes.
    Stops after max_new_tokens, or (one sequence, B = 1) once a token of
    stop_ids has been yielded. Runs under torch.no_grad(); the model should
    be in eval mode.
    """
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a (B, T) tensor with T >= 1, got {tuple(idx.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if stop_ids and idx.shape[0] != 1:
        raise ValueError(f"stop_ids needs one sequence (B = 1), got B = {idx.shape[0]}")
    return _decode(step, idx, max_new_tokens, temperature, top_k, top_p, generator, frozenset(stop_ids))


@torch.no_grad()
def _decode(step, new_ids, max_new_tokens, temperature, top_k, top_p, generator, stop_ids):
    for _ in range(max_new_tokens):
        next_id = sample_next(step(new_ids), temperature, top_k, top_p, generator)     # (B, 1)
        yield next_id
        if stop_ids and int(next_id[0, 0]) in stop_ids:
            return
        new_ids = next_id


@contextmanager
def evaluating(model):
    """with evaluating(model): ... runs in eval mode (no dropout), then puts
    back the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def beam_search(model, idx, max_new_tokens, beam_width=4, eos_id=None, length_penalty=0.0, use_cache=False):
    """The most likely continuation of one prompt, searched with a beam.

    Greedy decoding takes the best token at each step; the best *sequence* can
    start with a token that is not the best. Beam search keeps the beam_width
    best partial continuations (by the sum of their tokens' log-probabilities),
    extends each by every token, and keeps the beam_width best of those. With
    beam_width=1 it is greedy decoding; with a beam as wide as the number of
    possible prefixes it is an exhaustive search.

    model: called as model(ids (K, T)) -> (logits (K, T, V), _), e.g. a GPT;
        it sees the last model.config.block_size tokens when it has a config.
    idx: (1, T) prompt ids. eos_id: a token that ends a continuation (it is
        kept, and the continuation stops growing); None: every continuation
        has max_new_tokens tokens.
    length_penalty: continuations are ranked by score / n**length_penalty,
        n its number of new tokens (0: by the plain sum of log-probs, which
        favours short ones when eos_id is set).
    use_cache: model_step's KV caches (a model with .blocks), reordered to
        follow the beams, so each step feeds one token per beam instead of
        recomputing every beam's whole window (the logits agree to rounding;
        past block_size it recomputes).
    Returns (ids (1, T + n), score): the best continuation appended to the
    prompt, and its summed log-probability (not length-normalised).
    """
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be one prompt of shape (1, T) with T >= 1, got {tuple(idx.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be a positive integer, got {beam_width!r}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty!r}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()

    def rank(score, n):                                   # what continuations compete on
        return score / n ** length_penalty

    beams = idx                                           # (K, T + step) alive continuations
    scores = torch.zeros(1, dtype=torch.float64, device=idx.device)      # (K,) summed log-probs
    finished = []                                         # (rank, score, ids (1, T + n))
    next_logits = model_step(model, use_cache and hasattr(model, "blocks"))
    new_ids = idx                                         # what the step has not seen yet
    try:
        for step in range(1, max_new_tokens + 1):
            logits = next_logits(new_ids)                                    # (K, V)
            keep_rows, keep_scores, parents, ended = _extend_beams(beams, scores, logits, beam_width, eos_id)
            finished += [(rank(score, step), score, ids) for score, ids in ended]
            if not keep_rows:
                break
            beams, scores = torch.stack(keep_rows), torch.stack(keep_scores)
            next_logits.select_rows(torch.tensor(parents, device=idx.device))   # each beam, its parent's context
            new_ids = beams[:, -1:]
            # no alive continuation can beat the best finished one any more: stop
            if finished and length_penalty == 0 and scores.max().item() < max(f[1] for f in finished):
                break
        n = beams.shape[1] - idx.shape[1]
        candidates = finished + [(rank(s.item(), n), s.item(), b[None]) for s, b in zip(scores, beams)]
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    best = max(candidates, key=lambda c: c[0])
    return best[2], best[1]


def _extend_beams(beams, scores, logits, beam_width, eos_id):
    """One step of beam_search: every beam (K, t) extended by every token.
    Returns the beam_width best continuations that go on (rows, their summed
    log-probs, the beam each extends) and those that end with eos_id, as
    (score, ids (1, t + 1))."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    total = (scores[:, None] + logp).flatten()                       # (K * V,)
    V = logp.shape[-1]
    # 2 * beam_width candidates: even if all the eos ones leave, beam_width stay
    top = torch.topk(total, min(2 * beam_width, total.numel())).indices
    keep_rows, keep_scores, parents, ended = [], [], [], []
    for flat in top.tolist():
        row, token = divmod(flat, V)
        ids = torch.cat([beams[row], beams.new_tensor([token])])
        if eos_id is not None and token == eos_id:
            ended.append((total[flat].item(), ids[None]))
        elif len(keep_rows) < beam_width:
            keep_rows.append(ids)
            keep_scores.append(total[flat])
            parents.append(row)
    return keep_rows, keep_scores, parents, ended


# ----------------------------------------------------------------------------
# Stop strings in linear time, and text as it is generated
# ----------------------------------------------------------------------------

class StopMatcher:
    """Watch a growing text for any of several stop strings (Knuth-Morris-Pratt).

    feed(piece) -> (the index in piece just after the first completed stop
    string, that string), or None. held_back: how many last characters of the text so far
    are the beginning of a stop string (they must not be sent yet). Each
    character costs O(number of stops), whatever the strings' lengths.

    >>> m = StopMatcher(["\\nUser:"])
    >>> m.feed("Hello\\nUs"), m.held_back
    (None, 3)
    >>> m.feed("er: hi")
    (3, '\\nUser:')
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fail = [self._failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)             # matched prefix length per stop

    @staticmethod
    def _failure(s):
        """fail[k]: the longest proper border of s[:k+1]."""
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, piece):
        for pos, ch in enumerate(piece):
            for j, s in enumerate(self.stops):
                k = self.state[j]
                while k and ch != s[k]:
                    k = self.fail[j][k - 1]
                if ch == s[k]:
                    k += 1
                if k == len(s):
                    self.state = [0] * len(self.stops)
                    return pos + 1, s
                self.state[j] = k
        return None

    @property
    def held_back(self):
        return max(self.state, default=0)


class TextDecoder:
    """Token ids -> text, piece by piece; a UTF-8 character split across tokens
    comes out whole once its last byte arrives (byte-level BPE)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes = hasattr(tokenizer, "token_bytes")
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token):
        if self.bytes:
            return self._utf8.decode(self.tokenizer.token_bytes(token))
        return self.tokenizer.decode([token])

    def rest(self):
        """The text of the bytes still held at the end (an unfinished character
        becomes U+FFFD, as tokenizer.decode writes it); "" when there are none."""
        return self._utf8.decode(b"", final=True) if self.bytes else ""
