"""Attention: scaled dot-product, masks, multi-head and additive (Bahdanau).

One mask convention, used everywhere in gptcourse (and the same as PyTorch's
``torch.nn.functional.scaled_dot_product_attention``):

    a boolean mask, True = "this query MAY attend to this key",
                    False = "blocked" (its score becomes -inf before the softmax).

Shapes: ``B`` batch, ``H`` heads, ``T_q`` queries, ``T_k`` keys/values,
``d_k`` query/key size, ``d_v`` value size, ``C`` = d_model.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------

def causal_mask(T, T_k=None, device=None):
    """Lower-triangular boolean mask: query i may attend to keys j <= i.

    Returns a (T, T_k) bool tensor (T_k defaults to T). When T_k > T (new
    queries appended after T_k - T cached keys, as in a KV cache), the
    triangle is aligned to the bottom right: query i sits at position
    T_k - T + i and sees keys 0 .. T_k - T + i.

    >>> causal_mask(3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    T_k = T if T_k is None else T_k
    if not (isinstance(T, int) and isinstance(T_k, int)) or T < 1 or T_k < T:
        raise ValueError(f"causal_mask needs integers 1 <= T <= T_k, got T={T!r}, T_k={T_k!r}")
    return torch.ones(T, T_k, dtype=torch.bool, device=device).tril(diagonal=T_k - T)


def padding_mask(lengths, T):
    """Mask out padding keys: position j of sequence b is real iff j < lengths[b].

    lengths: (B,) ints (list or tensor), each in 1..T.
    Returns a (B, 1, T) bool tensor, which broadcasts over the queries of a
    (B, T_q, T) score matrix.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be a 1-D tensor of integers, got shape {tuple(lengths.shape)} "
                         f"and dtype {lengths.dtype}")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"every length must be in 1..T={T}, got {lengths.tolist()}")
    positions = torch.arange(T, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, :]


def _check_mask(mask, T_q, T_k, batch_shape):
    """The mask must be bool, end in (T_q, T_k) or (1, T_k), and have leading
    dims that broadcast to the batch dims of the scores."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if mask.dim() < 2 or mask.shape[-1] != T_k or mask.shape[-2] not in (1, T_q):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit scores of shape "
                         f"{(*batch_shape, T_q, T_k)}: its last two dims must be ({T_q}, {T_k}) "
                         f"or (1, {T_k})")
    lead = mask.shape[:-2]
    if len(lead) > len(batch_shape) or any(
            m not in (1, b) for m, b in zip(reversed(lead), reversed(batch_shape))):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to scores of shape "
                         f"{(*batch_shape, T_q, T_k)}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., T, d), got {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share d_k: q is {tuple(q.shape)}, k is {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of positions T_k: "
                         f"k is {tuple(k.shape)}, v is {tuple(v.shape)}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"q, k, v must have the same batch dims (no silent broadcasting): "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


# ----------------------------------------------------------------------------
# scaled dot-product attention
# ----------------------------------------------------------------------------

