"""Continuous batching: many conversations decoded together, one forward pass per step.

Decoding one sequence reads every weight of the model to produce one token.
A batch of B sequences reads the weights once for B tokens, so on a machine
whose time goes into moving weights (a CPU, or a GPU at small batch) a
step for B sequences costs much less than B steps for one (chapter 17
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

* `llama_step` (gptcourse.llama, rotary positions): all new tokens of all
  rows go through the linear layers as one (N, C) matrix; attention is per
  row (row r's tokens sit at positions lengths[r], lengths[r] + 1, ... and
  see the row's keys up to themselves). Its keys and values are in one of
  two caches. `RaggedKVCache`: each sequence is a row of one buffer per
  layer, as long as the longest row (simple; greedy_batch's). `PagedKVCache`
  (the server's): fixed-size blocks of one pool and a table of blocks per
  row (vLLM's PagedAttention), so memory follows the tokens in use.
  A prefix cache keeps the keys and values of recent conversations, so a
  prompt that starts like one of them (the same system message, the same
  conversation so far) is read only from where it differs: `PrefixCache`
  (copies, exact to the token) or `BlockPrefixCache` (the server's: the
  paged cache's whole blocks, shared, one table per tenant).
* `window_step` (gptcourse.gpt, learned positions, a short context): every
  step recomputes each sequence's last block_size tokens, right-padded to
  one length; causal attention means padding after a sequence's last token
  never reaches it. No cache, exactly the model's own forward pass.

The engine that runs these steps for a server, `Engine` (a loop in a
thread: plan a step within the token budget, decoding rows first, then
prompts in order of arrival; run it; hand each finished prompt or decoding
row its token; drop those that finished or whose client left), and its
`Sequence`, live in gptcourse.serve.engine, with the rows of a batch in
gptcourse.serve.runner; ``from gptcourse.batching import Engine, Sequence``
still works (it needs the serve extra, as the server does). The greedy
tokens are those of one-at-a-time decoding (tests/test_batching.py checks it).
"""
import collections
import heapq

import torch
import torch.nn.functional as F

from .sampling import MIN_TEMPERATURE, StopMatcher, TextDecoder  # noqa: F401  (their old home)


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


