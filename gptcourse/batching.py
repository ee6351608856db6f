"""Continuous batching: many conversations decoded together, one forward pass per step.

Decoding one sequence reads every weight of the model to produce one token.
A batch of B sequences reads the weights once for B tokens, so on a machine
whose time goes into moving weights (a CPU, or a GPU at small batch) B
sequences cost little more than one. Requests do not arrive together,
though: *continuous batching* (Yu et al. 2022, "Orca"; vLLM, llama.cpp's
server) lets a sequence join the running batch between two steps and leave
it as soon as it is done, instead of waiting for the whole batch.

The sequences of a batch have different lengths. Two ways to decode them in
one pass, one per model family of the course:

* `RaggedKVCache` + `llama_decode_step` (gptcourse.llama, rotary positions):
  each sequence is a row of one key/value buffer per layer, with its own
  length; row r's new token sits at position lengths[r] (its rotary angle)
  and attends to keys 0 .. lengths[r] only (a padding mask). A new sequence
  is prefilled alone by the model's own forward pass, then copied in.
* `window_step` (gptcourse.gpt, learned positions, a short context): every
  step recomputes each sequence's last block_size tokens, right-padded to
  one length; causal attention means padding after a sequence's last token
  never reaches it. No cache, exactly the model's own forward pass.

`Engine` runs the loop in a thread: admit waiting sequences, one step for
every active one, hand each its token, drop those that finished or whose
client left. The greedy tokens are those of one-at-a-time decoding
(tests/test_batching.py checks it).
"""
import codecs
import collections
import math
import threading

import torch
import torch.nn.functional as F

from .attention import KVCache
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

    def put(self, row, caches):
        """Copy one sequence's per-layer KVCache (batch 1) into `row`."""
        length = len(caches[0])
        self.reserve(length)
        for i, cache in enumerate(caches):
            self.k[i][row, :, :length] = cache.k[0]
            self.v[i][row, :, :length] = cache.v[0]
        self.lengths[row] = length

    def move(self, src, dst):
        """Copy row src to row dst (to keep the active rows packed)."""
        if src != dst:
            for cache in (self.k, self.v):
                for layer in cache:
                    layer[dst] = layer[src]
            self.lengths[dst] = self.lengths[src]


@torch.no_grad()
def llama_decode_step(model, last_ids, cache):
    """One decoding step of a gptcourse.llama.Llama for rows 0 .. n-1 of `cache`.

    last_ids: (n,) the newest token of each row, not yet in the cache.
    Returns logits (n, V), float32, and appends each row's keys/values at its
    own position. The computation of Llama.forward with T=1, but with one
    position and one key length per row: grouped-query attention with a
    padding mask instead of a shared causal mask.
    """
    from .llama import apply_rope, rope_angles
    n = last_ids.shape[0]
    if last_ids.dim() != 1 or not 1 <= n <= cache.rows:
        raise ValueError(f"last_ids must be (n,) with 1 <= n <= {cache.rows}, got {tuple(last_ids.shape)}")
    config = model.config
    positions = cache.lengths[:n]                                                  # (n,)
    cache.reserve(int(positions.max()) + 1)
    T_k = int(positions.max()) + 1
    angles = rope_angles(positions, config.head_size, config.rope_base)[:, None, None, :]   # (n, 1, 1, d/2)
    keys = torch.arange(T_k, device=last_ids.device)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]                 # (n, 1, 1, T_k)
    rows = torch.arange(n, device=last_ids.device)
    x = model.wte(last_ids[:, None])                                               # (n, 1, C)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        H, H_kv, d = attn.n_head, attn.n_kv_head, attn.d
        h = block.rms_1(x)
        q = attn.w_q(h).view(n, 1, H, d).transpose(1, 2)                           # (n, H, 1, d)
        k = attn.w_k(h).view(n, 1, H_kv, d).transpose(1, 2)                        # (n, H_kv, 1, d)
        v = attn.w_v(h).view(n, 1, H_kv, d).transpose(1, 2)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        cache.k[i][rows, :, positions] = k[:, :, 0]                                # row r at lengths[r]
        cache.v[i][rows, :, positions] = v[:, :, 0]
        K, V = cache.k[i][:n, :, :T_k], cache.v[i][:n, :, :T_k]                    # (n, H_kv, T_k, d)
        # query head h reads key/value head h // group: fold each group's queries
        # into the query axis instead of repeating K and V (no copy)
        q = q.reshape(n, H_kv, H // H_kv, d)                                       # (n, H_kv, group, d)
        out = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)              # (n, H_kv, group, d)
        x = x + attn.w_o(out.reshape(n, 1, H * d))
        x = x + block.mlp(block.rms_2(x))
    cache.lengths[:n] += 1
    return model.lm_head(model.rms_f(x)).float()[:, 0]                             # (n, V)


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
# The two ways of keeping a batch, behind one small interface
# ----------------------------------------------------------------------------