def scaled_dot_product_attention(q, k, v, mask=None, dropout_p=0.0, training=False):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, written out.

    q: (..., T_q, d_k)   k: (..., T_k, d_k)   v: (..., T_k, d_v)
    mask: bool, True = may attend; shape (..., T_q, T_k) or (..., 1, T_k),
          leading dims broadcast over the batch dims (e.g. a (T_q, T_k)
          causal mask for every batch element).
    Returns (output (..., T_q, d_v), weights (..., T_q, T_k)).

    A query whose keys are ALL blocked gets all-zero weights (and a zero
    output) instead of the NaNs a softmax over only -inf would give.
    """
    _check_qkv(q, k, v)
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)                  # (..., T_q, T_k)
    if mask is not None:
        _check_mask(mask, q.shape[-2], k.shape[-2], q.shape[:-2])
        scores = scores.masked_fill(~mask, float("-inf"))              # blocked -> -inf
    weights = torch.softmax(scores, dim=-1)                            # each row sums to 1
    if mask is not None:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0 and training:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights                                        # (..., T_q, d_v)


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------

class KVCache:
    """The keys and values of every position seen so far, for one attention layer.

    During generation each new token only needs its own query; its keys and
    values are appended here, so nothing is recomputed. k, v: (B, H, T, d_k).
    Conceptually update() is torch.cat([cached, new], dim=-2); to avoid copying
    everything at every step, the tensors live in a buffer that doubles its
    capacity when full, and k, v are views of its first T positions.
    """

    def __init__(self):
        self._k = self._v = None
        self.length = 0

    def __len__(self):
        return self.length

    @property
    def k(self):
        return None if self._k is None else self._k[..., :self.length, :]

    @property
    def v(self):
        return None if self._v is None else self._v[..., :self.length, :]

    def update(self, k_new, v_new):
        """Append (B, H, T_new, d_k) keys/values; return all of them (B, H, T, d_k)."""
        if k_new.dim() != 4 or k_new.shape != v_new.shape:
            raise ValueError(f"need keys and values of one shape (B, H, T_new, d_k), "
                             f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        if self._k is not None and (k_new.shape[:2] != self._k.shape[:2] or k_new.shape[-1] != self._k.shape[-1]):
            raise ValueError(f"new keys {tuple(k_new.shape)} do not match the cache "
                             f"{tuple(self.k.shape)} (B, H, T, d_k)")
        end = self.length + k_new.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            capacity = max(16, 2 * end)
            grown_k = k_new.new_empty(*k_new.shape[:2], capacity, k_new.shape[-1])
            grown_v = v_new.new_empty(*v_new.shape[:2], capacity, v_new.shape[-1])
            if self._k is not None:
                grown_k[..., :self.length, :] = self.k
                grown_v[..., :self.length, :] = self.v
            self._k, self._v = grown_k, grown_v
        self._k[..., self.length:end, :] = k_new
        self._v[..., self.length:end, :] = v_new
        self.length = end
        return self.k, self.v

    def select_rows(self, rows):
        """Keep the sequences `rows` (K,) of the batch, in that order, repeats
        allowed: beam search's beams taking their parents' keys and values."""
        if self._k is not None:
            self._k, self._v = self._k.index_select(0, rows), self._v.index_select(0, rows)


# ----------------------------------------------------------------------------
# multi-head attention
# ----------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    The h per-head matrices W_i^Q (d_model x d_k) are stored side by side in
    one (d_model x d_model) Linear, and likewise for K, V; d_k = d_model / h.

    Self-attention: ``mha(x)``. Cross-attention (queries from x, keys and
    values from an encoder output): ``mha(x, context=enc)``.

    ``fast=True`` computes attention with PyTorch's fused
    ``F.scaled_dot_product_attention``; ``fast=False`` (or asking for the
    weights) uses the explicit ``scaled_dot_product_attention`` above. Both
    give the same numbers.
    """

    def __init__(self, d_model, n_heads, dropout=0.0, bias=True, fast=True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model, bias=bias)   # W^Q for all heads
        self.w_k = nn.Linear(d_model, d_model, bias=bias)   # W^K
        self.w_v = nn.Linear(d_model, d_model, bias=bias)   # W^V
        self.w_o = nn.Linear(d_model, d_model, bias=bias)   # W^O
        self.dropout = dropout
        self.fast = fast

    def split_heads(self, x):
        """(B, T, C) -> (B, H, T, d_k)"""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_k).transpose(1, 2)

    def merge_heads(self, x):
        """(B, H, T, d_k) -> (B, T, C): the Concat of the heads."""
        B, _, T, _ = x.shape
        return x.transpose(1, 2).contiguous().view(B, T, self.d_model)

    def forward(self, x, context=None, mask=None, causal=False, cache=None, return_weights=False):
        """x: (B, T_q, C); context: (B, T_k, C) for cross-attention, else x.

        mask: bool, True = may attend: (T_q, T_k), (B, T_q, T_k) or (B, 1, T_k)
              (a padding mask); it is shared by all heads.
        causal: add the causal mask (query i sees keys <= i).
        cache: a KVCache; this step's keys/values are appended to it and the
               queries attend to everything in it.
        Returns (B, T_q, C), or ((B, T_q, C), weights (B, H, T_q, T_k)) when
        return_weights=True.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        context = x if context is None else context
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.d_model:
            raise ValueError(f"context must have shape (B={x.shape[0]}, T_k, d_model={self.d_model}), "
                             f"got {tuple(context.shape)}")
        q = self.split_heads(self.w_q(x))                               # (B, H, T_q, d_k)
        k = self.split_heads(self.w_k(context))                         # (B, H, T_k, d_k)
        v = self.split_heads(self.w_v(context))                         # (B, H, T_k, d_k)
        if cache is not None:
            k, v = cache.update(k, v)
        T_q, T_k = q.shape[-2], k.shape[-2]

        if mask is not None:
            if mask.dim() == 3:             # (B, T_q, T_k) or (B, 1, T_k): same for every head
                mask = mask[:, None]
            _check_mask(mask, T_q, T_k, q.shape[:-2])
        # A single newest query (a generation step) may see every key: no mask needed.
        causal = causal and T_q > 1
        # PyTorch's is_causal flag aligns the triangle top-left, so the fused
        # kernel gets it only for the plain case; otherwise we pass a mask.
        fused_is_causal = causal and mask is None and T_q == T_k
        if causal:
            c = causal_mask(T_q, T_k, device=x.device)
            mask = c if mask is None else mask & c

        p = self.dropout if self.training else 0.0
        if self.fast and not return_weights:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if fused_is_causal else mask, dropout_p=p,
                is_causal=fused_is_causal)
            weights = None
        else:
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p=p, training=self.training)
        out = self.w_o(self.merge_heads(out))                            # (B, T_q, C)
        return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------
# additive attention (Bahdanau et al. 2015)
# ----------------------------------------------------------------------------

class AdditiveAttention(nn.Module):
    """Bahdanau's alignment model: e_ij = v^T tanh(W s_{i-1} + U h_j),
    alpha_ij = softmax_j(e_ij), c_i = sum_j alpha_ij h_j.

    query_dim: size of the decoder state s; key_dim: size of the annotations
    h_j; attn_dim: the hidden size of this small feed-forward net.
    """

    def __init__(self, query_dim, key_dim, attn_dim):
        super().__init__()
        self.W = nn.Linear(query_dim, attn_dim, bias=False)
        self.U = nn.Linear(key_dim, attn_dim, bias=False)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, s, h, mask=None, Uh=None):
        """s: (B, query_dim) decoder state s_{i-1}; h: (B, T, key_dim) annotations;
        mask: (B, T) bool, True = real position (may attend).
        Uh: optional precomputed self.U(h) (B, T, attn_dim): it does not depend
        on the decoder step, so a decoder computes it once per sentence.
        Returns (context c_i (B, key_dim), weights alpha_i (B, T))."""
        if s.dim() != 2 or h.dim() != 3 or s.shape[0] != h.shape[0]:
            raise ValueError(f"need s of shape (B, query_dim) and h of shape (B, T, key_dim), "
                             f"got s {tuple(s.shape)} and h {tuple(h.shape)}")
        Uh = self.U(h) if Uh is None else Uh
        e = self.v(torch.tanh(self.W(s)[:, None, :] + Uh)).squeeze(-1)          # (B, T)
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != e.shape:
                raise ValueError(f"mask must be bool of shape {tuple(e.shape)} (B, T), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            e = e.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(e, dim=-1)                                         # (B, T)
        context = torch.bmm(alpha[:, None, :], h).squeeze(1)    # sum_j alpha_j h_j: (B, key_dim)
        return context, alpha
