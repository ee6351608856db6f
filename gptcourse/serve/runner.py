"""The model runner: the rows of a batch, kept for one model, stepped as one.

The engine (gptcourse.serve.engine) sees a batch through four calls:
start(row, prompt, salt) -> (the prompt's tokens still to read, how many came
from the prefix cache instead); step(chunks) -> logits (n, V), one forward
pass; remember(row, ids, salt): keep the row's keys and values for later
prompts; move(src, dst): keep the active rows packed.
Two ways, one per model family of the course, on gptcourse.batching's steps:

* `LlamaBatch`: rows of a RaggedKVCache, stepped by llama_step, with a
  PrefixCache of recent conversations;
* `WindowBatch`: token windows of a GPT, recomputed by window_step each step.
"""
from ..batching import PrefixCache, RaggedKVCache, llama_step, window_step


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

    def memory(self, active):
        """What the keys and values hold: the ragged cache's bytes and positions, the
        positions the `active` rows use, and the prefix cache's tokens."""
        c = self.cache
        return {"kv_cache_bytes": sum(t.nbytes for t in c.k + c.v),
                "kv_cache_positions": c.rows * c.capacity,
                "kv_cache_positions_in_use": int(c.lengths[:active].sum()) if active else 0,
                "prefix_cache_tokens": self.prefixes.tokens}


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


def make_batch(model, rows, max_length, prefix_tokens=4096):
    """LlamaBatch for a model with rotary positions (gptcourse.llama), else WindowBatch."""
    from ..llama import Llama
    if isinstance(model, Llama):
        return LlamaBatch(model, rows, max_length, prefix_tokens)
    return WindowBatch(model, rows, max_length)

