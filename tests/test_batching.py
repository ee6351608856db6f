"""gptcourse.batching and the engine on it (gptcourse.serve.engine): batched
decoding gives one-at-a-time decoding's tokens.

The references: each model's own forward pass on one sequence (with its
KVCache for the Llama), model.generate one prompt at a time, and a naive
str.find for the stop strings. A small random Llama keeps them fast; the real
SmolLM2 is checked the same way in test_serve_llama.py.
"""
import random
import threading
import time

import pytest
import torch

from gptcourse.batching import PrefixCache, RaggedKVCache, llama_step, window_step
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.sampling import StopMatcher
from gptcourse.serve import Engine, LlamaBatch, Sequence
from serve_helpers import cached_kv, tiny_llama_model


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_llama_model()


def test_ragged_step_equals_the_models_forward(tiny_llama):
    """One step, four rows: a decoding row (1 token), a piece of a prompt after 5
    cached tokens, a whole prompt, a row that waits. Each row's logits and cache
    are those of the row alone (Llama.forward with its own KVCache)."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (n,)).tolist() for n in (6, 9, 12, 4)]
    past = [5, 5, 0, 4]
    cache = RaggedKVCache(2, 5, 2, 8, max_length=64)
    for row, (s, p) in enumerate(zip(seqs, past)):
        if p:
            cache.put(row, *cached_kv(tiny_llama, s[:p]))
    chunks = [s[p:] for s, p in zip(seqs, past)]
    chunks[3] = []
    logits = llama_step(tiny_llama, chunks, cache)
    for row, s in enumerate(seqs[:3]):
        alone, _ = tiny_llama(torch.tensor([s]))
        torch.testing.assert_close(logits[row], alone[0, -1], atol=1e-5, rtol=1e-5)
        k, v = cached_kv(tiny_llama, s)
        for i in range(2):
            torch.testing.assert_close(cache.k[i][row, :, :len(s)], k[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[i][row, :, :len(s)], v[i], atol=1e-5, rtol=1e-5)
    assert cache.lengths[:4].tolist() == [6, 9, 12, 4] and not logits[3].any()
    logits = llama_step(tiny_llama, [[1], [2], [3], [4]], cache)   # then all decode together
    for row, (s, t) in enumerate(zip(seqs, [1, 2, 3, 4])):
        torch.testing.assert_close(logits[row], tiny_llama(torch.tensor([s + [t]]))[0][0, -1],
                                   atol=1e-5, rtol=1e-5)
    cache.move(2, 0)                                   # row 0 leaves; the last row takes its place
    assert cache.lengths[0] == 13
    torch.testing.assert_close(cache.k[1][0, :, :13], cache.k[1][2, :, :13])
    with pytest.raises(ValueError, match="no tokens"):
        llama_step(tiny_llama, [[], []], cache)
    with pytest.raises(ValueError, match="1 .. 5 rows"):
        llama_step(tiny_llama, [[1]] * 6, cache)


def test_prefix_cache_finds_the_longest_shared_beginning_and_forgets_the_oldest():
    kv = lambda n: ([torch.full((1, n, 2), float(n))], [torch.zeros(1, n, 2)])   # noqa: E731
    pc = PrefixCache(max_tokens=10)
    pc.add([1, 2, 3], *kv(3))
    pc.add([1, 2, 9, 9], *kv(4))
    assert pc.longest([1, 2, 3, 4])[0] == 3 and pc.longest([1, 2, 9])[0] == 3
    assert pc.longest([7])[0] == 0 and pc.longest([7])[1] is None
    pc.add([1, 2, 3, 4, 5], *kv(5))                    # continues [1, 2, 3]: that entry goes
    assert [e[0].tolist() for e in pc.entries] == [[1, 2, 9, 9], [1, 2, 3, 4, 5]] and pc.tokens == 9
    pc.longest([1, 2, 9, 9, 9])                        # used: now the most recent
    pc.add([5, 5, 5], *kv(3))                          # 12 > 10 tokens: the least recently used goes
    assert [e[0].tolist() for e in pc.entries] == [[1, 2, 9, 9], [5, 5, 5]] and pc.tokens == 7
    pc.add(list(range(11)), *kv(11))                   # larger than the whole cache: not kept
    assert pc.tokens == 7
    pc.add([5, 5, 5, 6], *kv(4), salt="alice")         # another client's: neither seen nor covering
    assert pc.longest([5, 5, 5, 6])[0] == 3 and pc.longest([5, 5, 5, 6], salt="alice")[0] == 4
    assert pc.longest([1, 2, 9], salt="bob") == (0, None)
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(-1)


def test_a_prompt_starts_from_a_remembered_conversation(tiny_llama):
    """Blocks of 4 tokens: a remembered 8-token prompt is 2 whole blocks, [7 8 9 10]
    and [11 12 1 2]; a later prompt finds the whole blocks it begins with (never
    its last token: that one is computed), and shares them (the same block ids)."""
    batch = LlamaBatch(tiny_llama, rows=2, max_length=64, block_size=4)
    shared = [7, 8, 9, 10, 11, 12]
    assert batch.start(0, shared + [1, 2]) == (shared + [1, 2], 0)     # nothing remembered yet
    logits = batch.step([shared + [1, 2]])
    torch.testing.assert_close(logits[0], tiny_llama(torch.tensor([shared + [1, 2]]))[0][0, -1],
                               atol=1e-5, rtol=1e-5)
    batch.remember(0, shared + [1, 2])
    assert batch.start(1, shared + [3]) == ([11, 12, 3], 4) and batch.reused == 4   # 1 whole block of 6
    assert batch.cache.tables[1][0] == batch.cache.tables[0][0]        # shared, not copied
    logits = batch.step([[5], [11, 12, 3]])            # row 0 decodes, row 1 reads the rest of its prompt
    for row, s in enumerate([shared + [1, 2, 5], shared + [3]]):
        torch.testing.assert_close(logits[row], tiny_llama(torch.tensor([s]))[0][0, -1], atol=1e-5, rtol=1e-5)
    assert batch.start(1, shared + [1, 2]) == ([11, 12, 1, 2], 4)      # 7 tokens to look up: 1 whole block
    assert batch.start(1, shared + [1, 2, 4]) == ([4], 8)              # 8: both blocks
    with pytest.raises(ValueError, match="holds 9 positions, not 6"):
        batch.remember(0, shared)
    with pytest.raises(ValueError, match="max_length=64"):
        batch.start(0, [1] * 65)


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


def _engine(model, block_size, **settings):
    """An Engine whose LlamaBatch has blocks of block_size tokens (the server's
    16 would find nothing in these tests' short prompts)."""
    engine = Engine(model, Ids(), **settings)
    with engine.cond:                                  # before any request: the loop waits
        engine.batch = LlamaBatch(model, engine.max_batch, settings["max_length"], block_size=block_size)
    return engine


class Ids:                                             # a tokenizer that writes token ids as text
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


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


@pytest.mark.parametrize("max_step_tokens", [256, 4])
def test_engine_batched_greedy_equals_one_at_a_time(tiny_llama, max_step_tokens):
    """With a budget of 4 tokens a step, the longer prompts are read in pieces
    over several steps while the others decode: the tokens do not change."""
    torch.manual_seed(2)
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in (3, 11, 7, 20, 1)]
    expected = [tiny_llama.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist() for p in prompts]
    engine = _engine(tiny_llama, 4, max_batch=3, max_length=64, max_step_tokens=max_step_tokens)
    try:
        seqs, results = _decode(engine, prompts, 12, temperature=0)
        assert [s.tokens for s in seqs] == expected
        assert all(r == ("end", ("length", 12)) for r in results.values())
        stats = dict(engine.stats)
        assert stats["max_batch_seen"] == 3 and stats["prefills"] == 5
        assert stats["prompt_tokens"] == sum(map(len, prompts)) and stats["reused_tokens"] == 0
        # a follow-up: the first conversation and a new turn; the whole blocks of
        # the conversation but the answer's last token (never fed to the model)
        # come from the prefix cache: 20 + 11 = 31 tokens, 7 blocks of 4
        follow = prompts[3] + expected[3] + [4, 5]
        seqs, results = _decode(engine, [follow], 3, temperature=0)
        assert results[0][0] == "end", results
        assert seqs[0].tokens == tiny_llama.generate(torch.tensor([follow]), 3, temperature=0)[0, len(follow):].tolist()
        assert engine.stats["reused_tokens"] == 28
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="max_step_tokens"):
        Engine(tiny_llama, Ids(), max_step_tokens=0)