@torch.no_grad()
def llama_prefill(model, ids, caches):
    """Llama.forward on one prompt (1, T) after the len(caches[0]) positions
    already cached, but the output layer only at the last position (the
    only one generation needs: 49,152 x 576 multiply-adds per token saved).
    Returns the last position's logits (V,), float32."""
    from .llama import rope_angles
    past = len(caches[0])
    positions = torch.arange(past, past + ids.shape[1], device=ids.device)
    angles = rope_angles(positions, model.config.head_size, model.config.rope_base)
    x = model.wte(ids)                                                             # (1, T, C)
    for block, cache in zip(model.blocks, caches):
        x = block(x, angles, cache=cache)
    return model.lm_head(model.rms_f(x[0, -1])).float()                            # (V,)


class LlamaBatch:
    """Rows of a RaggedKVCache: add(row, prompt) -> logits (V,); step(ids) -> (n, V).

    Prefix caching: the keys and values of the last prompt are kept, and a
    new prompt starting with the same tokens (the same system message, the
    same conversation so far) reuses them: only the rest is computed.
    """

    def __init__(self, model, rows, max_length):
        c = model.config
        p = next(model.parameters())
        self.model = model
        self.max_length = min(max_length, c.block_size)
        self.cache = RaggedKVCache(c.n_layer, rows, c.n_kv_head, c.head_size, self.max_length,
                                   dtype=p.dtype, device=p.device)
        self.last_prompt, self.last_caches = [], None
        self.reused = 0                               # prompt tokens not recomputed, in all

    def add(self, row, prompt_ids):
        device = self.cache.lengths.device
        if len(prompt_ids) > self.max_length:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit max_length={self.max_length}")
        same = 0                                      # common prefix, leaving >= 1 token to compute
        for a, b in zip(prompt_ids[:len(prompt_ids) - 1], self.last_prompt):
            if a != b:
                break
            same += 1
        caches = [KVCache() for _ in self.model.blocks]
        if same:
            for cache, old in zip(caches, self.last_caches):
                cache.update(old.k[:, :, :same], old.v[:, :, :same])
            self.reused += same
        logits = llama_prefill(self.model, torch.tensor([prompt_ids[same:]], device=device), caches)
        self.cache.put(row, caches)
        self.last_prompt, self.last_caches = list(prompt_ids), caches
        return logits

    def step(self, last_ids):
        ids = torch.tensor(last_ids, dtype=torch.long, device=self.cache.lengths.device)
        return llama_decode_step(self.model, ids, self.cache)

    def move(self, src, dst):
        self.cache.move(src, dst)

    def fits(self, n_tokens):
        return n_tokens <= self.max_length


