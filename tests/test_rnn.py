"""gptcourse.rnn: encoder against PyTorch's GRU run by hand, masks on padded
batches, real learning on a small task, and a learned alignment that is
diagonal on a monotonic task."""
import pytest
import torch
import torch.nn as nn

from gptcourse.data import Vocab, number_pairs, seq2seq_batch, seq2seq_batches
from gptcourse.rnn import Encoder, Seq2Seq, accuracy, translate
from gptcourse.train import train


def gru_by_hand(rnn, x, reverse=False):
    """Run layer 0 of an nn.GRU over one unbatched sequence x (S, E) with a
    GRUCell loop, direction by direction. Returns the states (S, H)."""
    cell = nn.GRUCell(rnn.input_size, rnn.hidden_size)
    suffix = "_l0_reverse" if reverse else "_l0"
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(rnn, name + suffix))
    h = torch.zeros(1, rnn.hidden_size)
    states = []
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in order:
        h = cell(x[t:t + 1], h)
        states.append(h[0])
    if reverse:
        states.reverse()
    return torch.stack(states)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_encoder_states_match_a_gru_cell_loop_on_a_padded_batch(bidirectional):
    torch.manual_seed(0)
    enc = Encoder(vocab_size=12, emb_dim=5, hidden_size=7, bidirectional=bidirectional)
    lengths = torch.tensor([6, 2, 4])
    src = torch.randint(3, 12, (3, 6))
    for b, n in enumerate(lengths):
        src[b, n:] = Vocab.PAD
    annotations, last = enc(src, lengths)
    D = 14 if bidirectional else 7
    assert annotations.shape == (3, 6, D) and last.shape == (3, D)
    for b, n in enumerate(lengths.tolist()):
        x = enc.embedding(src[b, :n])
        fwd = gru_by_hand(enc.rnn, x)
        expected = torch.cat([fwd, gru_by_hand(enc.rnn, x, reverse=True)], -1) if bidirectional else fwd
        torch.testing.assert_close(annotations[b, :n], expected, atol=1e-6, rtol=1e-5)
        assert torch.all(annotations[b, n:] == 0)                   # nothing at padding
        # last: forward state after the last real token (and backward state at position 0)
        expected_last = torch.cat([fwd[-1], expected[0, 7:]]) if bidirectional else fwd[-1]
        torch.testing.assert_close(last[b], expected_last, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_padding_does_not_change_a_sequence(attention, cell):
    """A sentence decodes to the same logits alone or batched with a longer one."""
    torch.manual_seed(1)
    pairs = number_pairs(2, 2, 9, seed=4) + [("one two three four five six seven eight", "12345678")]
    sv = Vocab.from_texts(["zero one two three four five six seven eight nine"], split="word")
    tv = Vocab.from_texts(["0123456789"])
    model = Seq2Seq(len(sv), len(tv), emb_dim=8, hidden_size=16, attention=attention, cell=cell).eval()
    batch = seq2seq_batch(pairs, sv, tv)
    logits, loss = model(*batch)
    assert logits.shape == (3, batch[2].shape[1], len(tv)) and loss.dim() == 0
    for b, pair in enumerate(pairs):
        alone = seq2seq_batch([pair], sv, tv)
        T = alone[2].shape[1]
        torch.testing.assert_close(model(*alone)[0][0], logits[b, :T], atol=1e-5, rtol=1e-4)


def test_padding_gets_zero_attention():
    torch.manual_seed(2)
    pairs = [("one two", "12"), ("three four five six", "3456")]
    sv = Vocab.from_texts(["one two three four five six"], split="word")
    tv = Vocab.from_texts(["123456"])
    model = Seq2Seq(len(sv), len(tv), emb_dim=8, hidden_size=16, attention=True)
    src, lengths, _, _ = seq2seq_batch(pairs, sv, tv)
    _, alpha = model.greedy_decode(src, lengths, max_len=6)
    assert alpha.shape == (2, 6, 5)
    assert torch.all(alpha[0, :, 3:] == 0)                         # "one two </s>" + 2 pads
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 6))


def test_bad_inputs():
    with pytest.raises(ValueError, match="cell must be one of"):
        Seq2Seq(5, 5, cell="rnn")
    enc = Encoder(5, 4, 4)
    with pytest.raises(ValueError, match=r"src \(B, S\) and lengths \(B,\)"):
        enc(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3]))


@pytest.fixture(scope="module")
def digits():
    train_pairs = number_pairs(4000, 1, 8, seed=0)
    sv = Vocab.from_texts([s for s, _ in train_pairs], split="word")
    tv = Vocab.from_texts([t for _, t in train_pairs])
    return train_pairs, sv, tv


@pytest.fixture(scope="module")
def trained_attention(digits):
    """Bahdanau's model on spoken digits, 1-8 long: a few seconds on one core."""
    train_pairs, sv, tv = digits
    torch.manual_seed(0)
    model = Seq2Seq(len(sv), len(tv), emb_dim=16, hidden_size=32, attention=True)
    batches = seq2seq_batches(train_pairs, train_pairs[:500], sv, tv, batch_size=64, seed=0)
    history = train(model, batches, steps=250, lr=5e-3, warmup_steps=10, min_lr=5e-4,
                    weight_decay=0.0, eval_every=250, eval_batches=2, device="cpu",
                    seed=0, progress=False)
    return model, history


def test_attention_model_learns_the_task(digits, trained_attention):
    _, sv, tv = digits
    model, history = trained_attention
    assert history.val_loss[0] > 2.0 and history.val_loss[-1] < 0.05
    exact, token_accuracy, _ = accuracy(model, number_pairs(300, 1, 8, seed=99), sv, tv)
    assert exact >= 0.97 and token_accuracy >= 0.99
    output, alpha = translate(model, "four zero two six", sv, tv)
    assert output == "4026"
    assert alpha.shape == (5, 5)                                    # 4 digits + </s>, 4 words + </s>


def test_alignment_is_diagonal_on_a_monotonic_task(digits, trained_attention):
    """Measure: for output digit i, is the input word with the largest weight
    word i? Chance (uniform over the n words and </s>) is 1/(n+1) per step."""
    _, sv, tv = digits
    model, _ = trained_attention
    hits = steps = 0
    chance = 0.0
    for source, target in number_pairs(200, 3, 8, seed=7):
        _, alpha = translate(model, source, sv, tv)
        n = len(target)
        hits += (alpha[:n].argmax(-1) == torch.arange(n)).sum().item()
        steps += n
        chance += n / (n + 1)
    assert hits / steps > 0.9 > 3 * chance / steps


def test_fixed_context_model_learns_short_inputs():
    torch.manual_seed(0)
    pairs = number_pairs(3000, 1, 3, seed=1)
    sv = Vocab.from_texts([s for s, _ in pairs], split="word")
    tv = Vocab.from_texts([t for _, t in pairs])
    model = Seq2Seq(len(sv), len(tv), emb_dim=16, hidden_size=32, attention=False)
    batches = seq2seq_batches(pairs, pairs[:300], sv, tv, batch_size=64, seed=0)
    train(model, batches, steps=200, lr=5e-3, weight_decay=0.0, eval_every=200, eval_batches=2,
          device="cpu", seed=0, progress=False)
    exact, _, _ = accuracy(model, number_pairs(300, 1, 3, seed=98), sv, tv)
    assert exact >= 0.95
    output, alpha = translate(model, "nine one", sv, tv)
    assert output == "91" and alpha is None