class PagedKVCache:
    """Keys and values of up to `rows` sequences in fixed-size blocks of one pool.

    vLLM's PagedAttention (Kwon et al. 2023) in plain PyTorch. k, v:
    (n_layer, blocks, block_size, H_kv, d), the pool; tables[r]: row r's
    blocks in order (position p of row r is in block tables[r][p //
    block_size], at offset p % block_size); lengths (rows,). A row gets a
    block when it grows into one and gives its blocks back when its sequence
    ends, so the pool follows the tokens in use, not rows x max_length.
    refs[b]: the holders of block b (a row, the prefix cache's entries): a
    full block can be shared without copying, since nobody writes it again.
    The pool grows by half (at least min_blocks) when no block is free, and
    trim() gives memory back when less than half of it is in use.
    """

    def __init__(self, n_layer, rows, n_kv_head, head_size, max_length, block_size=16,
                 dtype=torch.float32, device=None, min_blocks=32):
        for name, value in (("n_layer", n_layer), ("rows", rows), ("n_kv_head", n_kv_head),
                            ("head_size", head_size), ("max_length", max_length),
                            ("block_size", block_size), ("min_blocks", min_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.n_layer, self.rows, self.max_length = n_layer, rows, max_length
        self.block_size, self.min_blocks = block_size, min_blocks
        shape = (n_layer, 0, block_size, n_kv_head, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = []                    # refs[b]: how many hold block b (0: free)
        self.free = []                    # a heap of free block ids: the lowest first, trim() finds less to move
        self.used = 0                     # blocks with a holder
        self.tables = [[] for _ in range(rows)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def blocks(self):
        """Blocks in the pool, free or not."""
        return self.k.shape[1]

    @property
    def block_bytes(self):
        """Bytes of one block: its keys and values in every layer."""
        L, _, bs, H_kv, d = self.k.shape
        return 2 * L * bs * H_kv * d * self.k.element_size()

    @property
    def nbytes(self):
        """Bytes of the pool (keys and values), allocated."""
        return self.k.nbytes + self.v.nbytes

    def _resize(self, blocks, keep):
        """A pool of `blocks` blocks whose first len(keep) are the old blocks `keep`."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], blocks, *old.shape[2:])
            if len(keep):
                new[:, :len(keep)] = old[:, keep]
            setattr(self, name, new)              # the old pool is freed here

    def _grow(self):
        old = self.blocks
        new = old + max(old // 2, self.min_blocks)
        self._resize(new, torch.arange(old))
        self.refs += [0] * (new - old)
        for b in range(old, new):
            heapq.heappush(self.free, b)

    def allocate(self):
        """A free block (the pool grows when none is), with one holder."""
        if not self.free:
            self._grow()
        b = heapq.heappop(self.free)
        self.refs[b] = 1
        self.used += 1
        return b

    def hold(self, b):
        """One more holder for block b, which is in use."""
        if not 0 <= b < self.blocks or self.refs[b] < 1:
            raise ValueError(f"block {b!r} is not in use")
        self.refs[b] += 1

    def drop(self, b):
        """One holder less for block b; with none left it is free."""
        if not 0 <= b < self.blocks or self.refs[b] < 1:
            raise ValueError(f"block {b!r} is not in use")
        self.refs[b] -= 1
        if self.refs[b] == 0:
            heapq.heappush(self.free, b)
            self.used -= 1

    def extend(self, row, length):
        """Give row the blocks for `length` positions."""
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens does not fit max_length={self.max_length}")
        table = self.tables[row]
        while len(table) * self.block_size < length:
            table.append(self.allocate())

    def release(self, row):
        """Row's sequence is over: its blocks lose a holder, the row is empty."""
        for b in self.tables[row]:
            self.drop(b)
        self.tables[row] = []
        self.lengths[row] = 0

    def share(self, row, blocks, length):
        """Start row on `blocks` held elsewhere (full ones, never written again), filled up to `length`."""
        if not 0 <= length <= len(blocks) * self.block_size:
            raise ValueError(f"{len(blocks)} blocks of {self.block_size} do not hold {length} positions")
        for b in blocks:                  # first: a block the row held itself stays in use
            self.hold(b)
        self.release(row)
        self.tables[row] = list(blocks)
        self.lengths[row] = length

    def move(self, src, dst):
        """Row dst's sequence is over (its blocks are released) and row src's takes its
        place, to keep the active rows packed; src == dst: the row is just released."""
        self.release(dst)
        if src != dst:
            self.tables[dst], self.tables[src] = self.tables[src], []
            self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def get(self, row):
        """Copies of row's keys and values: two lists of (H_kv, lengths[row], d), one per layer."""
        length, blocks = int(self.lengths[row]), torch.tensor(self.tables[row], dtype=torch.long)
        return ([layer[blocks].flatten(0, 1)[:length].transpose(0, 1).clone() for layer in self.k],
                [layer[blocks].flatten(0, 1)[:length].transpose(0, 1).clone() for layer in self.v])

    def trim(self):
        """Give memory back: with less than half of the pool in use (and more than
        min_blocks), the blocks in use move to the front of a pool a quarter larger
        than them. Returns {old id: new id} for whoever holds blocks (the rows'
        tables are renumbered here), or None when nothing moved."""
        if self.blocks <= self.min_blocks or 2 * self.used >= self.blocks:
            return None
        keep = [b for b, r in enumerate(self.refs) if r]
        new = max(self.min_blocks, len(keep) + len(keep) // 4)
        self._resize(new, torch.tensor(keep, dtype=torch.long))
        remap = {old: b for b, old in enumerate(keep)}
        self.refs = [self.refs[b] for b in keep] + [0] * (new - len(keep))
        self.free = list(range(len(keep), new))                   # sorted: a heap
        self.tables = [[remap[b] for b in t] for t in self.tables]
        return remap


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
    each longer chunk alone (causal, shifted by the row's past). cache: a
    RaggedKVCache or a PagedKVCache (whose rows get their blocks here).
    """
    from .llama import rope_angles
    n = len(chunks)
    if not 1 <= n <= cache.rows:
        raise ValueError(f"need chunks for 1 .. {cache.rows} rows, got {n}")
    sizes = [len(c) for c in chunks]
    N = sum(sizes)
    if N == 0:
        raise ValueError("the step has no tokens: every chunk is empty")
    config, device = model.config, cache.lengths.device
    sizes_t = torch.tensor(sizes, device=device)
    starts = cache.lengths[:n].clone()                                             # (n,) each row's past
    ends = starts + sizes_t                                                        # (n,)
    first = torch.cumsum(sizes_t, 0) - sizes_t                                     # (n,) row r's first token in x
    row_of = torch.repeat_interleave(torch.arange(n, device=device), sizes_t)      # (N,)
    positions = starts[row_of] + torch.arange(N, device=device) - first[row_of]    # (N,)
    angles = rope_angles(positions, config.head_size, config.rope_base)           # (N, d/2)
    group = config.n_head // config.n_kv_head
    if isinstance(cache, PagedKVCache):
        attend = _paged_attention(cache, sizes, ends, first, row_of, positions, group)
    else:
        cache.reserve(int(ends.max()))
        attend = _ragged_attention(cache, _attention_plan(sizes, starts, ends, first, group), row_of, positions)

    x = model.wte(torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=device))   # (N, C)
    for i, block in enumerate(model.blocks):
        x = _ragged_block(block, config, x, angles, lambda q, k, v: attend(i, q, k, v))
    cache.lengths[:n] = ends
    logits = x.new_zeros(n, config.vocab_size, dtype=torch.float32)
    has = torch.tensor([r for r in range(n) if sizes[r]], device=device)
    last = first[has] + sizes_t[has] - 1                                           # each row's last token
    logits[has] = model.lm_head(model.rms_f(x[last])).float()                      # (n, V)
    return logits


def _attention_plan(sizes, starts, ends, first, group):
    """Who attends to what in one ragged step, the same for every layer.

    singles: None, or (s_rows, s_tok, T_s, s_mask) for the decoding rows (one
    token each): their rows, their token in x, the keys to read, and a
    padding mask (n, 1, 1, T_s) over them. longs: (r, at, size, past, mask)
    for each row with a longer chunk: causal after the row's `past` cached
    positions, the mask repeated for the `group` query heads of a key/value
    head (they are folded into the query axis).
    """
    n, device = len(sizes), starts.device
    longs = []                                                                     # pieces of prompts
    for r in range(n):
        if sizes[r] > 1:
            past, size = int(starts[r]), sizes[r]
            mask = (torch.arange(past + size, device=device)[None, :]
                    <= past + torch.arange(size, device=device)[:, None])          # (size, past + size)
            longs.append((r, int(first[r]), size, past, mask.repeat(group, 1)))
    singles = [r for r in range(n) if sizes[r] == 1]                               # decoding rows
    if not singles:
        return None, longs
    s_rows = torch.tensor(singles, device=device)
    T_s = int(ends[s_rows].max())
    keys = torch.arange(T_s, device=device)
    see = torch.ones(n, dtype=torch.long, device=device)                           # other rows: key 0 only
    see[s_rows] = ends[s_rows]
    s_mask = (keys[None, :] < see[:, None])[:, None, None, :]                      # (n, 1, 1, T_s)
    return (s_rows, first[s_rows], T_s, s_mask), longs


def _ragged_block(block, config, x, angles, attend):
    """One transformer block of llama_step: x (N, C) -> (N, C). attend(q, k, v)
    stores the new keys and values in the cache and returns the attention's
    output (H, N, d): the cache decides where keys go and how a row's are read."""
    from .llama import apply_rope
    N = x.shape[0]
    H, H_kv, d = config.n_head, config.n_kv_head, config.head_size
    attn = block.attn
    h = block.rms_1(x)
    q = apply_rope(attn.w_q(h).view(N, H, d).transpose(0, 1), angles)              # (H, N, d)
    k = apply_rope(attn.w_k(h).view(N, H_kv, d).transpose(0, 1), angles)           # (H_kv, N, d)
    v = attn.w_v(h).view(N, H_kv, d)                                               # (N, H_kv, d)
    out = attend(q, k, v)                                                          # (H, N, d)
    x = x + attn.w_o(out.transpose(0, 1).reshape(N, H * d))
    return x + block.mlp(block.rms_2(x))


def _ragged_attention(cache, plan, row_of, positions):
    """attend(i, q, k, v) for layer i of a RaggedKVCache: the new keys and values
    go to their rows and positions of cache.k[i], cache.v[i] (rows, H_kv, T, d);
    the queries attend as `plan` (_attention_plan) says."""
    singles, longs = plan

    def attend(i, q, k, v):
        k_cache, v_cache = cache.k[i], cache.v[i]
        (H, N, d), H_kv = q.shape, k.shape[0]
        group = H // H_kv
        k_cache[row_of, :, positions] = k.transpose(0, 1)                          # token j at its row, position
        v_cache[row_of, :, positions] = v
        out = q.new_empty(H, N, d)
        if singles:
            # every row of the cache's first n as a batch, one query each (rows not
            # decoding get a dummy query whose answer is dropped): a view, no copy.
            # Query head h reads key/value head h // group: fold each group's
            # queries into the query axis instead of repeating K and V.
            s_rows, s_tok, T_s, s_mask = singles
            n = s_mask.shape[0]
            q1 = q.new_zeros(n, H, d)
            q1[s_rows] = q[:, s_tok].transpose(0, 1)
            K, V = k_cache[:n, :, :T_s], v_cache[:n, :, :T_s]                      # (n, H_kv, T_s, d)
            o1 = F.scaled_dot_product_attention(q1.view(n, H_kv, group, d), K, V, attn_mask=s_mask)
            out[:, s_tok] = o1.reshape(n, H, d)[s_rows].transpose(0, 1)
        for r, at, size, past, mask in longs:
            qr = q[:, at:at + size].reshape(H_kv, group * size, d)                 # (H_kv, group*size, d)
            K, V = k_cache[r, :, :past + size], v_cache[r, :, :past + size]        # (H_kv, T_k, d)
            o = F.scaled_dot_product_attention(qr, K, V, attn_mask=mask)
            out[:, at:at + size] = o.view(H, size, d)
        return out
    return attend


def _paged_attention(cache, sizes, ends, first, row_of, positions, group):
    """attend(i, q, k, v) for layer i of a PagedKVCache. Each row first gets the
    blocks its new positions need; token j's key goes to block
    tables[row][position // block_size], offset position % block_size. The
    decoding rows attend together: each gathers its blocks (padded with block
    0, masked) into one (s, H_kv, blocks x block_size, d) batch; a longer chunk
    gathers its row's blocks alone, causal after the row's past."""
    n, bs, device = len(sizes), cache.block_size, ends.device
    for r in range(n):
        cache.extend(r, int(ends[r]))                  # may grow the pool: read cache.k at each call
    width = max(len(t) for t in cache.tables[:n])
    table = torch.tensor([t + [0] * (width - len(t)) for t in cache.tables[:n]],
                         dtype=torch.long, device=device)                          # (n, width)
    block, offset = table[row_of, positions // bs], positions % bs                 # (N,) where each token goes
    singles = [r for r in range(n) if sizes[r] == 1]                               # decoding rows
    if singles:
        s_rows = torch.tensor(singles, device=device)
        s_tok, s_ends = first[s_rows], ends[s_rows]
        nb = -(-int(s_ends.max()) // bs)
        s_table = table[s_rows, :nb]                                               # (s, nb)
        s_mask = (torch.arange(nb * bs, device=device)[None, :] < s_ends[:, None])[:, None, None, :]
    longs = []                                                                     # pieces of prompts
    for r in range(n):
        if sizes[r] > 1:
            past, size = int(ends[r]) - sizes[r], sizes[r]
            mask = (torch.arange(past + size, device=device)[None, :]
                    <= past + torch.arange(size, device=device)[:, None])          # (size, past + size)
            blocks = table[r, :-(-(past + size) // bs)]
            longs.append((int(first[r]), size, past, blocks, mask.repeat(group, 1)))

    def attend(i, q, k, v):
        k_pool, v_pool = cache.k[i], cache.v[i]                                    # (blocks, bs, H_kv, d)
        (H, N, d), H_kv = q.shape, k.shape[0]
        k_pool[block, offset] = k.transpose(0, 1)
        v_pool[block, offset] = v
        out = q.new_empty(H, N, d)
        if singles:
            s = len(singles)
            K = k_pool[s_table].flatten(1, 2).transpose(1, 2)                      # (s, H_kv, nb*bs, d)
            V = v_pool[s_table].flatten(1, 2).transpose(1, 2)
            q1 = q[:, s_tok].transpose(0, 1).reshape(s, H_kv, group, d)
            o1 = F.scaled_dot_product_attention(q1, K, V, attn_mask=s_mask)       # (s, H_kv, group, d)
            out[:, s_tok] = o1.reshape(s, H, d).transpose(0, 1)
        for at, size, past, blocks, mask in longs:
            qr = q[:, at:at + size].reshape(H_kv, group * size, d)                 # (H_kv, group*size, d)
            K = k_pool[blocks].flatten(0, 1)[:past + size].transpose(0, 1)         # (H_kv, T_k, d)
            V = v_pool[blocks].flatten(0, 1)[:past + size].transpose(0, 1)
            o = F.scaled_dot_product_attention(qr, K, V, attn_mask=mask)
            out[:, at:at + size] = o.view(H, size, d)
        return out
    return attend


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


class BlockPrefixCache:
    """Full blocks of recent sequences, kept in a PagedKVCache's pool, per tenant.

    vLLM's automatic prefix caching: a block is found by its tokens and
    everything before it, the key (parent, tokens) where parent is the node
    number of the block before (0 for a sequence's first block). A row that
    finds blocks starts on them (PagedKVCache.share): nothing is copied, and a
    full block is never written again. Only whole blocks are kept and found,
    so a hit, and the cached_tokens a server reports, is a multiple of
    block_size: a client cannot learn a cached text one token at a time.

    Each salt (a tenant: a client, or a client's cache_salt; any hashable) has
    its own table: a prompt finds only blocks cached under its own salt.
    At most max_blocks blocks in all; when more are needed, the tenant holding
    the most loses its least recently used block, so one tenant's flood
    evicts its own entries, not another's. A lookup marks the blocks it found
    used from the last to the first, so a sequence's tail goes before its head.
    """

    def __init__(self, cache, max_blocks):
        if not isinstance(max_blocks, int) or isinstance(max_blocks, bool) or max_blocks < 0:
            raise ValueError(f"max_blocks must be an integer >= 0, got {max_blocks!r}")
        self.cache, self.max_blocks = cache, max_blocks
        self.tenants = {}                 # salt -> OrderedDict (parent, tokens) -> (node, block), oldest first
        self.blocks = 0                   # blocks held, all tenants
        self.nodes = 0                    # the last node number given

    def _keys(self, ids):
        bs = self.cache.block_size
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]
        return [tuple(ids[b * bs:(b + 1) * bs]) for b in range(len(ids) // bs)]

    @staticmethod
    def _table(tenants, salt):
        try:
            return tenants.get(salt)
        except TypeError:
            raise ValueError(f"a cache salt must be hashable, got {type(salt).__name__}") from None

    def longest(self, ids, salt=None):
        """The blocks holding the longest run of whole blocks that ids begins with,
        cached under salt (a list of block ids, maybe empty)."""
        table = self._table(self.tenants, salt)
        found, keys, parent = [], [], 0
        for tokens in self._keys(ids) if table else []:
            hit = table.get((parent, tokens))
            if hit is None:
                break
            keys.append((parent, tokens))
            parent = hit[0]
            found.append(hit[1])
        for key in reversed(keys):
            table.move_to_end(key)
        return found

    def add(self, ids, blocks, salt=None):
        """Keep the whole blocks of a sequence: ids, its tokens; blocks, the blocks
        that hold them (a row's table). Blocks already cached stay as they are."""
        if self._table(self.tenants, salt) is None:
            if self.max_blocks == 0:
                return
            self.tenants[salt] = collections.OrderedDict()
        table, keys, parent = self.tenants[salt], [], 0
        for tokens, block in zip(self._keys(ids), blocks):
            key = (parent, tokens)
            if key not in table:
                self.nodes += 1
                table[key] = (self.nodes, block)
                self.cache.hold(block)
                self.blocks += 1
            keys.append(key)
            parent = table[key][0]
        for key in reversed(keys):
            table.move_to_end(key)
        while self.blocks > self.max_blocks:
            salt = max(self.tenants, key=lambda s: len(self.tenants[s]))      # the largest tenant
            _, (_, block) = self.tenants[salt].popitem(last=False)
            self.cache.drop(block)
            self.blocks -= 1
            if not self.tenants[salt]:
                del self.tenants[salt]

    def tokens(self, salt=None):
        """Tokens cached under salt (whole blocks)."""
        table = self._table(self.tenants, salt)
        return len(table) * self.cache.block_size if table else 0

    def renumber(self, remap):
        """After PagedKVCache.trim(): block ids {old: new}."""
        for table in self.tenants.values():
            for key, (node, block) in table.items():
                table[key] = (node, remap[block])


# ----------------------------------------------------------------------------
# The server's engine, by its old address
# ----------------------------------------------------------------------------

_MOVED = {"Engine": "engine", "Sequence": "engine", "SamplingParams": "params",
          "LlamaBatch": "runner", "WindowBatch": "runner", "make_batch": "runner"}


def __getattr__(name):
    """gptcourse.batching.Engine (chapter 17) and the other names that moved to
    gptcourse.serve, looked up when first asked for: gptcourse.serve imports
    this module, and needs FastAPI, which the steps above do not."""
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f"gptcourse.serve.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