class WindowBatch:
    """Token windows of a GPT: every step recomputes each row's last block_size tokens."""

    def __init__(self, model, rows, max_length=None):
        self.model, self.block_size = model, model.config.block_size
        self.windows = [None] * rows

    def add(self, row, prompt_ids):
        self.windows[row] = list(prompt_ids[-self.block_size:])
        return window_step(self.model, [self.windows[row]])[0]

    def step(self, last_ids):
        for row, token in enumerate(last_ids):
            self.windows[row] = (self.windows[row] + [token])[-self.block_size:]
        return window_step(self.model, self.windows[:len(last_ids)])

    def move(self, src, dst):
        self.windows[dst] = self.windows[src]

    def fits(self, n_tokens):
        return True                    # the window slides: any length goes


def make_batch(model, rows, max_length):
    """LlamaBatch for a model with rotary positions (gptcourse.llama), else WindowBatch."""
    from .llama import Llama
    return (LlamaBatch if isinstance(model, Llama) else WindowBatch)(model, rows, max_length)


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
                 frequency_penalty=0.0, logit_bias=None):
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
        self.cancelled = False          # set from another thread: the client left
        self.done = False
        self.tokens = []                # every generated id
        self.last = None

    def cancel(self):
        self.cancelled = True


# ----------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------

class Engine:
    """Continuous batching in a background thread.

    submit(seq) queues a Sequence; between two steps, waiting sequences are
    prefilled (each alone) and join the batch while there are fewer than
    max_batch; every step then decodes all of them in one forward pass.
    A sequence leaves at its end, on cancel() (checked every step), or on an
    error, which reaches only the sequences it concerns. max_batch=1 decodes
    one request at a time, in arrival order.

    stats: steps (decoding steps), batch_tokens (tokens decoded by them),
    max_batch_seen (the most sequences in one step), prefills.
    """

    def __init__(self, model, tokenizer, max_batch=16, max_length=2048):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.batch = make_batch(model, max_batch, max_length)
        self.device = next(model.parameters()).device
        self.active = []                # row r of the batch is active[r]
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.stats = dict(steps=0, batch_tokens=0, max_batch_seen=0, prefills=0)
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
                    joining = []
                    while self.waiting and len(self.active) + len(joining) < self.max_batch:
                        joining.append(self.waiting.popleft())
                for seq in joining:
                    self._admit(seq)
                self._drop_finished()
                if self.active:
                    self._step()
                    self._drop_finished()

    def _admit(self, seq):
        if seq.cancelled:
            seq.done = True
            return
        try:
            row = len(self.active)
            logits = self.batch.add(row, seq.prompt_ids)
            self.stats["prefills"] += 1
            self.active.append(seq)
            seq.generator = None
            if not seq.greedy:
                seed = seq.seed if seq.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            seq.text, seq.sent, seq.entries, seq.entries_sent = "", 0, [], 0
            seq.stops, seq.decoder = StopMatcher(seq.stop_strings), TextDecoder(self.tokenizer)
            seq.counts = None
            self._take(seq, logits)
        except Exception as e:                        # noqa: BLE001 -- one request's failure
            if seq in self.active:
                self.active.remove(seq)
            self._fail(seq, f"generation failed: {type(e).__name__}: {e}")

    def _step(self):
        n = len(self.active)
        try:
            logits = self.batch.step([seq.last for seq in self.active])              # (n, V)
        except Exception as e:                        # noqa: BLE001 -- fails this batch only
            for seq in self.active:
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
            self.active = []
            return
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += n
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], n)
        for seq, row in zip(self.active, logits):
            try:
                self._take(seq, row)
            except Exception as e:                    # noqa: BLE001
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")

    def _drop_finished(self):
        """Remove finished and cancelled rows, moving the last row into each gap."""
        r = 0
        while r < len(self.active):
            seq = self.active[r]
            if seq.done or seq.cancelled:
                seq.done = True
                last = len(self.active) - 1
                self.batch.move(last, r)
                self.active[r] = self.active[last]
                self.active.pop()
            else:
                r += 1

    def _fail(self, seq, message):
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
