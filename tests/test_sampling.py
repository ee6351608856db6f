"""Sampling: top-k / top-p on hand-worked examples, greedy = argmax, and the
empirical distribution of many samples against the softmax."""
import math

import pytest
import torch

from gptcourse.sampling import sample_next, top_k_filter, top_p_filter

NEG = float("-inf")


def kept(filtered):
    return torch.isfinite(filtered).int().tolist()


# ---------------------------------------------------------------- top-k


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.5, -1.0, 2.0, 7.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[NEG, 5.0, NEG, 4.0, NEG], [NEG, NEG, 2.0, 7.0, NEG]]
    assert kept(top_k_filter(logits, 1)) == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert kept(top_k_filter(logits, 3)) == [[0, 1, 1, 1, 0], [1, 0, 1, 1, 0]]
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)  # k > V keeps all
    assert logits[0, 0] == 1.0  # input untouched


def test_top_k_keeps_ties():
    assert kept(top_k_filter(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 1)) == [[0, 1, 1, 0]]


@pytest.mark.parametrize("k", [0, -1, 2.0, None])
def test_top_k_bad(k):
    with pytest.raises(ValueError, match=f"top_k must be a positive integer, got {k!r}"):
        top_k_filter(torch.zeros(1, 3), k)


# ---------------------------------------------------------------- top-p


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 0, 2, 1], [2, 3, 1, 0]])
@pytest.mark.parametrize("p,n_kept", [
    (0.8, 2),    # mass before the 3rd is 0.5 + 0.3 = 0.8: it already reaches p -> dropped
    (0.81, 3),   # 0.8 < 0.81: the 3rd (which crosses p) is kept
    (0.5, 1),    # the first alone reaches 0.5
    (0.3, 1),    # the most likely token is always kept
    (0.95, 3),   # 0.5 + 0.3 + 0.15 = 0.95 reaches p
    (0.96, 4),
    (1.0, 4),    # everything
])
def test_top_p_hand_examples(p, n_kept, order, dtype):
    probs = torch.tensor(PROBS, dtype=dtype)[order]
    logits = probs.log()[None]
    out = top_p_filter(logits, p)
    expected = [1 if PROBS.index(PROBS[i]) < n_kept else 0 for i in order]
    assert kept(out) == [expected]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits unchanged


def test_top_p_rows_independent_and_shift_invariant():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log() + torch.tensor([[3.0], [-7.0]])
    assert kept(top_p_filter(logits, 0.8)) == [[1, 1, 0, 0], [0, 0, 1, 1]]


def test_top_p_one_keeps_everything_in_a_large_peaked_vocab():
    torch.manual_seed(0)
    logits = 8 * torch.randn(4, 50257)  # most tokens have probability far below float32 eps
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_top_p_keeps_the_smallest_nucleus_on_a_random_row():
    torch.manual_seed(1)
    logits = torch.randn(1, 1000, dtype=torch.float64)
    for p in (0.1, 0.5, 0.9, 0.99):
        out = top_p_filter(logits, p)
        # independent: sort in Python, add probabilities until p is reached
        probs = torch.softmax(logits[0], -1).tolist()
        ranked = sorted(range(1000), key=lambda i: -probs[i])
        total, nucleus = 0.0, set()
        for i in ranked:
            nucleus.add(i)
            total += probs[i]
            if total >= p:
                break
        assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == nucleus


def test_top_p_tiny_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    for p in (1e-3, 1e-6, 1e-12, 1e-300):
        assert kept(top_p_filter(logits, p)) == [[0, 1, 0, 0]]
        assert kept(top_p_filter(logits.double(), p)) == [[0, 1, 0, 0]]


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.01, 2])
def test_top_p_bad(p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got"):
        top_p_filter(torch.zeros(1, 3), p)


# ---------------------------------------------------------------- sample_next


def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert sample_next(logits, 0).shape == (6, 1)
    # top_k=1 is greedy at any temperature
    assert torch.equal(sample_next(logits, 1.5, top_k=1), logits.argmax(-1, keepdim=True))
    # a tiny top_p keeps only the most likely token
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), logits.argmax(-1, keepdim=True))


