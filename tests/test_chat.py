"""gptcourse.chat's measuring helpers on hand-worked examples: which messages
fit a window, entropies, continuation log-probabilities, copied n-grams, and
the batched scorers against one unpadded forward pass per sequence."""
import math

import pytest
import torch

from gptcourse.chat import (continuation_logprobs, fit_to_context, format_chat,
                            next_token_entropy, next_token_logprobs, ngram_overlap,
                            score_continuations, wilson_interval)
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.tokenizers import BPETokenizer, CharTokenizer

TALK = [{"role": "user", "content": "hi"},            # "User: hi"          8 chars
        {"role": "assistant", "content": "hello"},    # "Assistant: hello" 16
        {"role": "user", "content": "bye"}]           # "User: bye"         9
# + "Assistant:" (10) and a newline between lines: 8+1+16+1+9+1+10 = 46
SYSTEM = {"role": "system", "content": "Be brief."}   # "System: Be brief." 17
TOK = CharTokenizer(format_chat([SYSTEM] + TALK))


def contents(messages):
    return [m["content"] for m in messages]


# ---------------------------------------------------------------- fit_to_context


@pytest.mark.parametrize("block_size,kept", [
    (100, ["hi", "hello", "bye"]),
    (46, ["hi", "hello", "bye"]),    # exactly fits
    (45, ["hello", "bye"]),          # 16+1+9+1+10 = 37
    (37, ["hello", "bye"]),
    (36, ["bye"]),                   # 9+1+10 = 20
    (20, ["bye"]),
])
def test_fit_drops_the_oldest_messages(block_size, kept):
    assert len(TOK.encode(format_chat(TALK))) == 46
    assert contents(fit_to_context(TALK, TOK, block_size)) == kept


def test_fit_keeps_the_system_message():
    talk = [SYSTEM] + TALK
    assert len(TOK.encode(format_chat(talk))) == 17 + 1 + 46
    assert contents(fit_to_context(talk, TOK, 64)) == ["Be brief.", "hi", "hello", "bye"]
    assert contents(fit_to_context(talk, TOK, 63)) == ["Be brief.", "hello", "bye"]
    assert contents(fit_to_context(talk, TOK, 38)) == ["Be brief.", "bye"]   # 17+1+20
    with pytest.raises(ValueError, match="take 38 tokens, more than block_size=37"):
        fit_to_context(talk, TOK, 37)


def test_fit_without_generation_prompt_and_input_untouched():
    before = [dict(m) for m in TALK]
    # "User: hi\nAssistant: hello\nUser: bye" = 8+1+16+1+9 = 35
    assert contents(fit_to_context(TALK, TOK, 35, add_generation_prompt=False)) == \
        ["hi", "hello", "bye"]
    assert contents(fit_to_context(TALK, TOK, 34, add_generation_prompt=False)) == \
        ["hello", "bye"]
    assert TALK == before


def test_fit_counts_the_tokenizers_tokens():
    # with BPE a token is several characters: more of the talk fits in 20 tokens
    bpe = BPETokenizer.train(format_chat(TALK) * 20, vocab_size=300)
    n = len(bpe.encode(format_chat(TALK)))
    assert n < 20
    assert contents(fit_to_context(TALK, bpe, n)) == ["hi", "hello", "bye"]
    assert contents(fit_to_context(TALK, bpe, n - 1)) != ["hi", "hello", "bye"]


@pytest.mark.parametrize("block_size", [0, -3, 2.5, None])
def test_fit_bad_block_size(block_size):
    with pytest.raises(ValueError, match=f"block_size must be a positive integer, got {block_size!r}"):
        fit_to_context(TALK, TOK, block_size)


def test_fit_bad_messages():
    with pytest.raises(ValueError, match=r"messages\[1\]\['role'\]"):
        fit_to_context([TALK[0], {"role": "robot", "content": "x"}], TOK, 50)


# ---------------------------------------------------------------- entropy


