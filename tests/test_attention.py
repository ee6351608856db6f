"""Attention against independent references: PyTorch's own
F.scaled_dot_product_attention and nn.MultiheadAttention, and small examples
worked out by hand with math.exp."""
import math
import re

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported (gptcourse.viz imports it)

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gptcourse.attention import (  # noqa: E402
    AdditiveAttention,
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from gptcourse.viz import attention_heatmap  # noqa: E402

DT = torch.float64


def randn(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(q, k, v, mask=None):
    """PyTorch's fused attention. Its weights come out by attending over the
    identity matrix as values: softmax(...) @ I = softmax(...)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    T_k = k.shape[-2]
    eye = torch.eye(T_k, dtype=k.dtype).expand(*k.shape[:-2], T_k, T_k)
    weights = F.scaled_dot_product_attention(q, k, eye, attn_mask=mask)
    return out, weights


# (q, k, v) shapes: 2-D, 3-D and 4-D (B, H, T, d), T_q != T_k, d_v != d_k
SHAPES = [
    ((5, 4), (5, 4), (5, 4)),
    ((6, 8), (6, 8), (6, 3)),
    ((2, 5, 4), (2, 7, 4), (2, 7, 3)),
    ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 6)),
    ((2, 3, 4, 8), (2, 3, 9, 8), (2, 3, 9, 5)),
    ((3, 2, 1, 4), (3, 2, 6, 4), (3, 2, 6, 4)),
]


def make_mask(kind, q_shape, k_shape, seed):
    T_q, T_k, batch = q_shape[-2], k_shape[-2], q_shape[:-2]
    if kind is None:
        return None
    if kind == "causal":
        return causal_mask(T_q, T_k)
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(*batch, T_q, T_k, generator=g) < 0.6
        m[..., 0] = True  # keep every row attending somewhere (blocked rows: own test)
        return m
    if kind == "padding":
        B = batch[0]
        lengths = [T_k - (b % T_k) for b in range(B)]  # T_k, T_k-1, ...
        m = padding_mask(lengths, T_k)  # (B, 1, T_k)
        return m if len(batch) == 1 else m[:, None]  # (B, 1, 1, T_k) for (B, H, ...)
    raise AssertionError(kind)


CASES = [pytest.param(shapes, kind, id=f"{kind}-" + "-".join("x".join(map(str, s)) for s in shapes))
         for kind in (None, "causal", "random", "padding") for shapes in SHAPES
         if not (kind == "padding" and len(shapes[0]) == 2)]  # padding needs a batch dim


@pytest.mark.parametrize("shapes,kind", CASES)
def test_sdpa_matches_pytorch(shapes, kind):
    q_shape, k_shape, v_shape = shapes
    q, k, v = randn(*q_shape, seed=1), randn(*k_shape, seed=2), randn(*v_shape, seed=3)
    mask = make_mask(kind, q_shape, k_shape, seed=4)

    out, w = scaled_dot_product_attention(q, k, v, mask)
    ref_out, ref_w = reference(q, k, v, mask)

    assert out.shape == (*q_shape[:-1], v_shape[-1])
    assert w.shape == (*q_shape[:-1], k_shape[-2])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=DT), rtol=0, atol=1e-12)
    if mask is not None:
        blocked = ~mask.expand(w.shape)
        assert (w[blocked] == 0).all()  # exactly zero, not just small


def test_sdpa_causal_square_matches_is_causal():
    q, k, v = randn(2, 3, 7, 4, seed=1), randn(2, 3, 7, 4, seed=2), randn(2, 3, 7, 4, seed=3)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(7))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (w.triu(diagonal=1) == 0).all()
    # the first query can only see the first key
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :])


def test_sdpa_fully_blocked_row_gives_zeros_like_pytorch():
    q, k, v = randn(2, 4, 3, seed=1), randn(2, 5, 3, seed=2), randn(2, 5, 6, seed=3)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 1] = False  # query 1 of batch 0 sees nothing
    mask[1, 3] = False
    out, w = scaled_dot_product_attention(q, k, v, mask)
    assert not out.isnan().any() and not w.isnan().any()
    assert (out[0, 1] == 0).all() and (out[1, 3] == 0).all()
    assert (w[0, 1] == 0).all() and (w[1, 3] == 0).all()
    torch.testing.assert_close(w[0, 0].sum(), torch.tensor(1.0, dtype=DT))
    ref_out, _ = reference(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)


def test_sdpa_fully_blocked_row_has_finite_gradients():
    q, k, v = (randn(2, 4, 3, seed=i).requires_grad_() for i in (1, 2, 3))
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0, 1] = False
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0, 1] == 0).all()  # the blocked query influences nothing


@pytest.mark.parametrize("fast", [True, False])
def test_mha_fully_blocked_query_outputs_the_bias(fast):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, fast=fast)
    x = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0, 1] = False
    out = mha(x, mask=mask)
    # zero attention output, so only W^O's bias remains
    torch.testing.assert_close(out[0, 1], mha.w_o.bias, rtol=0, atol=1e-7)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mha.parameters())


def test_sdpa_hand_worked_example():
    # d_k = 2, so scores are q.k / sqrt(2)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    k = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT)
    v = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=DT)
    # query 0: scores [2/sqrt2, 0] = [sqrt2, 0]; query 1: scores [0, 1/sqrt2]
    s = [[math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2)]]
    expected_w = []
    for row in s:
        z = math.exp(row[0]) + math.exp(row[1])
        expected_w.append([math.exp(row[0]) / z, math.exp(row[1]) / z])
    expected_out = [[wi[0] * 1.0 + wi[1] * 3.0, wi[0] * 2.0 + wi[1] * -4.0] for wi in expected_w]

    out, w = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(w, torch.tensor(expected_w, dtype=DT), rtol=0, atol=1e-14)
    torch.testing.assert_close(out, torch.tensor(expected_out, dtype=DT), rtol=0, atol=1e-14)
    # e^sqrt2 / (e^sqrt2 + 1) = 0.80442...
    assert w[0, 0].item() == pytest.approx(0.8044296, abs=1e-6)

    # causal: query 0 sees key 0 only, so its output is v[0] exactly
    out_c, w_c = scaled_dot_product_attention(q, k, v, causal_mask(2))
    assert w_c.tolist()[0] == [1.0, 0.0]
    assert out_c[0].tolist() == [1.0, 2.0]
    torch.testing.assert_close(out_c[1], out[1])


def test_sdpa_mask_broadcasts_over_batch_and_heads():
    q, k, v = randn(2, 3, 4, 8, seed=1), randn(2, 3, 6, 8, seed=2), randn(2, 3, 6, 8, seed=3)
    m = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    m[:, 0] = True
    out, _ = scaled_dot_product_attention(q, k, v, m)
    out_full, _ = scaled_dot_product_attention(q, k, v, m.expand(2, 3, 4, 6).clone())
    torch.testing.assert_close(out, out_full, rtol=0, atol=0)


def test_sdpa_dropout_only_in_training():
    q, k, v = randn(2, 5, 4, seed=1), randn(2, 5, 4, seed=2), randn(2, 5, 4, seed=3)
    out_eval, _ = scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=False)
    ref, _ = reference(q, k, v)
    torch.testing.assert_close(out_eval, ref, rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)
    _, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=True)
    assert (w == 0).any()  # some weights dropped, the rest scaled by 1/(1-p)


# ---------------------------------------------------------------- masks


def test_causal_mask_exact():
    assert causal_mask(3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert causal_mask(3).dtype == torch.bool
    assert causal_mask(1).tolist() == [[True]]


def test_causal_mask_bottom_right():
    # 2 new queries after 2 cached keys: at positions 2 and 3
    assert causal_mask(2, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert causal_mask(1, 5).int().tolist() == [[1, 1, 1, 1, 1]]
    # same as the last rows of the full square mask
    assert torch.equal(causal_mask(3, 7), causal_mask(7)[-3:])


@pytest.mark.parametrize("args", [(0,), (3, 2), (2.0,), (2, 3.0)])
def test_causal_mask_bad_args(args):
    with pytest.raises(ValueError, match=r"1 <= T <= T_k"):
        causal_mask(*args)


def test_padding_mask_exact():
    m = padding_mask([2, 3], 4)
    assert m.shape == (2, 1, 4) and m.dtype == torch.bool
    assert m.int().tolist() == [[[1, 1, 0, 0]], [[1, 1, 1, 0]]]
    assert torch.equal(padding_mask(torch.tensor([4, 1]), 4).int(), torch.tensor([[[1, 1, 1, 1]], [[1, 0, 0, 0]]]))


def test_padding_mask_bad_args():
    with pytest.raises(ValueError, match=r"1\.\.T=4, got \[0, 3\]"):
        padding_mask([0, 3], 4)
    with pytest.raises(ValueError, match=r"1\.\.T=4, got \[5\]"):
        padding_mask([5], 4)
    with pytest.raises(ValueError, match="1-D tensor of integers"):
        padding_mask([[1, 2]], 4)
    with pytest.raises(ValueError, match="1-D tensor of integers"):
        padding_mask([1.0, 2.0], 4)


# ---------------------------------------------------------------- bad inputs


def test_sdpa_bad_inputs_name_the_shapes():
    q, k, v = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 6)
    with pytest.raises(ValueError, match=re.escape("q must have shape (..., T, d), got (4,)")):
        scaled_dot_product_attention(torch.randn(4), k, v)
    with pytest.raises(ValueError, match=re.escape("k must have shape (..., T, d), got (4,)")):
        scaled_dot_product_attention(q, torch.randn(4), v)
    with pytest.raises(ValueError, match=re.escape("share d_k: q is (3, 4), k is (5, 3)")):
        scaled_dot_product_attention(q, torch.randn(5, 3), v)
    with pytest.raises(ValueError, match=re.escape("same number of positions T_k: k is (5, 4), v is (6, 6)")):
        scaled_dot_product_attention(q, k, torch.randn(6, 6))
    with pytest.raises(ValueError, match=r"same batch dims \(no silent broadcasting\).*\(2, 3, 4\).*\(1, 5, 4\)"):
        scaled_dot_product_attention(torch.randn(2, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match="same batch dims"):
        scaled_dot_product_attention(torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5, 6))


def test_sdpa_bad_masks():
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=re.escape("mask of shape (3, 4) does not fit scores of shape (2, 3, 5)")):
        scaled_dot_product_attention(q, k, v, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape("(2, 5)")):
        scaled_dot_product_attention(q, k, v, torch.ones(2, 5, dtype=torch.bool))  # (B, T_k): no query dim
    with pytest.raises(ValueError, match=re.escape("mask of shape (3, 3, 5) does not broadcast to scores of shape (2, 3, 5)")):
        scaled_dot_product_attention(q, k, v, torch.ones(3, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(1, 2, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor.*torch\.float32"):
        scaled_dot_product_attention(q, k, v, torch.ones(3, 5))
    with pytest.raises(TypeError, match="bool"):
        scaled_dot_product_attention(q, k, v, torch.ones(3, 5, dtype=torch.long))


# ---------------------------------------------------------------- multi-head vs nn.MultiheadAttention


def make_pair(d_model, n_heads, bias=True, seed=0, fast=True):
    torch.manual_seed(seed)
    ours = MultiHeadAttention(d_model, n_heads, bias=bias, fast=fast).double()
    ref = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.w_q.weight, ours.w_k.weight, ours.w_v.weight]))
        ref.out_proj.weight.copy_(ours.w_o.weight)
        if bias:
            assert ours.w_q.bias.abs().sum() > 0  # nonzero biases, so they are tested too
            ref.in_proj_bias.copy_(torch.cat([ours.w_q.bias, ours.w_k.bias, ours.w_v.bias]))
            ref.out_proj.bias.copy_(ours.w_o.bias)
        else:
            assert ref.in_proj_bias is None and ours.w_q.bias is None
    return ours, ref


TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_model,n_heads", [(16, 4), (12, 3), (8, 1)])
def test_mha_self_attention_matches_pytorch(d_model, n_heads, bias, fast):
    ours, ref = make_pair(d_model, n_heads, bias, fast=fast)
    x = randn(3, 7, d_model, seed=1)
    expected, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(ours(x), expected, **TOL)


@pytest.mark.parametrize("fast", [True, False])
def test_mha_cross_attention_matches_pytorch(fast):
    ours, ref = make_pair(16, 4, fast=fast)
    x, ctx = randn(2, 5, 16, seed=1), randn(2, 9, 16, seed=2)
    expected, _ = ref(x, ctx, ctx, need_weights=False)
    out = ours(x, context=ctx)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("fast", [True, False])
def test_mha_causal_matches_pytorch(fast):
    ours, ref = make_pair(16, 4, fast=fast)
    x = randn(2, 6, 16, seed=1)
    # nn.MultiheadAttention: bool attn_mask True = NOT allowed
    expected, _ = ref(x, x, x, attn_mask=~causal_mask(6), need_weights=False)
    torch.testing.assert_close(ours(x, causal=True), expected, **TOL)
    torch.testing.assert_close(ours(x, mask=causal_mask(6)), expected, **TOL)


@pytest.mark.parametrize("fast", [True, False])
def test_mha_padding_mask_matches_pytorch(fast):
    ours, ref = make_pair(16, 4, fast=fast)
    x = randn(3, 6, 16, seed=1)
    lengths = [6, 4, 2]
    pad = padding_mask(lengths, 6)  # (B, 1, T) True = real
    # nn.MultiheadAttention: key_padding_mask (B, T) True = ignore
    expected, _ = ref(x, x, x, key_padding_mask=~pad[:, 0, :], need_weights=False)
    torch.testing.assert_close(ours(x, mask=pad), expected, **TOL)
    # padding and causal together
    expected, _ = ref(x, x, x, key_padding_mask=~pad[:, 0, :], attn_mask=~causal_mask(6), need_weights=False)
    torch.testing.assert_close(ours(x, mask=pad, causal=True), expected, **TOL)


def test_mha_per_batch_mask_matches_pytorch():
    ours, ref = make_pair(16, 4)
    x = randn(2, 5, 16, seed=1)
    mask = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[..., 0] = True
    # nn.MultiheadAttention takes a 3-D attn_mask as (B * n_heads, T_q, T_k), True = NOT allowed
    expected, _ = ref(x, x, x, attn_mask=~mask.repeat_interleave(4, dim=0), need_weights=False)
    torch.testing.assert_close(ours(x, mask=mask), expected, **TOL)
    ours.fast = False
    torch.testing.assert_close(ours(x, mask=mask), expected, **TOL)


def test_mha_cross_attention_padding_mask_matches_pytorch():
    ours, ref = make_pair(16, 2)
    x, ctx = randn(2, 3, 16, seed=1), randn(2, 5, 16, seed=2)
    pad = padding_mask([5, 2], 5)
    expected, _ = ref(x, ctx, ctx, key_padding_mask=~pad[:, 0, :], need_weights=False)
    torch.testing.assert_close(ours(x, context=ctx, mask=pad), expected, **TOL)


def test_mha_weights_match_pytorch():
    ours, ref = make_pair(16, 4)
    x, ctx = randn(2, 5, 16, seed=1), randn(2, 7, 16, seed=2)
    pad = padding_mask([7, 3], 7)
    out, w = ours(x, context=ctx, mask=pad, return_weights=True)
    assert w.shape == (2, 4, 5, 7)
    ref_out, ref_avg = ref(x, ctx, ctx, key_padding_mask=~pad[:, 0, :], need_weights=True, average_attn_weights=True)
    _, ref_heads = ref(x, ctx, ctx, key_padding_mask=~pad[:, 0, :], need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert ref_avg.shape == (2, 5, 7)
    torch.testing.assert_close(w.mean(dim=1), ref_avg, **TOL)
    torch.testing.assert_close(w, ref_heads, **TOL)
    assert (w[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5, dtype=DT))


def test_mha_fast_and_explicit_agree_float32():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    pad = padding_mask([9, 4], 9)
    for kwargs in [dict(), dict(causal=True), dict(context=ctx), dict(context=ctx, mask=pad),
                   dict(mask=padding_mask([6, 2], 6), causal=True)]:
        mha.fast = True
        fast = mha(x, **kwargs)
        mha.fast = False
        slow = mha(x, **kwargs)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=2e-6)
        mha.fast = True
        out_w, w = mha(x, return_weights=True, **kwargs)  # weights force the explicit path
        torch.testing.assert_close(out_w, slow, rtol=0, atol=0)
        assert w.shape == (2, 4, 6, kwargs.get("context", x).shape[1])


@pytest.mark.parametrize("fast", [True, False])
def test_mha_kv_cache_token_by_token(fast):
    ours, _ = make_pair(16, 4, fast=fast)
    x = randn(2, 8, 16, seed=1)
    full = ours(x, causal=True)
    cache = KVCache()
    steps = []
    for t in range(8):
        steps.append(ours(x[:, t:t + 1], causal=True, cache=cache))
        assert len(cache) == t + 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.k.shape == (2, 4, 8, 4)


@pytest.mark.parametrize("fast", [True, False])
def test_mha_kv_cache_prefill_then_chunk(fast):
    ours, _ = make_pair(16, 4, fast=fast)
    x = randn(2, 8, 16, seed=1)
    full = ours(x, causal=True)
    cache = KVCache()
    first = ours(x[:, :5], causal=True, cache=cache)       # T_q = T_k = 5
    rest = ours(x[:, 5:], causal=True, cache=cache)        # T_q = 3 < T_k = 8
    torch.testing.assert_close(first, full[:, :5], **TOL)
    torch.testing.assert_close(rest, full[:, 5:], **TOL)


def test_mha_kv_cache_weights_bottom_right():
    ours, _ = make_pair(8, 2)
    x = randn(1, 6, 8, seed=1)
    cache = KVCache()
    ours(x[:, :4], causal=True, cache=cache)
    _, w = ours(x[:, 4:], causal=True, cache=cache, return_weights=True)
    assert w.shape == (1, 2, 2, 6)
    assert (w[..., 0, 5] == 0).all()           # query at position 4 does not see key 5
    assert (w[..., 0, :5] > 0).all() and (w[..., 1, :] > 0).all()


def test_kv_cache_rejects_mismatched_keys():
    cache = KVCache()
    assert len(cache) == 0
    cache.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8))
    with pytest.raises(ValueError, match=re.escape("new keys (2, 3, 1, 8) do not match the cache (2, 4, 3, 8)")):
        cache.update(torch.zeros(2, 3, 1, 8), torch.zeros(2, 3, 1, 8))


def test_mha_bad_inputs():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=3"):
        MultiHeadAttention(10, 3)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=re.escape("x must have shape (B, T, d_model=8), got (2, 5, 7)")):
        mha(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=re.escape("got (5, 8)")):
        mha(torch.randn(5, 8))
    with pytest.raises(ValueError, match=re.escape("context must have shape (B=2, T_k, d_model=8), got (3, 4, 8)")):
        mha(torch.randn(2, 5, 8), context=torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=re.escape("got (2, 4, 6)")):
        mha(torch.randn(2, 5, 8), context=torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="does not fit scores"):
        mha(torch.randn(2, 5, 8), mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mha(torch.randn(2, 5, 8), mask=torch.ones(5, 5))


# ---------------------------------------------------------------- additive attention


def additive_by_hand(att, s, h, mask=None):
    """Bahdanau's e_j = v^T tanh(W s + U h_j), one j at a time, softmax with math.exp."""
    W, U, v = att.W.weight, att.U.weight, att.v.weight[0]
    B, T, _ = h.shape
    contexts, alphas = [], []
    for b in range(B):
        e = [float(v @ torch.tanh(W @ s[b] + U @ h[b, j])) for j in range(T)]
        allowed = [mask is None or bool(mask[b, j]) for j in range(T)]
        z = sum(math.exp(e[j]) for j in range(T) if allowed[j])
        alpha = [math.exp(e[j]) / z if allowed[j] else 0.0 for j in range(T)]
        c = sum(alpha[j] * h[b, j] for j in range(T))
        alphas.append(alpha)
        contexts.append(c)
    return torch.stack(contexts), torch.tensor(alphas, dtype=h.dtype)


def test_additive_attention_matches_hand_loop():
    torch.manual_seed(0)
    att = AdditiveAttention(query_dim=5, key_dim=3, attn_dim=7).double()
    s, h = randn(2, 5, seed=1), randn(2, 6, 3, seed=2)
    with torch.no_grad():
        c, alpha = att(s, h)
        c_ref, alpha_ref = additive_by_hand(att, s, h)
    assert c.shape == (2, 3) and alpha.shape == (2, 6)
    torch.testing.assert_close(alpha, alpha_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, dtype=DT))


def test_additive_attention_mask():
    torch.manual_seed(1)
    att = AdditiveAttention(4, 6, 5).double()
    s, h = randn(2, 4, seed=1), randn(2, 5, 6, seed=2)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, True]])
    with torch.no_grad():
        c, alpha = att(s, h, mask)
        c_ref, alpha_ref = additive_by_hand(att, s, h, mask)
    torch.testing.assert_close(alpha, alpha_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-14)
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, dtype=DT))