def test_a_long_prompt_is_read_in_pieces_while_another_answer_keeps_coming(tiny_llama):
    """Chunked prefill: with a budget of 8 tokens a step, a 60-token prompt that
    arrives while a sequence decodes takes 8 steps, and every one of them also
    gives the decoding sequence its next token."""
    engine = Engine(tiny_llama, Ids(), max_batch=2, max_length=128, max_step_tokens=8)
    steps, step = [], engine.batch.step

    def recorded(chunks):                     # at least 4 ms a step: the first answer lasts 0.4 s or more
        steps.append([len(c) for c in chunks])
        time.sleep(0.004)
        return step(chunks)
    engine.batch.step = recorded
    torch.manual_seed(3)
    short, long = torch.randint(0, 50, (3,)).tolist(), torch.randint(0, 50, (60,)).tolist()
    started, done = threading.Event(), threading.Semaphore(0)

    def events(kind, data):
        if kind == "text":
            started.set()
        else:
            done.release()
    try:
        first = engine.submit(Sequence(short, 100, events, temperature=0))
        assert started.wait(60)
        second = engine.submit(Sequence(long, 2, lambda kind, data: kind != "text" and done.release(),
                                        temperature=0))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.stop()
    reading = [s for s in steps if len(s) == 2 and s[1] > 1]
    assert [s[1] for s in reading] == [7] * 8 + [4]          # 60 tokens: 7 per step beside the decoding one
    assert all(s[0] == 1 and sum(s) <= 8 for s in reading)
    assert len(first.tokens) == 100 and len(steps) >= 100
    for seq, prompt, n in ((first, short, 100), (second, long, 2)):
        assert seq.tokens == tiny_llama.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