def test_entropy_hand_values():
    assert next_token_entropy(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert next_token_entropy(torch.tensor([0.0, float("-inf")])).item() == 0.0
    # p = (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623
    logits = torch.tensor([0.0, math.log(3)])
    assert next_token_entropy(logits).item() == pytest.approx(0.562335, abs=1e-6)
    # T = 2 takes square roots of the odds: p = (1, sqrt 3) / (1 + sqrt 3)
    q = 1 / (1 + math.sqrt(3))
    h = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert next_token_entropy(logits, temperature=2).item() == pytest.approx(h, abs=1e-6)
    # a very sharp distribution: close to 0, never negative
    assert 0.0 <= next_token_entropy(torch.tensor([0.0, 60.0])).item() < 1e-20


def test_entropy_matches_torch_distributions_and_keeps_the_batch_shape():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    h = next_token_entropy(logits)
    assert h.shape == (3, 5)
    torch.testing.assert_close(h, torch.distributions.Categorical(logits=logits).entropy())
    torch.testing.assert_close(next_token_entropy(logits, 0.5),
                               torch.distributions.Categorical(logits=logits / 0.5).entropy())


@pytest.mark.parametrize("t", [0, -1.0, "1"])
def test_entropy_bad_temperature(t):
    with pytest.raises(ValueError, match=f"temperature must be a positive number, got {t!r}"):
        next_token_entropy(torch.zeros(3), temperature=t)


# ---------------------------------------------------------------- continuation_logprobs


class Bigram(torch.nn.Module):
    """A stub language model whose next-token logits depend on the last token only."""

    def __init__(self, table, block_size=16):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table).log())
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size,
                                vocab_size=len(table))

    def forward(self, idx):
        return self.table[idx], None


def test_logprobs_of_a_bigram_model_by_hand():
    tok = CharTokenizer("ab")                      # a -> 0, b -> 1
    model = Bigram([[0.25, 0.75],                  # after a: P(a) = 1/4, P(b) = 3/4
                    [0.9, 0.1]])                   # after b: P(a) = 0.9, P(b) = 0.1
    lp = continuation_logprobs(model, tok, "a", "bab")
    # P(b | a) P(a | b) P(b | a) = 0.75 * 0.9 * 0.75
    torch.testing.assert_close(lp, torch.tensor([0.75, 0.9, 0.75]).log())
    assert lp.sum().exp().item() == pytest.approx(0.50625)
    # the prompt's last token is what matters to a bigram model
    torch.testing.assert_close(continuation_logprobs(model, tok, "bab", "a"),
                               torch.tensor([0.9]).log())
    torch.testing.assert_close(continuation_logprobs(model, tok, "aba", "a"),
                               torch.tensor([0.25]).log())
    # the sliding-window path (context longer than block_size) gives the same numbers
    short = Bigram([[0.25, 0.75], [0.9, 0.1]], block_size=2)
    torch.testing.assert_close(continuation_logprobs(short, tok, "ab", "abba"),
                               torch.tensor([0.9, 0.75, 0.1, 0.9]).log())


def test_logprobs_of_a_gpt_match_its_loss_and_its_window():
    torch.manual_seed(0)
    tok = CharTokenizer("abcdefgh ")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=tok.vocab_size))
    model.train()                                   # it must evaluate without dropout, then restore
    # fits in one window: the mean of -log p is the model's own cross-entropy loss
    lp = continuation_logprobs(model, tok, "a", "bcdef")
    assert model.training is True
    ids = torch.tensor([tok.encode("abcdef")])
    _, loss = model.eval()(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(-lp.mean(), loss)
    full = torch.log_softmax(model(ids[:, :-1])[0][0], -1)
    torch.testing.assert_close(continuation_logprobs(model, tok, "ab", "cdef"),
                               full[1:, ids[0, 2:]].diagonal())
    assert model.training is False
    model.train()
    continuation_logprobs(model, tok, "ab", "cdef")
    assert model.training is True
    # longer than the window: each token sees only the 8 tokens before it
    text = "abcdefgh abcdefgh"
    lp = continuation_logprobs(model, tok, text[:10], text[10:])
    ids = tok.encode(text)
    model.eval()
    for k, t in enumerate(range(10, len(text))):
        ctx = torch.tensor([ids[t - 8:t]])
        expected = torch.log_softmax(model(ctx)[0][0, -1], -1)[ids[t]]
        torch.testing.assert_close(lp[k], expected)


def test_logprobs_bad_inputs():
    tok = CharTokenizer("ab")
    model = Bigram([[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="prompt must be a non-empty str, got ''"):
        continuation_logprobs(model, tok, "", "a")
    with pytest.raises(ValueError, match="continuation must be a non-empty str, got ''"):
        continuation_logprobs(model, tok, "a", "")


# ---------------------------------------------------------------- ngram_overlap


def test_ngram_overlap_by_hand():
    corpus = "abcabd"                                   # bigrams ab bc ca ab bd
    assert ngram_overlap("abca", corpus, 2) == 1.0       # ab bc ca: all seen
    assert ngram_overlap("abba", corpus, 2) == pytest.approx(1 / 3)   # ab | bb ba
    assert ngram_overlap(["abca", "abba"], corpus, 2) == pytest.approx(4 / 6)
    assert ngram_overlap(["abca", "x"], corpus, 2) == 1.0   # too short: no n-grams
    assert ngram_overlap("abcabd", corpus, 6) == 1.0
    assert ngram_overlap("abcabc", corpus, 6) == 0.0
    assert ngram_overlap("zzzz", corpus, 1) == 0.0


def test_ngram_overlap_with_a_precomputed_set():
    assert ngram_overlap(["abca", "abba"], {"ab", "bc", "ca", "bd"}, 2) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="every one must have n=2 characters"):
        ngram_overlap("abca", {"ab", "abc"}, 2)
    with pytest.raises(ValueError, match="corpus must be a str or a set of n-grams, got list"):
        ngram_overlap("abca", ["ab"], 2)


def test_ngram_overlap_bad_inputs():
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        ngram_overlap("abc", "abc", 0)
    with pytest.raises(ValueError, match="no substring of 5 characters"):
        ngram_overlap(["abc", "ab"], "abcabc", 5)


# ---------------------------------------------------------------- batched scoring


def tiny_models():
    from gptcourse.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=11, dropout=0.0))
    llama = Llama(LlamaConfig(vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                              ffn_hidden=24, block_size=32))
    for model in (gpt, llama):
        with torch.no_grad():                      # random, not near-uniform, predictions
            for p in model.parameters():
                p.normal_(0, 0.5)
    return {"gpt": gpt.eval(), "llama": llama.eval()}