def test_additive_attention_bad_inputs():
    att = AdditiveAttention(4, 6, 5)
    with pytest.raises(ValueError, match=re.escape("got s (2, 4) and h (3, 5, 6)")):
        att(torch.randn(2, 4), torch.randn(3, 5, 6))
    with pytest.raises(ValueError, match=re.escape("got s (4,) and h (5, 6)")):
        att(torch.randn(4), torch.randn(5, 6))
    with pytest.raises(ValueError, match=re.escape("mask must be bool of shape (2, 5) (B, T), got torch.bool (2, 4)")):
        att(torch.randn(2, 4), torch.randn(2, 5, 6), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.float32"):
        att(torch.randn(2, 4), torch.randn(2, 5, 6), torch.ones(2, 5))


# ---------------------------------------------------------------- heatmap (viz)


def test_attention_heatmap_labels():
    _, w = scaled_dot_product_attention(randn(3, 4, seed=1), randn(5, 4, seed=2), randn(5, 4, seed=3))
    keys = ["I", "am", "a", "small", "robot"]
    queries = ["q1", "q2", "q3"]
    ax = attention_heatmap(w, query_labels=queries, key_labels=keys, title="weights")
    try:
        assert [t.get_text() for t in ax.get_xticklabels()] == keys
        assert [t.get_text() for t in ax.get_yticklabels()] == queries
        assert ax.get_title() == "weights"
        image = ax.get_images()[0].get_array()
        assert image.shape == (3, 5)
        torch.testing.assert_close(torch.as_tensor(image.data), w.float())
        assert len(ax.texts) == 15  # annotated: one number per cell
    finally:
        plt.close(ax.figure)


def test_attention_heatmap_bad_labels():
    w = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="key_labels has 2 entries, the matrix has 3"):
        attention_heatmap(w, key_labels=["a", "b"])
    with pytest.raises(ValueError, match="query_labels has 3 entries, the matrix has 2"):
        attention_heatmap(w, query_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match=re.escape("(T_q, T_k) matrix, got shape (1, 2, 3)")):
        attention_heatmap(w[None])
    plt.close("all")


def test_kv_cache_buffer_equals_concatenation():
    """The cache's growing buffer must hold exactly what torch.cat would."""
    from gptcourse.attention import KVCache
    g = torch.Generator().manual_seed(0)
    cache, ks, vs = KVCache(), [], []
    for step, T_new in enumerate([5, 1, 1, 13, 1, 40, 2]):          # crosses capacity 16, 32, 126...
        k, v = torch.randn(2, 3, T_new, 4, generator=g), torch.randn(2, 3, T_new, 4, generator=g)
        ks.append(k)
        vs.append(v)
        k_all, v_all = cache.update(k, v)
        assert torch.equal(k_all, torch.cat(ks, dim=-2)) and torch.equal(v_all, torch.cat(vs, dim=-2))
        assert len(cache) == sum(t.shape[-2] for t in ks)
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.update(torch.randn(2, 4, 1, 4), torch.randn(2, 4, 1, 4))
    with pytest.raises(ValueError, match="one shape"):
        cache.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 2, 4))
