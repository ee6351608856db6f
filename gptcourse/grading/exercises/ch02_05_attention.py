"""The exercises of chapters 2, 3 and 5: Bahdanau's additive attention, scaled
dot-product attention and the causal mask, splitting and merging heads."""
import math

import torch

from ... import attention
from .base import ATTENTION_OPS, ATTENTION_REFS, Case, Exercise, f64, randn


# ----------------------------------------------------------------------------
# 02: Bahdanau's additive attention
# ----------------------------------------------------------------------------

def additive_scores_ref(s, h, W, U, v):
    """e_j = v^T tanh(W s + U h_j).  s (B, d_s), h (B, T, d_h), W (A, d_s), U (A, d_h), v (A,) -> (B, T)"""
    return torch.tanh((s @ W.T)[:, None, :] + h @ U.T) @ v


def _additive_inputs(B, T, d_s, d_h, A, dtype=torch.float32):
    return lambda g: (randn(g, B, d_s, dtype=dtype), randn(g, B, T, d_h, dtype=dtype),
                      randn(g, A, d_s, dtype=dtype), randn(g, A, d_h, dtype=dtype), randn(g, A, dtype=dtype))


def context_vector_ref(e, h, mask):
    """alpha = softmax_j(e) over the real positions (mask True); c = sum_j alpha_j h_j.
    e (B, T), h (B, T, d_h), mask (B, T) bool -> (c (B, d_h), alpha (B, T))"""
    alpha = torch.softmax(e.masked_fill(~mask, float("-inf")), dim=-1)
    return (alpha[:, :, None] * h).sum(1), alpha


def _context_inputs(B, T, d_h, dtype=torch.float32, one_real=False):
    def make(g):
        if one_real:
            lengths = torch.ones(B, dtype=torch.long)
        else:                                    # one full row, one padded row, the rest random
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[0] = T
            lengths[-1] = torch.randint(1, T, (1,), generator=g).item()
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return randn(g, B, T, dtype=dtype), randn(g, B, T, d_h, dtype=dtype), mask
    return make


# ----------------------------------------------------------------------------
# 03: scaled dot-product attention and the causal mask
# ----------------------------------------------------------------------------

def sdpa_ref(q, k, v, mask=None):
    out, weights = attention.scaled_dot_product_attention(q, k, v, mask)
    return out, weights


def _sdpa_variant(scale="sqrt", axis=-1, mask_mode="before"):
    """A wrong attention: mask_mode "before" (right), "after", "inverted" or "zero"
    (blocked scores set to 0 instead of -inf)."""
    def wrong(q, k, v, mask=None):
        d_k = q.shape[-1]
        scores = q @ k.transpose(-2, -1)
        scores = scores / {"sqrt": math.sqrt(d_k), "none": 1.0, "d_k": d_k}[scale]
        if mask is not None and mask_mode == "before":
            scores = scores.masked_fill(~mask, float("-inf"))
        if mask is not None and mask_mode == "zero":
            scores = scores.masked_fill(~mask, 0.0)
        if mask is not None and mask_mode == "inverted":
            scores = scores.masked_fill(mask, float("-inf"))
        weights = torch.softmax(scores, dim=axis)
        if mask is not None and mask_mode == "after":
            weights = weights * mask
        return weights @ v, weights
    return wrong


def _sdpa_inputs(shape_q, shape_k, d_v, mask_kind=None, dtype=torch.float32):
    def make(g):
        q, k = randn(g, *shape_q, dtype=dtype), randn(g, *shape_k, dtype=dtype)
        v = randn(g, *shape_k[:-1], d_v, dtype=dtype)
        T_q, T_k = shape_q[-2], shape_k[-2]
        if mask_kind == "causal":
            return q, k, v, torch.ones(T_q, T_k, dtype=torch.bool).tril()
        if mask_kind == "one key":                      # every query may see only key j
            mask = torch.zeros(T_q, T_k, dtype=torch.bool)
            mask[:, torch.randint(T_k, (1,), generator=g).item()] = True
            return q, k, v, mask
        if mask_kind == "random":
            mask = torch.rand(*shape_q[:-2], T_q, T_k, generator=g) < 0.6
            mask[..., 0] = True                         # at least one key per query
            return q, k, v, mask
        return q, k, v
    return make


