"""gptcourse.batching's paged KV cache (PagedKVCache) and its prefix cache of
shared blocks (BlockPrefixCache), what the server's LlamaBatch runs on.

The references: the model's own forward pass on one sequence (with its
KVCache), the contiguous RaggedKVCache on the same steps, and block counts
worked out by hand in each test.
"""
import pytest
import torch

from gptcourse.batching import BlockPrefixCache, PagedKVCache, RaggedKVCache, llama_step
from gptcourse.llama import Llama, LlamaConfig
from serve_helpers import cached_kv, tiny_llama_model


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_llama_model()


def _paged(rows=4, block_size=4, min_blocks=2, max_length=128):
    return PagedKVCache(2, rows, 2, 8, max_length=max_length, block_size=block_size, min_blocks=min_blocks)


def test_paged_steps_equal_the_models_forward_and_the_ragged_cache(tiny_llama):
    """Prompts of 6, 9, 12 and 1 tokens read in pieces of 5 (so rows cross blocks of
    4 in the middle of a step), then 7 steps where all decode together: every
    row's logits are the model's on the row alone, and the ragged cache's on the
    same steps; the row's keys and values are the model's."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (n,)).tolist() for n in (6, 9, 12, 1)]
    paged, ragged = _paged(), RaggedKVCache(2, 4, 2, 8, max_length=128)
    done = [0, 0, 0, 0]
    while any(d < len(s) for d, s in zip(done, seqs)):
        chunks = [s[d:d + 5] for d, s in zip(done, seqs)]
        got, ref = llama_step(tiny_llama, chunks, paged), llama_step(tiny_llama, chunks, ragged)
        done = [d + len(c) for d, c in zip(done, chunks)]
        for row, c in enumerate(chunks):
            if c:
                alone = tiny_llama(torch.tensor([seqs[row][:done[row]]]))[0][0, -1]
                torch.testing.assert_close(got[row], alone, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got[row], ref[row], atol=1e-5, rtol=1e-5)
    for t in range(7):
        chunks = [[(7 * row + t) % 50] for row in range(4)]
        got, ref = llama_step(tiny_llama, chunks, paged), llama_step(tiny_llama, chunks, ragged)
        for row, c in enumerate(chunks):
            seqs[row] = seqs[row] + c
            torch.testing.assert_close(got[row], tiny_llama(torch.tensor([seqs[row]]))[0][0, -1],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[row], ref[row], atol=1e-5, rtol=1e-5)
    assert paged.lengths.tolist() == [13, 16, 19, 8]
    assert [len(t) for t in paged.tables] == [4, 4, 5, 2]          # ceil(length / 4)
    assert paged.used == 15 and len({b for t in paged.tables for b in t}) == 15
    for row, s in enumerate(seqs):
        k, v = cached_kv(tiny_llama, s)
        got_k, got_v = paged.get(row)
        for i in range(2):
            torch.testing.assert_close(got_k[i], k[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_v[i], v[i], atol=1e-5, rtol=1e-5)


def test_blocks_come_back_and_the_pool_shrinks(tiny_llama):
    """A 40-token row takes 10 blocks of 4: the pool grows from nothing by
    max(half, min_blocks=2): 2, 4, 6, 9, 13 blocks. When the row ends its blocks
    are free; trim() then keeps min_blocks. A second row, moved into row 0
    while the pool is compacted, still decodes the model's tokens."""
    cache = _paged(rows=2)
    long, short = list(range(40)), [3, 1, 4, 1, 5]
    llama_step(tiny_llama, [long, short], cache)
    assert [len(t) for t in cache.tables] == [10, 2] and cache.used == 12
    assert cache.blocks == 13 and cache.nbytes == 13 * cache.block_bytes
    assert cache.block_bytes == 2 * 2 * 4 * 2 * 8 * 4                   # k and v, layers, positions, heads, d, float32
    assert cache.trim() is None                                         # 12 of 13 in use
    cache.move(1, 0)                                                    # the long one ends; the short one moves up
    assert cache.used == 2 and cache.tables[1] == [] and cache.lengths.tolist() == [5, 0]
    before = list(cache.tables[0])
    remap = cache.trim()                                                # 2 of 13 in use: shrink
    assert cache.blocks == 2 and cache.tables[0] == [remap[b] for b in before] == [0, 1]
    assert cache.nbytes == 2 * cache.block_bytes
    for t in range(6):                                                  # grows again as it decodes
        logits = llama_step(tiny_llama, [[t]], cache)
        short = short + [t]
        torch.testing.assert_close(logits[0], tiny_llama(torch.tensor([short]))[0][0, -1], atol=1e-5, rtol=1e-5)
    assert cache.lengths[0] == 11 and len(cache.tables[0]) == 3 and cache.blocks == 4
    cache.move(0, 0)                                                    # the last row ends
    assert cache.used == 0 and cache.tables == [[], []] and sorted(cache.free) == [0, 1, 2, 3]


