"""The model runner: the rows of a batch, kept for one model, stepped as one.

The engine (gptcourse.serve.engine) sees a batch through four calls:
start(row, prompt, salt) -> (the prompt's tokens still to read, how many came
from the prefix cache instead); step(chunks) -> logits (n, V), one forward
pass; remember(row, ids, salt): keep the row's keys and values for later
prompts; move(src, dst): row dst is done, row src takes its place (the
active rows stay packed).
Two ways, one per model family of the course, on gptcourse.batching's steps:

* `LlamaBatch`: rows of a PagedKVCache (blocks of a pool, as vLLM), stepped
  by llama_step, with a BlockPrefixCache of recent conversations that
  shares their blocks, one table per tenant (salt);
* `WindowBatch`: token windows of a GPT, recomputed by window_step each step.
"""
from ..batching import BlockPrefixCache, PagedKVCache, llama_step, window_step


class LlamaBatch:
    """Rows of a PagedKVCache: blocks of block_size positions, taken from a pool as
    a row grows and given back when its sequence ends.

    start(row, prompt, salt) -> (the prompt's tokens still to be read, how
    many came from the prefix cache instead: whole blocks, a multiple of
    block_size); step(chunks) -> logits (n, V); remember(row, ids, salt):
    keep the row's whole blocks (ids: the tokens in it) for later prompts
    with the same salt; move(src, dst): row dst's sequence is over, row src
    takes its place (src == dst: the row is just released). prefix_tokens:
    the prefix cache's capacity, in tokens (whole blocks of it).
    """

    def __init__(self, model, rows, max_length, prefix_tokens=4096, block_size=16):
        c = model.config
        p = next(model.parameters())
        self.model = model
        self.max_length = min(max_length, c.block_size)
        self.cache = PagedKVCache(c.n_layer, rows, c.n_kv_head, c.head_size, self.max_length,
                                  block_size=block_size, dtype=p.dtype, device=p.device)
        self.prefixes = BlockPrefixCache(self.cache, prefix_tokens // block_size)
        self.reused = 0                               # prompt tokens not recomputed, in all

    def start(self, row, prompt_ids, salt=None):
        if not 1 <= len(prompt_ids) <= self.max_length:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit 1 .. max_length={self.max_length}")
        blocks = self.prefixes.longest(prompt_ids[:-1], salt)          # leave >= 1 token to compute
        same = len(blocks) * self.cache.block_size
        self.cache.share(row, blocks, same)
        self.reused += same
        return list(prompt_ids[same:]), same

    def step(self, chunks):
        return llama_step(self.model, chunks, self.cache)

    def remember(self, row, ids, salt=None):
        if len(ids) != int(self.cache.lengths[row]):
            raise ValueError(f"row {row} holds {int(self.cache.lengths[row])} positions, not {len(ids)}")
        self.prefixes.add(ids, self.cache.tables[row], salt)
        self._trim()

    def move(self, src, dst):
        self.cache.move(src, dst)
        self._trim()

    def _trim(self):
        remap = self.cache.trim()
        if remap:
            self.prefixes.renumber(remap)

    def memory(self, active):
        """What the keys and values hold: the pool's bytes, blocks and positions
        (allocated and in use: by the rows or the prefix cache), the positions the
        `active` rows fill, and the prefix cache's tokens and tenants."""
        c = self.cache
        return {"kv_cache_bytes": c.nbytes,
                "kv_cache_bytes_in_use": c.used * c.block_bytes,
                "kv_cache_block_size": c.block_size,
                "kv_cache_blocks": c.blocks,
                "kv_cache_blocks_in_use": c.used,
                "kv_cache_positions": c.blocks * c.block_size,
                "kv_cache_positions_in_use": int(c.lengths[:active].sum()) if active else 0,
                "prefix_cache_tokens": self.prefixes.blocks * c.block_size,
                "prefix_cache_tenants": len(self.prefixes.tenants)}


class WindowBatch:
    """Token windows of a GPT: every step recomputes each row's last block_size tokens
    (the window slides: a sequence of any length fits)."""

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

    def memory(self, active):
        """No KV cache: every step recomputes the windows."""
        return {}


def make_batch(model, rows, max_length, prefix_tokens=4096, block_size=16):
    """LlamaBatch for a model with rotary positions (gptcourse.llama), else WindowBatch."""
    from ..llama import Llama
    if isinstance(model, Llama):
        return LlamaBatch(model, rows, max_length, prefix_tokens, block_size)
    return WindowBatch(model, rows, max_length)