def test_sample_next_reproducible_with_generator():
    logits = torch.randn(8, 50)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    c = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape == (8, 1)


def empirical(logits_row, n=20000, seed=0, **kwargs):
    logits = logits_row.expand(n, -1)
    ids = sample_next(logits, generator=torch.Generator().manual_seed(seed), **kwargs)
    return torch.bincount(ids.flatten(), minlength=logits_row.shape[-1]).double() / n


def softmax_by_hand(xs):
    z = sum(math.exp(x) for x in xs)
    return torch.tensor([math.exp(x) / z for x in xs], dtype=torch.float64)


ROW = [2.0, 1.0, 0.5, -1.0, 0.0]


def test_samples_follow_softmax():
    freq = empirical(torch.tensor([ROW]), temperature=1.0)
    assert (freq - softmax_by_hand(ROW)).abs().max() < 0.02


def test_samples_follow_tempered_softmax():
    freq = empirical(torch.tensor([ROW]), temperature=2.0)
    assert (freq - softmax_by_hand([x / 2 for x in ROW])).abs().max() < 0.02
    freq = empirical(torch.tensor([ROW]), temperature=0.5)
    assert (freq - softmax_by_hand([x / 0.5 for x in ROW])).abs().max() < 0.02


def test_samples_after_top_k_and_top_p():
    # top-k 3: renormalised over the 3 largest, never another token
    freq = empirical(torch.tensor([ROW]), temperature=1.0, top_k=3)
    expected = torch.cat([softmax_by_hand(ROW[:3]), torch.zeros(2, dtype=torch.float64)])
    assert (freq[3:] == 0).all()
    assert (freq - expected).abs().max() < 0.02
    # top-p on probabilities [0.5, 0.3, 0.15, 0.05] at p = 0.8: only the first two, 5/8 and 3/8
    freq = empirical(torch.tensor([PROBS]).log(), temperature=1.0, top_p=0.8)
    assert (freq[2:] == 0).all()
    assert (freq - torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64)).abs().max() < 0.02