def test_a_pool_of_a_long_prompt_is_a_fraction_of_the_contiguous_cache(tiny_llama):
    """16 rows of up to 2,048 positions: the ragged cache reserves every row up to
    the longest (rows x capacity), the paged one the blocks in use (and a third
    more at most, after its last growth)."""
    config = LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                         block_size=2048)
    torch.manual_seed(0)
    model = Llama(config).eval()
    prompt = torch.randint(0, 50, (1400,)).tolist()
    ragged = RaggedKVCache(2, 16, 2, 8, max_length=2048)
    paged = PagedKVCache(2, 16, 2, 8, max_length=2048, block_size=16)
    for cache in (ragged, paged):
        for at in range(0, 1400, 256):
            llama_step(model, [prompt[at:at + 256]], cache)
    per_position = 2 * 2 * 2 * 8 * 4                                    # k and v, layers, heads, d, float32
    assert sum(t.nbytes for t in ragged.k + ragged.v) == 16 * 2048 * per_position      # 8 MiB
    assert paged.used == 88 and paged.blocks == 96                      # 1400 / 16 -> 88; the pool 32, 64, 96
    assert paged.nbytes == 96 * 16 * per_position                       # 0.38 MiB: 1/21 of the ragged cache


def test_the_prefix_cache_shares_whole_blocks_per_tenant():
    """Blocks of 4. alice's 10-token sequence: 2 whole blocks, held by the row and
    the cache (2 holders each), the 2 tokens past them not kept. A prompt finds
    whole blocks only, under its own salt only."""
    cache = _paged(rows=2, min_blocks=8)
    prefixes = BlockPrefixCache(cache, max_blocks=8)
    ids = list(range(10))
    cache.extend(0, 10)
    prefixes.add(ids, cache.tables[0], salt="alice")
    assert prefixes.blocks == 2 and [cache.refs[b] for b in cache.tables[0]] == [2, 2, 1]
    assert prefixes.longest(ids, "alice") == cache.tables[0][:2]
    assert prefixes.longest(list(range(7)), "alice") == cache.tables[0][:1]        # 7 tokens: 1 whole block
    assert prefixes.longest([0, 1, 2, 9, 4, 5, 6, 7], "alice") == []               # differs in block 0
    assert prefixes.longest(ids, "bob") == [] and prefixes.longest(ids) == []      # other tenants see nothing
    assert prefixes.tokens("alice") == 8 and prefixes.tokens("bob") == 0
    cache.release(0)                                                   # the row ends: the cache still holds 2
    assert cache.used == 2
    cache.share(1, prefixes.longest(ids, "alice"), 8)                  # a later prompt starts on them
    assert [cache.refs[b] for b in cache.tables[1]] == [2, 2] and cache.lengths[1] == 8
    with pytest.raises(ValueError, match="hashable"):
        prefixes.longest(ids, ["a", "list"])
    with pytest.raises(ValueError, match="max_blocks"):
        BlockPrefixCache(cache, -1)
    with pytest.raises(ValueError, match="do not hold 9"):
        cache.share(1, [0, 1], 9)
    with pytest.raises(ValueError, match="not in use"):
        cache.hold(7)


def test_one_tenant_cannot_flush_another():
    """Room for 6 blocks of 4. alice caches 2 blocks; mallory then sends 5
    sequences of 3 blocks each: the tenant holding the most loses its least
    recently used block, so mallory's flood evicts mallory's own blocks, the
    tail of a sequence before its head, and alice still finds her 8 tokens."""
    cache = _paged(rows=1, min_blocks=16)
    prefixes = BlockPrefixCache(cache, max_blocks=6)

    def send(ids, salt):
        cache.extend(0, len(ids))
        prefixes.add(ids, cache.tables[0], salt)
        cache.release(0)
    send([1] * 8, "alice")
    for i in range(5):
        send([10 + i] * 12, "mallory")
    assert prefixes.tokens("alice") == 8 and prefixes.tokens("mallory") == 16
    assert len(prefixes.longest([1] * 9, "alice")) == 2
    assert len(prefixes.longest([14] * 13, "mallory")) == 3            # the newest whole
    assert len(prefixes.longest([13] * 13, "mallory")) == 1            # the one before: its head only
    assert len(prefixes.longest([12] * 13, "mallory")) == 0
    assert prefixes.blocks == 6 and cache.used == 6                    # the evicted blocks are free
    nothing = BlockPrefixCache(cache, max_blocks=0)                    # a cache of 0 blocks keeps nothing
    cache.extend(0, 8)
    nothing.add([5] * 8, cache.tables[0], "alice")
    assert nothing.blocks == 0 and nothing.longest([5] * 9, "alice") == []