def test_requests_that_share_a_beginning_join_and_leave_and_find_it_in_the_prefix_cache(tiny_llama):
    """Chapter 17's scene: five requests, all starting with the same 10 tokens (a
    system message), two rows. Submitted together, the first two are read in one
    pass; each later one joins when a row frees up and finds exactly the shared
    beginning in the prefix cache (their next tokens all differ, so nothing more
    can match). Answers of different lengths leave at different steps; every
    answer is one-at-a-time greedy decoding's. Blocks of 5 tokens: the shared
    beginning is 2 whole blocks."""
    torch.manual_seed(4)
    shared = torch.randint(0, 50, (10,)).tolist()
    firsts = torch.randperm(50)[:5].tolist()                       # distinct: the prompts part here
    prompts = [shared + [f] + torch.randint(0, 50, (n,)).tolist() for f, n in zip(firsts, (2, 5, 0, 3, 1))]
    lengths = [3, 8, 5, 6, 4]
    expected = [tiny_llama.generate(torch.tensor([p]), n, temperature=0)[0, len(p):].tolist()
                for p, n in zip(prompts, lengths)]
    engine = _engine(tiny_llama, 5, max_batch=2, max_length=64)
    steps, step = [], engine.batch.step

    def recorded(chunks):
        steps.append([len(c) for c in chunks])
        return step(chunks)
    engine.batch.step = recorded
    done = threading.Semaphore(0)
    seqs = [Sequence(p, n, lambda kind, data: kind != "text" and done.release(), temperature=0)
            for p, n in zip(prompts, lengths)]
    try:
        with engine.cond:                                          # all wait for the first plan
            for s in seqs:
                engine.submit(s)
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert [s.tokens for s in seqs] == expected
    assert steps[0] == [len(prompts[0]), len(prompts[1])]          # two prompts, one pass
    assert [s.cached_tokens for s in seqs] == [0, 0, 10, 10, 10]
    assert engine.stats["prompt_tokens"] == sum(map(len, prompts)) - 30
    assert engine.stats["reused_tokens"] == 30
    assert max(map(len, steps)) == 2 and engine.stats["max_batch_seen"] == 2
    # the passes fed the prompts' uncached tokens and every answer token but each answer's last
    assert sum(map(sum, steps)) == sum(map(len, prompts)) - 30 + sum(lengths) - len(prompts)


def test_a_request_that_fails_on_admission_gives_its_blocks_back(tiny_llama, monkeypatch):
    """A request whose admission fails after its row took blocks (here: the prefix
    cache's blocks of its prompt, then its text output cannot be built) gets its
    error, and the row holds no block afterwards: every block is held once, by the
    prefix cache. The next request is answered as one-at-a-time decoding answers it."""
    import gptcourse.serve.engine as engine_module
    engine = _engine(tiny_llama, 4, max_batch=2, max_length=64)
    real = engine_module.TextOutput
    failing = {"now": False}

    def text_output(*args):
        if failing["now"]:
            raise RuntimeError("no output for you")
        return real(*args)
    monkeypatch.setattr(engine_module, "TextOutput", text_output)
    torch.manual_seed(5)
    prompt = torch.randint(0, 50, (13,)).tolist()                  # 3 whole blocks of 4, and 1
    expected = tiny_llama.generate(torch.tensor([prompt]), 3, temperature=0)[0, 13:].tolist()
    cache = engine.batch.cache
    try:
        seqs, results = _decode(engine, [prompt], 3, temperature=0)   # remembered: the prefix cache holds it
        assert results[0][0] == "end" and seqs[0].tokens == expected
        failing["now"] = True
        _, results = _decode(engine, [prompt], 3, temperature=0)
        assert results[0][0] == "error" and "no output for you" in results[0][1]
        with engine.cond:
            assert all(table == [] for table in cache.tables)
            assert max(cache.refs) == 1 and sum(cache.refs) == cache.used
        failing["now"] = False
        seqs, results = _decode(engine, [prompt], 3, temperature=0)
        assert results[0][0] == "end" and seqs[0].tokens == expected
    finally:
        engine.stop()
