"""Continuous batching: many conversations decoded together, one forward pass per step.

Decoding one sequence reads every weight of the model to produce one token.
A batch of B sequences reads the weights once for B tokens, so on a machine
whose time goes into moving weights (a CPU, or a GPU at small batch) a
step for B sequences costs much less than B steps for one (chapter 16
measures 3 rows at about 1.3x one row on a 2-core CPU). Requests do not arrive together,
though: *continuous batching* (Yu et al. 2022, "Orca"; vLLM, llama.cpp's
server) lets a sequence join the running batch between two steps and leave
it as soon as it is done, instead of waiting for the whole batch.

A step is one forward pass over a *ragged* batch: every row brings its own
number of new tokens. A decoding row brings 1 (its newest token); a row
whose prompt is being read brings a piece of the prompt (*chunked prefill*,
Agrawal et al. 2024, "Sarathi-Serve"; vLLM's scheduler). A token budget per
step (`max_step_tokens`) bounds how long one step takes, so a long prompt
arriving never freezes the answers already streaming, and new prompts are
read together, with one pass over the weights for all of them.

The sequences of a batch have different lengths. Two ways to run a step,
one per model family of the course:

* `RaggedKVCache` + `llama_step` (gptcourse.llama, rotary positions): each
  sequence is a row of one key/value buffer per layer, with its own length.
  All new tokens of all rows go through the linear layers as one (N, C)
  matrix; attention is per row (row r's tokens sit at positions lengths[r],
  lengths[r] + 1, ... and see the row's keys up to themselves).
  `PrefixCache` keeps the keys and values of recent conversations, so a
  prompt that starts like one of them (the same system message, the same
  conversation so far) is read only from where it differs.
* `window_step` (gptcourse.gpt, learned positions, a short context): every
  step recomputes each sequence's last block_size tokens, right-padded to
  one length; causal attention means padding after a sequence's last token
  never reaches it. No cache, exactly the model's own forward pass.

`Engine` runs the loop in a thread: plan a step within the token budget
(decoding rows first, then prompts in order of arrival), run it, hand each
finished prompt or decoding row its token, drop those that finished or
whose client left. The greedy tokens are those of one-at-a-time decoding
(tests/test_batching.py checks it).
"""
import codecs
import collections
import math
import threading

import torch
import torch.nn.functional as F

from .sampling import sample_next

MIN_TEMPERATURE = 1e-5       # below this, sampling is greedy (1e-38 would overflow to NaN)


# ----------------------------------------------------------------------------
# Rows of different lengths in one key/value buffer
# ----------------------------------------------------------------------------