def test_trim_renumbers_the_prefix_cache():
    """A trim moves blocks to the front of a smaller pool: the prefix cache's
    blocks are renumbered and still hold the same keys."""
    cache = _paged(rows=2, min_blocks=2)
    prefixes = BlockPrefixCache(cache, max_blocks=8)
    cache.extend(0, 40)                                                # 10 blocks, 0 .. 9 (pool: 13)
    cache.extend(1, 8)                                                 # 10, 11
    for b in cache.tables[1]:
        cache.k[:, b] = float(b)
    prefixes.add(list(range(8)), cache.tables[1], "alice")
    cache.release(0)
    cache.release(1)
    remap = cache.trim()
    assert remap == {10: 0, 11: 1} and cache.blocks == 2
    prefixes.renumber(remap)
    assert prefixes.longest(list(range(9)), "alice") == [0, 1]
    assert cache.k[:, 0].eq(10).all() and cache.k[:, 1].eq(11).all()


def test_a_row_started_on_shared_blocks_never_writes_them(tiny_llama):
    """A 12-token prompt in blocks of 4 is remembered (3 blocks); the same prompt
    again finds 2 of them (its last token is computed: 11 to look up), reads
    its last 4 tokens into a block of its own and decodes 6 more: the shared
    blocks' keys and values do not change, and the logits are the model's."""
    from gptcourse.serve import LlamaBatch
    batch = LlamaBatch(tiny_llama, rows=2, max_length=64, block_size=4)
    prompt = list(range(3, 15))
    todo, found = batch.start(0, prompt)
    batch.step([todo])
    batch.remember(0, prompt)
    todo, found = batch.start(1, prompt)
    assert (todo, found) == (prompt[8:], 8)
    shared = batch.cache.tables[1][:2]
    assert shared == batch.cache.tables[0][:2] and [batch.cache.refs[b] for b in shared] == [3, 3]
    before = batch.cache.k[:, shared].clone(), batch.cache.v[:, shared].clone()
    seq, logits = list(prompt), batch.step([[], todo])
    for t in range(6):
        torch.testing.assert_close(logits[1], tiny_llama(torch.tensor([seq]))[0][0, -1], atol=1e-5, rtol=1e-5)
        seq.append(t)
        logits = batch.step([[], [t]])
    assert torch.equal(batch.cache.k[:, shared], before[0]) and torch.equal(batch.cache.v[:, shared], before[1])
    assert batch.cache.lengths[1] == 18 and len(batch.cache.tables[1]) == 5
    with pytest.raises(ValueError, match="max_length=64"):
        batch.step([[], [1] * 47])                                     # 18 + 47 = 65 positions


def test_the_batch_gives_memory_back_and_still_finds_its_prefixes(tiny_llama):
    """LlamaBatch, blocks of 4, a prefix cache of 16 tokens (4 blocks). Two
    100-token prompts take 25 blocks each, 0-24 and 25-49: the pool grows
    32 -> 64. Row 1's is remembered (its first 4 blocks, 25-28, kept: a
    sequence's tail goes first); row 0 ends and row 1 moves up: 25 blocks in
    use, under half of 64, so the pool is compacted to 32 (min_blocks; 25 and
    a quarter more is 31) and blocks 25-49 become 0-24. The prefix cache was
    renumbered: a prompt beginning like row 1's still finds 16 tokens, and
    both rows then get the model's logits."""
    from gptcourse.serve import LlamaBatch
    torch.manual_seed(5)
    a, b = torch.randint(0, 50, (100,)).tolist(), torch.randint(0, 50, (100,)).tolist()
    batch = LlamaBatch(tiny_llama, rows=2, max_length=128, prefix_tokens=16, block_size=4)
    batch.start(0, a)
    batch.start(1, b)
    batch.step([a, b])
    assert batch.cache.blocks == 64 and batch.cache.used == 50
    batch.remember(1, b)
    assert batch.prefixes.blocks == 4 and batch.memory(2)["kv_cache_blocks_in_use"] == 50
    assert batch.cache.tables[1][:4] == [25, 26, 27, 28]
    batch.move(1, 0)                                                    # row 0 ends, b moves up
    m = batch.memory(1)
    assert (m["kv_cache_blocks"], m["kv_cache_blocks_in_use"], m["prefix_cache_tokens"]) == (32, 25, 16)
    assert m["kv_cache_bytes"] == 32 * batch.cache.block_bytes and m["kv_cache_positions_in_use"] == 100
    assert batch.cache.tables[0] == list(range(25))
    c = b[:20] + [7]
    assert batch.start(1, c) == (c[16:], 16)
    logits = batch.step([[3], c[16:]])
    for row, seq in enumerate([b + [3], c]):
        torch.testing.assert_close(logits[row], tiny_llama(torch.tensor([seq]))[0][0, -1], atol=1e-5, rtol=1e-5)


def test_paged_cache_checks_its_arguments():
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="block_size"):
            PagedKVCache(1, 1, 1, 2, max_length=8, block_size=bad)
    with pytest.raises(ValueError, match="rows"):
        PagedKVCache(1, 0, 1, 2, max_length=8)
    cache = PagedKVCache(1, 1, 1, 2, max_length=8, block_size=4)
    with pytest.raises(ValueError, match="max_length=8"):
        cache.extend(0, 9)
    with pytest.raises(ValueError, match="not in use"):
        cache.drop(0)