SEQS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 1], [2], [3, 3, 3, 3, 3], [7, 1, 9, 2]]


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_next_token_logprobs_equal_one_unpadded_pass_per_sequence(name, batch_size):
    model = tiny_models()[name]
    last = next_token_logprobs(model, SEQS, batch_size=batch_size)
    assert last.shape == (len(SEQS), 11)
    positions = [[0, 2], [7, 0, 3], [0], [4], [1, 2, 3]]
    picked = next_token_logprobs(model, SEQS, positions, batch_size=batch_size)
    for i, seq in enumerate(SEQS):
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([seq]))[0][0], -1)    # (T, V), no padding
        torch.testing.assert_close(last[i], alone[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(picked[i], alone[positions[i]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_a_shared_prefix_computed_once_changes_nothing(name, batch_size):
    # every sequence starts with the same 4 tokens (a system prompt, say); positions inside
    # the prefix, at its end and after it; one sequence is the prefix plus one token
    model = tiny_models()[name]
    system = [5, 1, 9, 4]
    seqs = [system + s for s in ([1, 2, 3], [7], [2, 2, 8, 6, 10, 3], [3, 3])]
    positions = [[0, 3, 6], [4, 1], [9, 2, 5], [5]]
    picked = next_token_logprobs(model, seqs, positions, batch_size=batch_size)
    for seq, pos, got in zip(seqs, positions, picked):
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([seq]))[0][0], -1)
        torch.testing.assert_close(got, alone[pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_score_continuations_equals_continuation_logprobs(name):
    model = tiny_models()[name]
    tok = CharTokenizer("abcdefghijk")                        # 11 characters: ids 0..10
    pairs = [("abc", "d"), ("k", "jihgf"), ("abcabcabc", "ab"), ("e", "e"), ("he", "ha")]
    prompts = [tok.encode(p) for p, _ in pairs]
    conts = [tok.encode(c) for _, c in pairs]
    batched = score_continuations(model, prompts, conts, batch_size=3)
    for (p, c), lp in zip(pairs, batched):
        torch.testing.assert_close(lp, continuation_logprobs(model, tok, p, c), rtol=1e-5, atol=1e-5)
    assert [len(lp) for lp in batched] == [1, 5, 2, 1, 2]


def test_score_continuations_of_a_bigram_by_hand():
    model = Bigram([[0.25, 0.75], [0.9, 0.1]])
    lp = score_continuations(model, [[0], [1, 1], [0]], [[1, 0, 1], [0], [0]])
    torch.testing.assert_close(lp[0], torch.tensor([0.75, 0.9, 0.75]).log())
    torch.testing.assert_close(lp[1], torch.tensor([0.9]).log())
    torch.testing.assert_close(lp[2], torch.tensor([0.25]).log())


def test_batched_scoring_bad_inputs():
    model = tiny_models()["gpt"]
    with pytest.raises(ValueError, match="sequences must be a non-empty list"):
        next_token_logprobs(model, [])
    with pytest.raises(ValueError, match=r"sequences\[1\] must be a non-empty list"):
        next_token_logprobs(model, [[1], []])
    with pytest.raises(ValueError, match=r"sequences\[0\] holds something that is not a token id in \[0, 11\)"):
        next_token_logprobs(model, [[1, 11]])
    with pytest.raises(ValueError, match="sequence 1 has 33 tokens, more than block_size=32"):
        next_token_logprobs(model, [[1], [1] * 33])
    with pytest.raises(ValueError, match=r"positions\[0\] must be a list of ints in \[0, 2\)"):
        next_token_logprobs(model, [[1, 2]], [[2]])
    with pytest.raises(ValueError, match="one list of positions per sequence"):
        next_token_logprobs(model, [[1, 2]], [[0], [1]])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        next_token_logprobs(model, [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="need one continuation per prompt, got 2 prompts and 1"):
        score_continuations(model, [[1], [2]], [[3]])
    model.train()
    next_token_logprobs(model, [[1, 2]])
    assert model.training                              # its mode is given back


# ---------------------------------------------------------------- wilson_interval


@pytest.mark.parametrize("k,n", [(0, 50), (1, 50), (25, 50), (37, 60), (60, 60), (3, 7)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    # Wilson's interval is the set of p with |k/n - p| <= z sqrt(p (1 - p) / n):
    # its ends are the roots of (k/n - p)^2 = z^2 p (1 - p) / n
    z = 1.959964
    low, high = wilson_interval(k, n)
    assert 0 <= low <= k / n <= high <= 1
    for p in (low, high):
        if 0 < p < 1:
            assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9, abs=1e-12)
    if k == 0:
        assert low == 0 and high == pytest.approx(z * z / (n + z * z))
    if k == n:
        assert high == 1 and low == pytest.approx(n / (n + z * z))


def test_wilson_bad_inputs():
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, n=5\], got 6"):
        wilson_interval(6, 5)


# ----------------------------------------------------------------------------
# train_course_model: the chapter-11 recipe, with an optional shorter schedule
# ----------------------------------------------------------------------------

def _course_recipe_by_hand(steps, lr, warmup_steps, min_lr, eval_every):
    """The chapter-11 recipe written out with gptcourse.train.train."""
    from gptcourse import data
    from gptcourse.train import lm_batches, seed_everything, train
    text = data.load_corpus("pydoc")
    tok = CharTokenizer(text)
    train_data, val_data = data.train_val_split(torch.tensor(tok.encode(text)), 0.1)
    seed_everything(0)
    model = GPT(GPTConfig.from_name("course-char", vocab_size=tok.vocab_size))
    batches = lm_batches(train_data, val_data, block_size=64, batch_size=12, seed=0, device="cpu")
    history = train(model, batches, steps=steps, lr=lr, warmup_steps=warmup_steps, min_lr=min_lr,
                    weight_decay=0.1, eval_every=eval_every, eval_batches=20, device="cpu", seed=0,
                    progress=False)
    return model, history


@pytest.mark.parametrize("steps, options, by_hand", [
    (1, {}, dict(lr=1e-3, warmup_steps=1, min_lr=1e-4, eval_every=1)),        # the defaults
    (3, dict(lr=3e-3, warmup_steps=1, eval_every=3),
     dict(lr=3e-3, warmup_steps=1, min_lr=3e-3 / 10, eval_every=3)),
])
def test_train_course_model_is_the_recipe(steps, options, by_hand):
    from gptcourse.chat import train_course_model
    model, _, history = train_course_model(steps, device="cpu", progress=False, **options)
    expected, expected_history = _course_recipe_by_hand(steps, **by_hand)
    assert history.val_loss == expected_history.val_loss and history.lr == expected_history.lr
    for a, b in zip(model.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(a, b)
    assert not model.training


def test_next_token_logprobs_applies_the_head_at_the_positions_only_and_puts_it_back():
    """The output layer runs on the positions asked for only (not on every padded
    position: model.features, then lm_head); the numbers are those of the model's own
    forward pass, and the model keeps its lm_head, also when the call fails."""
    from gptcourse.chat import next_token_logprobs
    from gptcourse.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                              ffn_hidden=24, block_size=32)).eval()
    head = model.lm_head
    calls = []
    handle = head.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9], [1, 2, 3, 7, 7, 7, 7, 8]]
    positions = [[2, 5], [3], [0, 4, 7]]
    got = next_token_logprobs(model, seqs, positions)
    handle.remove()
    assert calls == [(6, 16)]                                   # one call, 6 positions, C = 16
    assert model.lm_head is head
    for s, pos, g in zip(seqs, positions, got):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([s]))[0][0, pos], dim=-1)
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        next_token_logprobs(model, [[1, 2, 99]])                # a token outside the vocabulary
    assert model.lm_head is head
