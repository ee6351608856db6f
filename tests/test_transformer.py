"""gptcourse.transformer against PyTorch's own Transformer layers, a real leak
test for the causal decoder, the paper's parameter count, and learning."""
import pytest
import torch
import torch.nn as nn

from gptcourse.attention import causal_mask, padding_mask
from gptcourse.data import Vocab, number_pairs, seq2seq_batch, seq2seq_batches
from gptcourse.rnn import accuracy, translate
from gptcourse.train import train
from gptcourse.transformer import DecoderLayer, EncoderLayer, Transformer, transformer_params

C, H, FF = 16, 4, 40


def copy_attention(ours, theirs):
    """Our W^Q, W^K, W^V, W^O into nn.MultiheadAttention's stacked in_proj and out_proj."""
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.w_q.weight, ours.w_k.weight, ours.w_v.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.w_q.bias, ours.w_k.bias, ours.w_v.bias]))
        theirs.out_proj.weight.copy_(ours.w_o.weight)
        theirs.out_proj.bias.copy_(ours.w_o.bias)


def copy_common(ours, theirs, norms):
    with torch.no_grad():
        for name in ("linear1", "linear2"):
            getattr(theirs, name).load_state_dict(getattr(ours.ff, name).state_dict())
        for name in norms:
            getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())


def randomize_norms(layer):
    """LayerNorms start at weight 1, bias 0; make them matter in the comparison."""
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_equals_pytorch(norm_first, activation):
    torch.manual_seed(0)
    ours = EncoderLayer(C, H, FF, norm_first=norm_first, activation=activation).double()
    randomize_norms(ours)
    theirs = nn.TransformerEncoderLayer(C, H, FF, dropout=0.0, activation=activation,
                                        batch_first=True, norm_first=norm_first).double()
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_common(ours, theirs, ["norm1", "norm2"])
    x = torch.randn(3, 7, C, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 1])
    # train mode with dropout 0: PyTorch's inference fast path zeroes padded rows
    expected = theirs.train()(x, src_key_padding_mask=~padding_mask(lengths, 7)[:, 0])
    torch.testing.assert_close(ours(x, mask=padding_mask(lengths, 7)), expected)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_equals_pytorch(norm_first):
    torch.manual_seed(1)
    ours = DecoderLayer(C, H, FF, norm_first=norm_first).double()
    randomize_norms(ours)
    theirs = nn.TransformerDecoderLayer(C, H, FF, dropout=0.0, batch_first=True,
                                        norm_first=norm_first).double().train()
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_attention(ours.cross_attn, theirs.multihead_attn)
    copy_common(ours, theirs, ["norm1", "norm2", "norm3"])
    y = torch.randn(3, 5, C, dtype=torch.float64)
    memory = torch.randn(3, 8, C, dtype=torch.float64)
    src_lengths = torch.tensor([8, 3, 6])
    expected = theirs(y, memory, tgt_mask=~causal_mask(5),                   # True = blocked there
                      memory_key_padding_mask=~padding_mask(src_lengths, 8)[:, 0])
    got = ours(y, memory, memory_mask=padding_mask(src_lengths, 8), causal=True)
    torch.testing.assert_close(got, expected)
    # without the causal mask the two differ: the mask really is applied
    assert not torch.allclose(ours(y, memory, causal=False), expected)


def test_decoder_does_not_see_the_future():
    """Change the tokens after position i: the logits up to i must not move."""
    torch.manual_seed(2)
    model = Transformer(11, 13, d_model=C, n_heads=H, n_layers=2, d_ff=FF).double().eval()
    src = torch.randint(3, 11, (2, 6))
    memory, src_mask = model.encode(src, torch.tensor([6, 4]))
    tgt = torch.randint(3, 13, (2, 9))
    logits = model.decode(tgt, memory, src_mask)
    for i in range(9):
        changed = tgt.clone()
        changed[:, i + 1:] = torch.randint(3, 13, changed[:, i + 1:].shape)
        other = model.decode(changed, memory, src_mask)
        torch.testing.assert_close(other[:, :i + 1], logits[:, :i + 1])
        if i < 8:
            assert not torch.allclose(other[:, i + 1:], logits[:, i + 1:])   # the future does change


def test_source_padding_is_ignored():
    torch.manual_seed(3)
    model = Transformer(11, 13, d_model=C, n_heads=H, n_layers=2, d_ff=FF).double().eval()
    src = torch.randint(3, 11, (1, 4))
    tgt = torch.randint(3, 13, (1, 5))
    alone, _ = model(src, torch.tensor([4]), tgt)
    padded = torch.cat([src, torch.randint(3, 11, (1, 3))], dim=1)           # junk after the end
    with_junk, _ = model(padded, torch.tensor([4]), tgt)
    torch.testing.assert_close(with_junk, alone)


def test_base_model_parameter_count():
    """Vaswani et al., Table 3: the base model has 65M parameters (N=6,
    d_model=512, d_ff=2048, h=8, a shared BPE vocabulary of about 37,000)."""
    count = transformer_params(6, 512, 2048, 37000)
    with torch.device("meta"):
        model = Transformer(37000, 37000, 512, 8, 6, 2048, share_embeddings=True)
    assert count == sum(p.numel() for p in model.parameters())
    assert abs(count - 65e6) / 65e6 < 0.05
    with pytest.raises(ValueError, match="one vocabulary"):
        Transformer(10, 12, share_embeddings=True)


def test_transformer_learns_spoken_digits():
    pairs = number_pairs(4000, 1, 8, seed=0)
    sv = Vocab.from_texts([s for s, _ in pairs], split="word")
    tv = Vocab.from_texts([t for _, t in pairs])
    torch.manual_seed(0)
    model = Transformer(len(sv), len(tv), d_model=64, n_heads=4, n_layers=1, d_ff=128)  # post-norm
    batches = seq2seq_batches(pairs, pairs[:400], sv, tv, batch_size=64, seed=0)
    history = train(model, batches, steps=250, lr=1e-3, warmup_steps=30, min_lr=1e-4, weight_decay=0.0,
                    eval_every=300, eval_batches=2, device="cpu", seed=0, progress=False)
    assert history.val_loss[-1] < 0.05 < 2.0 < history.val_loss[0]
    exact, _, _ = accuracy(model, number_pairs(300, 1, 8, seed=99), sv, tv)
    assert exact >= 0.97
    output, attention = translate(model, "seven zero three", sv, tv)
    assert output == "703" and attention.shape == (4, 4)
    torch.testing.assert_close(attention.sum(-1), torch.ones(4))
