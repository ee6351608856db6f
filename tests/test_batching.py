"""gptcourse.batching: batched decoding gives one-at-a-time decoding's tokens.

The references: each model's own forward pass on one sequence (with its
KVCache for the Llama), model.generate one prompt at a time, and a naive
str.find for the stop strings. A small random Llama keeps them fast; the real
SmolLM2 is checked the same way in test_serve_llama.py.
"""
import random
import threading

import pytest
import torch

from gptcourse.attention import KVCache
from gptcourse.batching import (Engine, LlamaBatch, RaggedKVCache, Sequence, StopMatcher, llama_decode_step,
                                window_step)
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                         block_size=128)
    return Llama(config).eval()


def test_ragged_decode_step_equals_the_models_forward(tiny_llama):
    """Three rows of different lengths, one step: each row's logits and cache as
    if the row were alone (Llama.forward with its own KVCache)."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in (5, 17, 9)]
    nxt = [3, 4, 5]
    cache = RaggedKVCache(2, 4, 2, 8, max_length=64)
    for row, p in enumerate(prompts):
        caches = [KVCache() for _ in range(2)]
        tiny_llama(torch.tensor([p]), caches=caches)
        cache.put(row, caches)
    logits = llama_decode_step(tiny_llama, torch.tensor(nxt), cache)
    for row, (p, t) in enumerate(zip(prompts, nxt)):
        alone, _ = tiny_llama(torch.tensor([p + [t]]))
        torch.testing.assert_close(logits[row], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.lengths[:3].tolist() == [6, 18, 10]
    cache.move(2, 0)                                   # row 0 leaves; the last row takes its place
    assert cache.lengths[0] == 10
    torch.testing.assert_close(cache.k[1][0, :, :10], cache.k[1][2, :, :10])


def test_prefill_reuses_a_common_prefix_and_gives_the_same_logits(tiny_llama):
    batch = LlamaBatch(tiny_llama, rows=2, max_length=64)
    shared = [7, 8, 9, 10, 11, 12]
    for row, prompt in enumerate([shared + [1, 2], shared + [3]]):
        logits = batch.add(row, prompt)
        torch.testing.assert_close(logits, tiny_llama(torch.tensor([prompt]))[0][0, -1], atol=1e-5, rtol=1e-5)
    assert batch.reused == len(shared)
    assert batch.cache.lengths[:2].tolist() == [8, 7]
    batch.add(0, shared)                              # the same prompt again: all but its last token reused
    assert batch.reused == 2 * len(shared) - 1


def test_ragged_cache_checks_its_arguments():
    with pytest.raises(ValueError, match="rows"):
        RaggedKVCache(2, 0, 2, 8, max_length=64)
    cache = RaggedKVCache(1, 1, 1, 2, max_length=8)
    with pytest.raises(ValueError, match="max_length=8"):
        cache.reserve(9)


def test_window_step_equals_the_models_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=20)).eval()
    windows = [[1, 2, 3], list(range(12)), [5]]
    logits = window_step(model, windows)
    for row, w in enumerate(windows):
        torch.testing.assert_close(logits[row], model(torch.tensor([w]))[0][0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1 .. 12"):
        window_step(model, [list(range(13))])


def test_stop_matcher_agrees_with_str_find():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(30))
        m, seen, found = StopMatcher(stops), "", None
        while seen != text:                                        # fed in random pieces
            piece = text[len(seen):len(seen) + rng.randint(1, 4)]
            hit = m.feed(piece)
            if hit is not None:
                found = (len(seen) + hit[0], hit[1])
                break
            seen += piece
            # what is held back is exactly the longest suffix that starts a stop string
            assert m.held_back == max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])),
                                      default=0)
        ends = [(text.find(s) + len(s), s) for s in stops if s in text]
        if ends:
            end = min(e for e, _ in ends)
            assert found is not None and found[0] == end and text[:end].endswith(found[1])
        else:
            assert found is None


def _decode(engine, prompts, n, **settings):
    done, results = threading.Event(), {}

    def on_event(i):
        def f(kind, data):
            if kind in ("end", "error"):
                results[i] = (kind, data)
                if len(results) == len(prompts):
                    done.set()
        return f
    seqs = [Sequence(p, n, on_event(i), **settings) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.submit(s)
    assert done.wait(300)
    return seqs, results


def test_engine_batched_greedy_equals_one_at_a_time(tiny_llama):
    torch.manual_seed(2)
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in (3, 11, 7, 20, 1)]
    expected = [tiny_llama.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist() for p in prompts]

    class Ids:                                         # a tokenizer that writes token ids as text
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    engine = Engine(tiny_llama, Ids(), max_batch=3, max_length=64)
    try:
        seqs, results = _decode(engine, prompts, 12, temperature=0)
    finally:
        engine.stop()
    assert [s.tokens for s in seqs] == expected
    assert all(r == ("end", ("length", 12)) for r in results.values())
    assert engine.stats["max_batch_seen"] == 3 and engine.stats["prefills"] == 5