def causal_mask_ref(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


# ----------------------------------------------------------------------------
# 05: splitting and merging heads
# ----------------------------------------------------------------------------

def split_heads_ref(x, n_heads):
    """(B, T, C) -> (B, H, T, C / H)"""
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads_ref(x):
    """(B, H, T, d) -> (B, T, H * d)"""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


EXERCISES = [
    Exercise("additive_scores", "additive_scores", "Exercise 2.1: Bahdanau's alignment scores",
             "02_attention_with_rnns", additive_scores_ref,
             [Case("B=2, T=5, d_s=4, d_h=6, A=3", _additive_inputs(2, 5, 4, 6, 3)),
              Case("B=3, T=1 (one source position)", _additive_inputs(3, 1, 5, 5, 4)),
              Case("B=1, T=9, float64", _additive_inputs(1, 9, 3, 8, 7, f64))],
             [("no tanh", lambda s, h, W, U, v: ((s @ W.T)[:, None, :] + h @ U.T) @ v,
               "The alignment model is v^T tanh(W s + U h_j): the tanh seems to be missing.")],
             ("gptcourse.attention.AdditiveAttention.forward", "gptcourse.grading.exercises.additive_scores_ref")),
    Exercise("context_vector", "context_vector", "Exercise 2.2: the context vector",
             "02_attention_with_rnns", context_vector_ref,
             [Case("B=2, T=6, d_h=4, padded", _context_inputs(2, 6, 4)),
              Case("B=3, T=5, d_h=8, padded, float64", _context_inputs(3, 5, 8, f64)),
              Case("only one real position", _context_inputs(2, 4, 3, one_real=True))],
             [("mean", lambda e, h, mask: ((h * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True),
                                           mask / mask.sum(1, keepdim=True)),
               "The context is a weighted sum with alpha = softmax(e), not a plain average."),
              ("padding kept", lambda e, h, mask: context_vector_ref(e, h, torch.ones_like(mask)),
               "Padding positions must get weight 0: set their scores to -inf before the softmax.")],
             ("gptcourse.attention.AdditiveAttention.forward", "gptcourse.grading.exercises.context_vector_ref")),
    Exercise("sdpa", "scaled_dot_product_attention", "Exercise 3.1: scaled dot-product attention",
             "03_scaled_dot_product_attention", sdpa_ref,
             [Case("B=2, T=5, d_k=8, no mask", _sdpa_inputs((2, 5, 8), (2, 5, 8), 8)),
              Case("4-D (B=3, H=2), T_q=4, T_k=6, d_v=5", _sdpa_inputs((3, 2, 4, 16), (3, 2, 6, 16), 5)),
              Case("causal mask", _sdpa_inputs((2, 6, 32), (2, 6, 32), 4, "causal"), 2),
              Case("random mask, float64", _sdpa_inputs((2, 3, 5, 8), (2, 3, 7, 8), 6, "random", f64), 2),
              Case("mask blocks all but one key", _sdpa_inputs((1, 4, 8), (1, 5, 8), 3, "one key")),
              Case("length-1 sequences", _sdpa_inputs((2, 1, 4), (2, 1, 4), 2))],
             [("no scale", _sdpa_variant(scale="none"),
               "Divide the scores QK^T by sqrt(d_k) before the softmax."),
              ("scale d_k", _sdpa_variant(scale="d_k"), "Divide by sqrt(d_k), not by d_k."),
              ("wrong axis", _sdpa_variant(axis=-2),
               "The softmax goes over the keys (the last axis, dim=-1): each query's weights sum to 1."),
              ("mask after", _sdpa_variant(mask_mode="after"),
               "Apply the mask BEFORE the softmax (masked scores = -inf), so the weights still sum to 1."),
              ("mask zero", _sdpa_variant(mask_mode="zero"),
               "Blocked scores must become -inf, not 0: exp(0) = 1 still gives a blocked key weight."),
              ("mask inverted", _sdpa_variant(mask_mode="inverted"),
               "The mask is inverted: True means MAY attend; block where the mask is False.")],
             ATTENTION_REFS, ATTENTION_OPS),
    Exercise("causal_mask", "causal_mask", "Exercise 3.2: the causal mask",
             "03_scaled_dot_product_attention", causal_mask_ref,
             [Case("T=1", lambda g: (1,), fixed=True, trivial=True), Case("T=4", lambda g: (4,), fixed=True),
              Case("random T", lambda g: (torch.randint(2, 40, (1,), generator=g).item(),))],
             [("upper", lambda T: torch.ones(T, T, dtype=torch.bool).triu(),
               "Query i may see keys j <= i: True on and BELOW the diagonal (tril), not above."),
              ("blocked convention", lambda T: torch.ones(T, T, dtype=torch.bool).triu(1),
               "Here True means MAY attend (PyTorch's nn.Transformer masks use True = blocked): "
               "return tril(), True on and below the diagonal."),
              ("strict", lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1),
               "Each position may attend to itself: keep the diagonal."),
              ("float", lambda T: torch.ones(T, T).tril(),
               "Return a bool tensor (True = may attend), not floats.")],
             ("gptcourse.attention.causal_mask", "gptcourse.grading.exercises.causal_mask_ref")),
    Exercise("split_heads", "split_heads", "Exercise 5.1: splitting into heads",
             "05_multi_head_attention", split_heads_ref,
             [Case("B=2, T=5, C=12, H=3", lambda g: (randn(g, 2, 5, 12), 3)),
              Case("B=1, T=1, C=8, H=8", lambda g: (randn(g, 1, 1, 8), 8)),
              Case("B=3, T=7, C=64, H=4, float64", lambda g: (randn(g, 3, 7, 64, dtype=f64), 4))],
             [("no transpose", lambda x, H: x.reshape(x.shape[0], H, x.shape[1], x.shape[2] // H),
               "Reshape to (B, T, H, d) first, THEN swap the T and H axes: a direct reshape to "
               "(B, H, T, d) mixes positions and heads.")],
             ("gptcourse.attention.MultiHeadAttention.split_heads", "gptcourse.grading.exercises.split_heads_ref")),
    Exercise("merge_heads", "merge_heads", "Exercise 5.2: concatenating the heads",
             "05_multi_head_attention", merge_heads_ref,
             [Case("B=2, H=3, T=5, d=4", lambda g: (randn(g, 2, 3, 5, 4),)),
              Case("B=1, H=8, T=1, d=2", lambda g: (randn(g, 1, 8, 1, 2),)),
              Case("B=2, H=4, T=6, d=16, float64", lambda g: (randn(g, 2, 4, 6, 16, dtype=f64),))],
             [("no transpose", lambda x: x.reshape(x.shape[0], x.shape[2], -1),
               "Swap the H and T axes back (transpose(1, 2)) before reshaping to (B, T, C).")],
             ("gptcourse.attention.MultiHeadAttention.merge_heads", "gptcourse.grading.exercises.merge_heads_ref")),
]