def test_sample_next_bad_args():
    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\), got \(5,\)"):
        sample_next(torch.zeros(5))
    with pytest.raises(ValueError, match=r"got \(1, 2, 5\)"):
        sample_next(torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        sample_next(torch.zeros(1, 5), temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(torch.zeros(1, 5), top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 5), top_p=0)


# ---------------------------------------------------------------- beam search

import itertools  # noqa: E402

from gptcourse.gpt import GPT, GPTConfig  # noqa: E402
from gptcourse.sampling import beam_search  # noqa: E402


def tiny_gpt(seed, vocab=4, block=16):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():                       # sharper distributions than the init gives
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def sequence_logprob(model, prompt, continuation):
    """sum_i log p(y_i | prompt, y_<i), from one forward pass over the whole sequence:
    independent of the search."""
    ids = torch.tensor([prompt + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0].double(), dim=-1)
    return sum(logp[len(prompt) - 1 + i, y].item() for i, y in enumerate(continuation))


def exhaustive(model, prompt, n, vocab, eos_id=None, length_penalty=0.0):
    """Every possible continuation (ending at the first eos, or after n tokens), scored."""
    best = None
    for length in range(1, n + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos_id is not None:
                if eos_id in seq[:-1]:
                    continue
                if length < n and seq[-1] != eos_id:
                    continue
            elif length < n:
                continue
            score = sequence_logprob(model, prompt, seq)
            key = score / length ** length_penalty
            if best is None or key > best[0]:
                best = (key, score, seq)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_as_wide_as_all_prefixes_is_exhaustive(seed):
    model, prompt, n, V = tiny_gpt(seed), [1, 2], 4, 4
    _, score, seq = exhaustive(model, prompt, n, V)
    ids, got = beam_search(model, torch.tensor([prompt]), n, beam_width=V ** (n - 1))
    assert ids[0, :2].tolist() == prompt and tuple(ids[0, 2:].tolist()) == seq
    assert got == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("seed,penalty", [(s, p) for s in range(4) for p in (0.0, 1.0)])
def test_beam_search_with_eos_is_exhaustive(seed, penalty):
    model, prompt, n, V = tiny_gpt(seed), [3], 4, 4
    _, score, seq = exhaustive(model, prompt, n, V, eos_id=0, length_penalty=penalty)
    ids, got = beam_search(model, torch.tensor([prompt]), n, beam_width=V ** (n - 1), eos_id=0,
                           length_penalty=penalty)
    assert tuple(ids[0, 1:].tolist()) == seq
    assert got == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_beam_width_one_is_greedy(seed):
    model = tiny_gpt(seed, vocab=6)
    prompt = torch.tensor([[1, 4, 2]])
    ids, score = beam_search(model, prompt, 7, beam_width=1)
    assert torch.equal(ids, model.generate(prompt, 7, temperature=0))
    assert score == pytest.approx(sequence_logprob(model, [1, 4, 2], ids[0, 3:].tolist()), abs=1e-5)


@pytest.mark.parametrize("seed,eos", [(s, e) for s in range(4) for e in (None, 0)])
def test_beam_search_with_the_cache_finds_what_recomputing_finds(seed, eos):
    """use_cache=True reorders one KVCache per block to follow the beams: the same
    continuation and score as recomputing every window, on a GPT and on a Llama
    (grouped-query attention, rotary positions), also once the beams outgrow
    block_size (where the cached search goes back to recomputing)."""
    from gptcourse.llama import Llama, LlamaConfig
    torch.manual_seed(seed)
    llama = Llama(LlamaConfig(vocab_size=7, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                              ffn_hidden=24, block_size=9)).eval()
    for model in (tiny_gpt(seed, vocab=7, block=9), llama):
        prompt = torch.tensor([[1, 4, 2]])
        for n in (4, 8):                                            # 3 + 8 > block_size 9
            plain = beam_search(model, prompt, n, beam_width=3, eos_id=eos)
            cached = beam_search(model, prompt, n, beam_width=3, eos_id=eos, use_cache=True)
            assert torch.equal(cached[0], plain[0])
            assert cached[1] == pytest.approx(plain[1], abs=1e-5)
            if n == 4:                                              # within block_size: check the score alone
                assert cached[1] == pytest.approx(sequence_logprob(model, [1, 4, 2], cached[0][0, 3:].tolist()),
                                                  abs=1e-4)


def test_kv_cache_select_rows_reorders_and_repeats():
    from gptcourse.attention import KVCache
    cache = KVCache()
    k = torch.arange(3 * 2 * 4 * 2, dtype=torch.float32).view(3, 2, 4, 2)
    cache.update(k, -k)
    cache.select_rows(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k, k[[2, 2, 0]]) and torch.equal(cache.v, -k[[2, 2, 0]])
    k_new, v_new = cache.update(torch.ones(3, 2, 1, 2), torch.zeros(3, 2, 1, 2))
    assert k_new.shape == (3, 2, 5, 2) and torch.equal(k_new[:, :, :4], k[[2, 2, 0]])


def test_no_beam_beats_the_exhaustive_search_and_a_wider_one_can_beat_greedy():
    """Over small models, every width's score (checked independently) is at most the
    exhaustive optimum, and a beam of 8 beats greedy somewhere. (A wider beam is NOT
    always at least as good: see test_a_wider_beam_can_end_on_a_less_likely_sequence.)"""
    beats = 0
    for seed in range(8):
        model = tiny_gpt(seed, vocab=4)
        best, _, _ = exhaustive(model, [2], 4, 4)
        scores = []
        for width in (1, 2, 8):
            ids, score = beam_search(model, torch.tensor([[2]]), 4, beam_width=width)
            assert score == pytest.approx(sequence_logprob(model, [2], ids[0, 1:].tolist()), abs=1e-5)
            assert score <= best + 1e-5          # float32 model: the same sum, another order
            scores.append(score)
        beats += scores[2] > scores[0] + 1e-3
    assert beats >= 4                                    # 5 of these 8 models


class PrefixTable(torch.nn.Module):
    """A hand-written model over tokens 0, 1, 2 whose next-token probabilities depend on
    the whole continuation so far (a one-token prompt comes first): chapter 13's toy."""

    ROWS = {(): [math.exp(-1.0), math.exp(-1.01), 1 - math.exp(-1.0) - math.exp(-1.01)],
            (0,): [0.46, 0.44, 0.10], (1,): [0.50, 0.49, 0.01],
            (0, 0): [0.98, 0.01, 0.01], (0, 1): [0.98, 0.01, 0.01],
            (1, 0): [0.36, 0.33, 0.31], (1, 1): [0.36, 0.33, 0.31]}

    def forward(self, idx):
        rows = [self.ROWS.get(tuple(seq[1:]), [1 / 3] * 3) for seq in idx.tolist()]
        return torch.tensor(rows, dtype=torch.float64).log()[:, None, :].expand(-1, idx.shape[1], -1), None


def test_a_wider_beam_can_end_on_a_less_likely_sequence():
    """Greedy: 0 (-1.00), 0 (0.46), 0 (0.98) = -1.797, the optimum. A beam of 2 keeps 0 and 1,
    then 1 0 (-1.01 + log 0.50 = -1.703) and 1 1 (-1.724) over 0 0 (-1.777): every continuation
    of 0 is gone, and it ends at 1 0 0 = -1.703 + log 0.36 = -2.725. A beam of 3 keeps 0 0."""
    model = PrefixTable()
    logp = lambda seq: sum(math.log(PrefixTable.ROWS.get(tuple(seq[:i]), [1 / 3] * 3)[t])
                           for i, t in enumerate(seq))
    best = max(itertools.product(range(3), repeat=3), key=logp)
    assert best == (0, 0, 0) and logp(best) == pytest.approx(-1.0 + math.log(0.46) + math.log(0.98))
    got = {}
    for width in (1, 2, 3, 9):
        ids, score = beam_search(model, torch.zeros(1, 1, dtype=torch.long), 3, beam_width=width)
        got[width] = (tuple(ids[0, 1:].tolist()), score)
        assert score == pytest.approx(logp(got[width][0]))
    assert got[1][0] == got[3][0] == got[9][0] == (0, 0, 0)
    assert got[2][0] == (1, 0, 0) and got[2][1] == pytest.approx(-1.01 + math.log(0.5) + math.log(0.36))
    assert got[2][1] < got[1][1] - 0.9                     # the wider beam ends almost 1 nat lower


class BigramTable(torch.nn.Module):
    """A hand-written model: the next token's probabilities depend only on the last
    token. From 0: p(1) = 0.5, p(2) = 0.4, p(3) = 0.1; after 1 the next token is
    uncertain (0.3 / 0.3 / 0.4 over 1, 2, 3); after 2 it is certain (p(3) = 1)."""

    def __init__(self):
        super().__init__()
        p = torch.full((4, 4), 1e-12)
        p[0, 1:] = torch.tensor([0.5, 0.4, 0.1])
        p[1, 1:] = torch.tensor([0.3, 0.3, 0.4])
        p[2, 3] = 1.0
        p[3, 3] = 1.0
        self.register_buffer("logp", p.log())

    def forward(self, idx):
        return self.logp[idx], None


def test_beam_search_finds_the_sequence_greedy_misses_hand_worked():
    """Greedy takes 1 (0.5) then 3 (0.4): 0.20. Beam 2 also keeps 2 (0.4), whose
    next token is certain: 0.4 * 1.0 = 0.40, the most likely sequence."""
    model = BigramTable()
    greedy, g = beam_search(model, torch.tensor([[0]]), 2, beam_width=1)
    beam, b = beam_search(model, torch.tensor([[0]]), 2, beam_width=2)
    assert greedy[0].tolist() == [0, 1, 3] and math.exp(g) == pytest.approx(0.20)
    assert beam[0].tolist() == [0, 2, 3] and math.exp(b) == pytest.approx(0.40)


def test_beam_search_leaves_the_model_in_its_mode_and_crops_to_block_size():
    model = tiny_gpt(0, block=4).train()
    ids, _ = beam_search(model, torch.tensor([[1, 2, 3, 1, 2]]), 6, beam_width=3)
    assert ids.shape == (1, 11) and model.training


@pytest.mark.parametrize("kwargs,message", [
    (dict(idx=torch.zeros(2, 3, dtype=torch.long)), r"one prompt of shape \(1, T\)"),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), r"one prompt of shape \(1, T\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (dict(beam_width=0), "beam_width must be a positive integer, got 0"),
    (dict(beam_width=2.0), "beam_width must be a positive integer, got 2.0"),
    (dict(length_penalty=-1.0), "length_penalty must be >= 0, got -1.0"),
])
def test_beam_search_bad_arguments(kwargs, message):
    args = dict(idx=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3, beam_width=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        beam_search(tiny_gpt(0), **args)


def test_is_greedy_one_rule():
    from gptcourse.sampling import is_greedy
    assert is_greedy(0) and is_greedy(0.0, 0.9) and is_greedy(1e-6) and is_greedy(1.0, 0)
    assert not is_greedy(1e-5) and not is_greedy(0.8) and not is_greedy(0.8, 0.5) and not is_greedy(1.0, None)
    with pytest.raises(ValueError, match="-1"):
        is_greedy(-1)
    logits = torch.randn(3, 11)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1e-6, generator=g), logits.argmax(-1, keepdim=True))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())   # no draw