class RaggedKVCache:
    """Keys and values of up to `rows` sequences of different lengths, all layers.

    k[i], v[i]: (rows, H_kv, capacity, d) for layer i; lengths: (rows,) how
    many positions of each row are filled. Active sequences occupy rows
    0 .. n-1 (`move` keeps them packed), so a step works on views [:n].
    The capacity doubles when a row needs more room (up to max_length).
    """

    def __init__(self, n_layer, rows, n_kv_head, head_size, max_length, dtype=torch.float32, device=None):
        for name, value in (("n_layer", n_layer), ("rows", rows), ("max_length", max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.n_layer, self.rows, self.max_length = n_layer, rows, max_length
        self.shape = (rows, n_kv_head, 0, head_size)
        self.dtype, self.device = dtype, device
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def capacity(self):
        return self.k[0].shape[2]

    def reserve(self, length):
        """Make room for `length` positions per row (doubling, capped at max_length)."""
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens does not fit max_length={self.max_length}")
        if length <= self.capacity:
            return
        new = min(self.max_length, max(length, 2 * self.capacity, 64))
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                grown = old.new_zeros(old.shape[0], old.shape[1], new, old.shape[3])
                grown[:, :, :old.shape[2]] = old
                cache[i] = grown

    def put(self, row, k, v):
        """Fill `row` with one sequence's keys and values: k[i], v[i] (H_kv, T, d) per layer."""
        length = k[0].shape[1]
        self.reserve(length)
        for i in range(self.n_layer):
            self.k[i][row, :, :length] = k[i]
            self.v[i][row, :, :length] = v[i]
        self.lengths[row] = length

    def get(self, row):
        """Copies of row's keys and values: two lists of (H_kv, lengths[row], d), one per layer."""
        length = int(self.lengths[row])
        return ([layer[row, :, :length].clone() for layer in self.k],
                [layer[row, :, :length].clone() for layer in self.v])

    def move(self, src, dst):
        """Copy row src to row dst (to keep the active rows packed)."""
        if src != dst:
            for cache in (self.k, self.v):
                for layer in cache:
                    layer[dst] = layer[src]
            self.lengths[dst] = self.lengths[src]


@torch.no_grad()
def llama_step(model, chunks, cache):
    """One forward pass of a gptcourse.llama.Llama over rows 0 .. n-1 of `cache`.

    chunks: n lists of token ids, row r's new tokens: 1 for a decoding row,
    a piece of the prompt for a row being prefilled, none for a row that
    waits this step. Row r's tokens take positions lengths[r], lengths[r] + 1,
    ... (their rotary angles); their keys and values are appended to the row.
    Returns logits (n, V), float32, at each row's last new token (zeros for
    a row without tokens).

    The computation of Llama.forward with a KVCache per row, rearranged so
    that the weights are read once: the N new tokens of all rows go through
    every linear layer as one (N, C) matrix. Only attention is per row: the
    one-token rows together (one query each, a padding mask over the keys),
    each longer chunk alone (causal, shifted by the row's past).
    """
    from .llama import apply_rope, rope_angles
    n = len(chunks)
    if not 1 <= n <= cache.rows:
        raise ValueError(f"need chunks for 1 .. {cache.rows} rows, got {n}")
    sizes = [len(c) for c in chunks]
    N = sum(sizes)
    if N == 0:
        raise ValueError("the step has no tokens: every chunk is empty")
    config, device = model.config, cache.lengths.device
    H, H_kv, d = config.n_head, config.n_kv_head, config.head_size
    group = H // H_kv
    sizes_t = torch.tensor(sizes, device=device)
    starts = cache.lengths[:n].clone()                                             # (n,) each row's past
    ends = starts + sizes_t                                                        # (n,)
    cache.reserve(int(ends.max()))
    first = torch.cumsum(sizes_t, 0) - sizes_t                                     # (n,) row r's first token in x
    row_of = torch.repeat_interleave(torch.arange(n, device=device), sizes_t)      # (N,)
    positions = starts[row_of] + torch.arange(N, device=device) - first[row_of]    # (N,)
    angles = rope_angles(positions, d, config.rope_base)                          # (N, d/2)

    singles = [r for r in range(n) if sizes[r] == 1]                               # decoding rows
    longs = []                                                                     # pieces of prompts
    for r in range(n):
        if sizes[r] > 1:
            past, size = int(starts[r]), sizes[r]
            # causal after the row's `past` cached positions; the same rows for each
            # query head of a group (they are folded into the query axis below)
            mask = (torch.arange(past + size, device=device)[None, :]
                    <= past + torch.arange(size, device=device)[:, None])          # (size, past + size)
            longs.append((r, int(first[r]), size, past, mask.repeat(group, 1)))
    if singles:
        s_rows = torch.tensor(singles, device=device)
        s_tok = first[s_rows]                                                      # their token in x
        T_s = int(ends[s_rows].max())
        keys = torch.arange(T_s, device=device)
        see = torch.ones(n, dtype=torch.long, device=device)                       # other rows: key 0 only
        see[s_rows] = ends[s_rows]
        s_mask = (keys[None, :] < see[:, None])[:, None, None, :]                  # (n, 1, 1, T_s)

    x = model.wte(torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=device))   # (N, C)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.rms_1(x)
        q = apply_rope(attn.w_q(h).view(N, H, d).transpose(0, 1), angles)          # (H, N, d)
        k = apply_rope(attn.w_k(h).view(N, H_kv, d).transpose(0, 1), angles)       # (H_kv, N, d)
        v = attn.w_v(h).view(N, H_kv, d)                                           # (N, H_kv, d)
        cache.k[i][row_of, :, positions] = k.transpose(0, 1)                       # token j at its row, position
        cache.v[i][row_of, :, positions] = v
        out = q.new_empty(H, N, d)
        if singles:
            # every row of the cache's first n as a batch, one query each (rows not
            # decoding get a dummy query whose answer is dropped): a view, no copy.
            # Query head h reads key/value head h // group: fold each group's
            # queries into the query axis instead of repeating K and V.
            q1 = q.new_zeros(n, H, d)
            q1[s_rows] = q[:, s_tok].transpose(0, 1)
            K, V = cache.k[i][:n, :, :T_s], cache.v[i][:n, :, :T_s]                # (n, H_kv, T_s, d)
            o1 = F.scaled_dot_product_attention(q1.view(n, H_kv, group, d), K, V, attn_mask=s_mask)
            out[:, s_tok] = o1.reshape(n, H, d)[s_rows].transpose(0, 1)
        for r, at, size, past, mask in longs:
            qr = q[:, at:at + size].reshape(H_kv, group * size, d)                 # (H_kv, group*size, d)
            K, V = cache.k[i][r, :, :past + size], cache.v[i][r, :, :past + size]  # (H_kv, T_k, d)
            o = F.scaled_dot_product_attention(qr, K, V, attn_mask=mask)
            out[:, at:at + size] = o.view(H, size, d)
        x = x + attn.w_o(out.transpose(0, 1).reshape(N, H * d))
        x = x + block.mlp(block.rms_2(x))
    cache.lengths[:n] = ends
    logits = x.new_zeros(n, config.vocab_size, dtype=torch.float32)
    has = torch.tensor([r for r in range(n) if sizes[r]], device=device)
    last = first[has] + sizes_t[has] - 1                                           # each row's last token
    logits[has] = model.lm_head(model.rms_f(x[last])).float()                      # (n, V)
    return logits


@torch.no_grad()
def window_step(model, windows):
    """Next-token logits for sequences of different lengths, recomputed from scratch.

    windows: a list of n token-id lists, each 1 .. block_size long (the last
    tokens each sequence can see). They are right-padded into one (n, T)
    batch; with causal attention a position never sees the padding after
    it, so row r's logits at its last token are those of model(window_r).
    Returns logits (n, V), float32.
    """
    if not windows or any(not 1 <= len(w) <= model.config.block_size for w in windows):
        raise ValueError(f"need 1 or more windows of 1 .. {model.config.block_size} tokens, "
                         f"got lengths {[len(w) for w in windows]}")
    device = next(model.parameters()).device
    T = max(len(w) for w in windows)
    idx = torch.tensor([w + [0] * (T - len(w)) for w in windows], dtype=torch.long, device=device)
    last = torch.tensor([len(w) - 1 for w in windows], device=device)
    logits, _ = model(idx)                                                         # (n, T, V)
    return logits[torch.arange(len(windows), device=device), last].float()


# ----------------------------------------------------------------------------
# Prefix caching: a new prompt starts where a recent one left off
# ----------------------------------------------------------------------------

def common_prefix(sequences):
    """How many tokens all the sequences (lists of token ids) begin with.

        >>> common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]])
        2
    """
    n = min(len(s) for s in sequences)
    for t in range(n):
        if any(s[t] != sequences[0][t] for s in sequences):
            return t
    return n


class PrefixCache:
    """Keys and values of recent token sequences, at most max_tokens in all.

    add(ids, k, v, salt) keeps a sequence (k[i], v[i]: (H_kv, len(ids), d)
    per layer); longest(ids, salt) -> (length, entry): the entry with the same
    salt sharing the longest beginning with ids. The salt keeps clients
    apart: without it, anyone could learn whether a text was recently sent
    by someone else (from `cached_tokens`, or from the time to first token).
    A follow-up question starts with the whole earlier conversation, and
    every request without its own system message starts with the default
    one, so most of a chat prompt is usually found here.
    The least recently used entries go first when room is needed; an entry
    that another one continues is dropped (the longer one covers it).
    """

    def __init__(self, max_tokens=4096):
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.entries = []                 # (ids (T,) long, k, v, salt), most recently used last
        self.tokens = 0

    @staticmethod
    def _common(a, b):
        m = min(len(a), len(b))
        differ = torch.nonzero(a[:m] != b[:m])
        return int(differ[0]) if len(differ) else m

    def longest(self, ids, salt=None):
        ids = torch.as_tensor(ids, dtype=torch.long)
        best, at = 0, None
        for i, e in enumerate(self.entries):
            same = self._common(ids, e[0]) if e[3] == salt else 0
            if same > best:
                best, at = same, i
        if at is None:
            return 0, None
        entry = self.entries.pop(at)                           # used: now the most recent
        self.entries.append(entry)
        return best, entry

    def add(self, ids, k, v, salt=None):
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not 0 < len(ids) <= self.max_tokens:
            return
        kept = []
        for e in self.entries:
            if e[3] == salt and len(e[0]) <= len(ids) and self._common(ids, e[0]) == len(e[0]):
                self.tokens -= len(e[0])                        # the new one continues it
            else:
                kept.append(e)
        self.entries = kept + [(ids, k, v, salt)]
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            self.tokens -= len(self.entries.pop(0)[0])


# ----------------------------------------------------------------------------
# The two ways of keeping a batch, behind one small interface
# ----------------------------------------------------------------------------

class LlamaBatch:
    """Rows of a RaggedKVCache.

    start(row, prompt, salt) -> (the prompt's tokens still to be read, how
    many came from the prefix cache instead); step(chunks) -> logits (n, V);
    remember(row, ids, salt): keep the row's keys and values (ids: the
    tokens in it) for later prompts with the same salt.
    """

    def __init__(self, model, rows, max_length, prefix_tokens=4096):
        c = model.config
        p = next(model.parameters())
        self.model = model
        self.max_length = min(max_length, c.block_size)
        self.cache = RaggedKVCache(c.n_layer, rows, c.n_kv_head, c.head_size, self.max_length,
                                   dtype=p.dtype, device=p.device)
        self.prefixes = PrefixCache(prefix_tokens)
        self.reused = 0                               # prompt tokens not recomputed, in all

    def start(self, row, prompt_ids, salt=None):
        if not 1 <= len(prompt_ids) <= self.max_length:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit 1 .. max_length={self.max_length}")
        same, entry = self.prefixes.longest(prompt_ids[:-1], salt)      # leave >= 1 token to compute
        if same:
            self.cache.put(row, [k[:, :same] for k in entry[1]], [v[:, :same] for v in entry[2]])
        self.cache.lengths[row] = same
        self.reused += same
        return list(prompt_ids[same:]), same

    def step(self, chunks):
        return llama_step(self.model, chunks, self.cache)

    def remember(self, row, ids, salt=None):
        if len(ids) != int(self.cache.lengths[row]):
            raise ValueError(f"row {row} holds {int(self.cache.lengths[row])} positions, not {len(ids)}")
        if 0 < len(ids) <= self.prefixes.max_tokens:            # else not kept: copy nothing
            self.prefixes.add(ids, *self.cache.get(row), salt)

    def move(self, src, dst):
        self.cache.move(src, dst)

    def fits(self, n_tokens):
        return n_tokens <= self.max_length


class WindowBatch:
    """Token windows of a GPT: every step recomputes each row's last block_size tokens."""

    def __init__(self, model, rows, max_length=None):
        self.model, self.block_size = model, model.config.block_size
        self.windows = [None] * rows

    def start(self, row, prompt_ids, salt=None):
        """The window ends before the prompt's last token, which the first step brings
        (and with it the whole window is computed: nothing comes from a cache)."""
        self.windows[row] = list(prompt_ids[:-1])
        return [prompt_ids[-1]], 0

    def step(self, chunks):
        rows = [r for r, chunk in enumerate(chunks) if chunk]
        for r in rows:
            self.windows[r] = (self.windows[r] + list(chunks[r]))[-self.block_size:]
        logits = window_step(self.model, [self.windows[r] for r in rows])
        out = logits.new_zeros(len(chunks), logits.shape[1])
        out[rows] = logits
        return out

    def remember(self, row, ids, salt=None):
        pass                               # nothing cached: every step recomputes the window

    def move(self, src, dst):
        self.windows[dst] = self.windows[src]

    def fits(self, n_tokens):
        return True                    # the window slides: any length goes


def make_batch(model, rows, max_length, prefix_tokens=4096):
    """LlamaBatch for a model with rotary positions (gptcourse.llama), else WindowBatch."""
    from .llama import Llama
    if isinstance(model, Llama):
        return LlamaBatch(model, rows, max_length, prefix_tokens)
    return WindowBatch(model, rows, max_length)


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


# ----------------------------------------------------------------------------
# One request inside the engine
# ----------------------------------------------------------------------------

class Sequence:
    """A request being decoded: its prompt, its sampling settings and its output.

    on_event(kind, data) is called from the engine's thread:
      ("text", (piece, logprob_entries))  text that can be sent (may be "")
      ("end", (finish_reason, completion_tokens))
      ("error", message)
    finish_reason: "stop" (end-of-turn token or stop string), "length".
    """

    def __init__(self, prompt_ids, max_tokens, on_event, temperature=1.0, top_p=1.0, stop=(),
                 stop_ids=(), seed=None, logprobs=False, top_logprobs=0, presence_penalty=0.0,
                 frequency_penalty=0.0, logit_bias=None, cache_salt=None):
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        self.prompt_ids, self.max_tokens, self.on_event = list(prompt_ids), max_tokens, on_event
        self.greedy = temperature < MIN_TEMPERATURE or top_p == 0
        self.temperature, self.top_p = float(temperature), (None if top_p >= 1 else float(top_p))
        self.stop_strings, self.stop_ids = tuple(stop), frozenset(stop_ids)
        self.seed = seed
        self.logprobs, self.top_logprobs = bool(logprobs), int(top_logprobs or 0)
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.logit_bias = logit_bias or {}
        self.cache_salt = cache_salt    # prefix-cache entries are shared only with the same salt
        self.cancelled = False          # set from another thread: the client left
        self.done = False
        self.failed = False
        self.todo = []                  # prompt tokens not read yet (set by the engine)
        self.cached_tokens = 0          # prompt tokens found in the prefix cache
        self.tokens = []                # every generated id
        self.last = None

    def cancel(self):
        self.cancelled = True


# ----------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------

class Engine:
    """Continuous batching in a background thread.

    submit(seq) queues a Sequence. Every step is planned within a budget of
    max_step_tokens new tokens: each decoding sequence brings its newest
    token, then the prompts being read bring their next pieces, in order of
    arrival, then waiting sequences join (while fewer than max_batch are
    active) with the first piece of their prompt. The step is one forward
    pass; a prompt read to its end, and every decoding sequence, gets its
    next token. A sequence leaves at its end, on cancel() (checked every
    step), or on an error, which reaches only the sequences it concerns.
    max_batch=1 decodes one request at a time, in arrival order.

    A smaller budget keeps each step short (the tokens of the sequences
    already answering keep coming while a long prompt is read); a larger
    one reads more prompts per pass over the weights.

    stats: steps; batch_tokens (tokens sampled by the steps: more than one
    per step means sequences shared the passes); max_batch_seen (the most
    sequences in one step); prefills (sequences admitted); prompt_tokens
    (prompt tokens computed); reused_tokens (prompt tokens found in the
    prefix cache instead).
    """

    def __init__(self, model, tokenizer, max_batch=16, max_length=2048, max_step_tokens=256,
                 prefix_tokens=4096):
        for name, value in (("max_batch", max_batch), ("max_step_tokens", max_step_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.max_step_tokens = max_step_tokens
        self.batch = make_batch(model, max_batch, max_length, prefix_tokens)
        self.device = next(model.parameters()).device
        self.active = []                # row r of the batch is active[r]
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.stats = dict(steps=0, batch_tokens=0, max_batch_seen=0, prefills=0, prompt_tokens=0,
                          reused_tokens=0)
        self._stopping = False
        self._threads = torch.get_num_threads()      # a new thread starts with the default
        self._thread = threading.Thread(target=self._run, name="gptcourse.batching.Engine", daemon=True)
        self._thread.start()

    def fits(self, n_tokens):
        """Whether a sequence of n_tokens (prompt + new tokens) fits the batch's rows."""
        return self.batch.fits(n_tokens)

    def submit(self, seq):
        with self.cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def stop(self):
        with self.cond:
            self._stopping = True
            self.cond.notify()
        self._thread.join(timeout=30)
        for seq in list(self.waiting) + self.active:
            self._fail(seq, "the server is shutting down")

    @property
    def load(self):
        """(active, waiting): sequences being decoded and queued."""
        return len(self.active), len(self.waiting)

    # ---- the loop, in the engine's thread ----------------------------------
    def _run(self):
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self._stopping and not self.waiting and not self.active:
                        self.cond.wait()
                    if self._stopping:
                        return
                self._drop_finished()
                chunks = self._plan()
                if any(chunks):
                    self._step(chunks)

    def _plan(self):
        """This step's new tokens, one list per active row (admitting waiting sequences)."""
        chunks = [[] if seq.todo else [seq.last] for seq in self.active]
        budget = self.max_step_tokens - sum(map(len, chunks))
        least = 1                                             # a prompt moves on every step
        reading = sorted((seq.admitted, r) for r, seq in enumerate(self.active) if seq.todo)
        for _, r in reading:                                  # prompts being read, oldest first
            chunks[r] = self.active[r].todo[:max(budget, least)]
            budget -= len(chunks[r])
            least = 0
        while budget > 0 and len(self.active) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            if self._admit(seq):
                chunks.append(seq.todo[:budget])
                budget -= len(chunks[-1])
        return chunks

    def _admit(self, seq):
        """Give seq the next free row; its todo: the prompt tokens to read."""
        if seq.cancelled:
            seq.done = True
            return False
        try:
            row = len(self.active)
            seq.todo, seq.cached_tokens = self.batch.start(row, seq.prompt_ids, seq.cache_salt)
            seq.admitted = self.stats["prefills"]
            self.stats["prefills"] += 1
            self.stats["reused_tokens"] += seq.cached_tokens
            self.stats["prompt_tokens"] += len(seq.prompt_ids) - seq.cached_tokens
            seq.generator = None
            if not seq.greedy:
                seed = seq.seed if seq.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            seq.text, seq.sent, seq.entries, seq.entries_sent = "", 0, [], 0
            seq.stops, seq.decoder = StopMatcher(seq.stop_strings), TextDecoder(self.tokenizer)
            seq.counts = None
        except Exception as e:                        # noqa: BLE001 -- one request's failure
            self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
            return False
        self.active.append(seq)
        return True

    def _step(self, chunks):
        try:
            logits = self.batch.step(chunks)                                       # (n, V)
        except Exception as e:                        # noqa: BLE001 -- fails this batch only
            for seq in self.active:
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
            return
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], sum(1 for c in chunks if c))
        for row, (seq, chunk) in enumerate(zip(self.active, chunks)):
            if not chunk:
                continue
            try:
                if seq.todo:                                   # a piece of the prompt was read
                    seq.todo = seq.todo[len(chunk):]
                    if seq.todo:
                        continue
                    self.batch.remember(row, seq.prompt_ids, seq.cache_salt)   # the whole prompt is in the row
                self.stats["batch_tokens"] += 1
                self._take(seq, logits[row])
            except Exception as e:                    # noqa: BLE001
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")

    def _drop_finished(self):
        """Remove finished and cancelled rows (their conversations go to the prefix
        cache), moving the last row into each gap."""
        r = 0
        while r < len(self.active):
            seq = self.active[r]
            if seq.done or seq.cancelled:
                if not seq.failed and not seq.todo:
                    ids = (seq.prompt_ids + seq.tokens)[:-1]
                    try:
                        self.batch.remember(r, ids, seq.cache_salt)   # the prompt and the answer but its last token
                    except Exception:                   # noqa: BLE001 -- a cache miss later, no more
                        pass
                seq.done = True
                last = len(self.active) - 1
                self.batch.move(last, r)
                self.active[r] = self.active[last]
                self.active.pop()
            else:
                r += 1

    def _fail(self, seq, message):
        seq.failed = True
        if not seq.done:
            seq.done = True
            seq.on_event("error", message)

    # ---- one token for one sequence ----------------------------------------
    def _pick(self, seq, logits):
        """logits (V,) float32 -> the next token id, with the request's settings."""
        scores = logits
        if seq.logit_bias or seq.presence_penalty or seq.frequency_penalty:
            scores = logits.clone()
            for token, bias in seq.logit_bias.items():
                scores[token] += bias
            if seq.tokens and (seq.presence_penalty or seq.frequency_penalty):
                if seq.counts is None or len(seq.counts) != scores.shape[0]:
                    seq.counts = torch.bincount(torch.tensor(seq.tokens), minlength=scores.shape[0])
                counts = seq.counts.to(scores.device, scores.dtype)
                scores -= seq.frequency_penalty * counts + seq.presence_penalty * (counts > 0)
        if not torch.isfinite(scores).any() or torch.isnan(scores).any():
            raise FloatingPointError("the model's scores are not finite numbers")
        if seq.greedy:
            return int(scores.argmax())
        return int(sample_next(scores[None], seq.temperature, None, seq.top_p, seq.generator))

    def _entry(self, token, logp, top):
        tok = self.tokenizer
        raw = tok.token_bytes(token) if hasattr(tok, "token_bytes") else tok.decode([token]).encode()
        entry = {"token": raw.decode("utf-8", errors="replace"), "logprob": logp, "bytes": list(raw)}
        if top is not None:
            entry["top_logprobs"] = [self._entry(t, lp, None) for t, lp in top]
        return entry

    def _take(self, seq, logits):
        token = self._pick(seq, logits)
        seq.tokens.append(token)
        seq.last = token
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.logprobs and token not in seq.stop_ids:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = None
            if seq.top_logprobs:
                values, ids = torch.topk(logp, seq.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            seq.entries.append((len(seq.text), self._entry(token, float(logp[token]), top)))
        if token in seq.stop_ids:                                    # the model ended its turn
            return self._finish(seq, "stop", len(seq.text))
        piece = seq.decoder.piece(token)
        found = seq.stops.feed(piece)
        if found is not None:                                        # a stop string: cut it off
            after, stop = found
            start = len(seq.text) + after - len(stop)
            seq.text += piece
            return self._finish(seq, "stop", max(start, seq.sent))
        seq.text += piece
        if len(seq.tokens) >= seq.max_tokens:
            return self._finish(seq, "length", len(seq.text))
        self._send(seq, len(seq.text) - seq.stops.held_back)

    def _send(self, seq, upto):
        """Hand on the text up to character `upto` and the logprobs of its tokens."""
        if upto <= seq.sent and seq.entries_sent == len(seq.entries):
            return
        piece = seq.text[seq.sent:upto] if upto > seq.sent else ""
        entries = [e for start, e in seq.entries[seq.entries_sent:] if start < max(upto, seq.sent)]
        if not piece and not entries:
            return
        seq.sent = max(seq.sent, upto)
        seq.entries_sent += len(entries)
        seq.on_event("text", (piece, entries))

    def _finish(self, seq, reason, upto):
        seq.text = seq.text[:upto]
        if upto > seq.sent or seq.entries_sent < len(seq.entries):
            piece = seq.text[seq.sent:upto]
            entries = [e for start, e in seq.entries[seq.entries_sent:] if start < upto]
            seq.sent, seq.entries_sent = upto, len(seq.entries)
            if piece or entries:
                seq.on_event("text", (piece, entries))
        seq.done = True
        seq.on_event("end", (reason, len(seq.tokens)))