def test_end_of_turn_ids():
    from gptcourse.sampling import end_of_turn_ids

    class Tok:
        special = {"<|im_end|>": 5, "<|endoftext|>": 7}
    assert end_of_turn_ids(Tok()) == {5, 7}
    assert end_of_turn_ids(object()) == set()


def test_stop_matcher_and_text_decoder_live_in_sampling():
    from gptcourse.sampling import StopMatcher, TextDecoder
    m = StopMatcher(["\nUser:", "abab"])
    assert m.feed("Hello\nUs") is None and m.held_back == 3
    assert m.feed("er: hi") == (3, "\nUser:")
    assert StopMatcher(["abab"]).feed("xababab") == (5, "abab")

    class Tok:
        def token_bytes(self, t):
            return "é".encode()[t:t + 1]
    d = TextDecoder(Tok())
    assert d.piece(0) == "" and d.piece(1) == "é"


def test_decode_feeds_the_prompt_then_each_token_and_stops():
    from gptcourse.sampling import decode
    seen = []

    def step(new_ids):                       # a "model" that always predicts last id + 1
        seen.append(new_ids.tolist())
        logits = torch.full((new_ids.shape[0], 10), -1e9)
        logits[torch.arange(new_ids.shape[0]), (new_ids[:, -1] + 1) % 10] = 0.0
        return logits
    out = [int(t) for t in decode(step, torch.tensor([[3, 4]]), 5, temperature=0, stop_ids={7})]
    assert out == [5, 6, 7] and seen == [[[3, 4]], [[5]], [[6]]]
    assert torch.equal(torch.cat(list(decode(step, torch.tensor([[1], [2]]), 2, temperature=0)), 1),
                       torch.tensor([[2, 3], [3, 4]]))
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        decode(step, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="-1"):
        decode(step, torch.tensor([[1]]), -1)
    with pytest.raises(ValueError, match="B = 2"):
        decode(step, torch.tensor([[1], [2]]), 2, stop_ids={3})


def test_decode_with_model_step_is_generate():
    from gptcourse.gpt import GPT, GPTConfig
    from gptcourse.sampling import decode, evaluating, model_step
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("course-tiny")).train()
    idx = torch.randint(0, 103, (2, 4))
    for use_cache in (True, False):
        with evaluating(model):
            steps = decode(model_step(model, use_cache), idx, 40, 0.9, generator=torch.Generator().manual_seed(1))
            ours = torch.cat([idx, *steps], 1)
        assert model.training                       # evaluating puts the mode back
        assert torch.equal(ours, model.generate(idx, 40, 0.9, use_cache=use_cache,
                                                generator=torch.Generator().manual_seed(1)))
