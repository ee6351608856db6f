"""The graded exercises: for each, the reference, the test cases (fresh random
inputs of several shapes and dtypes, plus edge cases), the usual mistakes the
grader recognises (a wrong implementation and the hint it earns), and the
reference implementations the student may not call.

Used by gptcourse.grading; the exercise notebooks live in exercises/.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import attention, chat, gpt, llama, positional, sampling
from .tokenizers import _merge


@dataclass
class Case:
    name: str
    make: Callable            # torch.Generator -> tuple of arguments
    points: int = 1
    fixed: bool = False       # the same inputs every time (a worked example): earns its
                              # points only if the function also passes a random case
    trivial: bool = False     # a fixed case that honest but wrong code often passes (T=1):
                              # passing it alone is no sign of hard-coded answers
    rtol: float = None        # tolerances of this case's comparison (None: by dtype, see
    atol: float = None        # grading.compare), used for the reference and the mistakes alike


@dataclass
class Exercise:
    key: str                  # what the student passes to check()
    function: str             # the function's name in the notebook
    title: str
    notebook: str             # exercises/<notebook>.ipynb
    reference: Callable
    cases: list
    mistakes: list = field(default_factory=list)      # (name, wrong implementation, hint)
    forbidden_names: tuple = ()                       # dotted names the student may not call
    forbidden_ops: tuple = ()                         # parts of the names of torch functions and ATen
                                                      # operators whose execution earns zero

    @property
    def possible(self):
        return sum(c.points for c in self.cases)

    def forbidden(self):
        """{name: function} resolved now (so patched modules are seen)."""
        found = {}
        for dotted in self.forbidden_names:
            module, _, attr = dotted.rpartition(".")
            obj = {"torch": torch, "F": F, "torch.nn.functional": F}.get(module)
            if obj is None:
                import importlib
                try:
                    obj = importlib.import_module(module)
                except ImportError:                     # a class attribute: module.Class.method
                    mod, _, cls = module.rpartition(".")
                    obj = getattr(importlib.import_module(mod), cls)
            fn = getattr(obj, attr)
            found[dotted] = getattr(fn, "__func__", fn)
        return found


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


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


# ----------------------------------------------------------------------------
# 07: sinusoidal positional encoding
# ----------------------------------------------------------------------------

def _pe_halves(n_positions, d_model, base=10000):
    """Sines in the first half of the columns, cosines in the second (a common layout, not this one)."""
    k = torch.arange(n_positions, dtype=torch.float64)[:, None]
    angle = k / base ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).float()


def _pe_variant(swap=False, exponent="2i/d", divide=True):
    def wrong(n_positions, d_model, base=10000):
        k = torch.arange(n_positions, dtype=torch.float64)[:, None]
        i = torch.arange(0, d_model, 2, dtype=torch.float64)
        power = i / d_model if exponent == "2i/d" else (i / 2) / d_model
        angle = k / base ** power if divide else k * base ** power
        P = torch.zeros(n_positions, d_model, dtype=torch.float64)
        P[:, 0::2] = (torch.cos if swap else torch.sin)(angle)
        P[:, 1::2] = (torch.sin if swap else torch.cos)(angle[:, : d_model // 2])
        return P.float()
    return wrong


def pe_ref(n_positions, d_model, base=10000):
    return positional.sinusoidal_encoding(n_positions, d_model, base).float()


# ----------------------------------------------------------------------------
# 08: layer norm
# ----------------------------------------------------------------------------

def layer_norm_ref(x, gamma, beta, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], gamma, beta, eps)


def _ln_variant(unbiased=False, dim=-1, eps_outside=False):
    def wrong(x, gamma, beta, eps=1e-5):
        mean = x.mean(dim, keepdim=True)
        var = x.var(dim, keepdim=True, unbiased=unbiased)
        std = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
        return gamma * (x - mean) / std + beta
    return wrong


def _ln_inputs(shape, dtype=torch.float32, scale=3.0):
    return lambda g: (randn(g, *shape, dtype=dtype) * scale + 1.5, randn(g, shape[-1], dtype=dtype),
                      randn(g, shape[-1], dtype=dtype), 1e-5)


# ----------------------------------------------------------------------------
# 10: one BPE merge
# ----------------------------------------------------------------------------

def merge_ref(ids, pair, new_id):
    return _merge(list(ids), tuple(pair), new_id)


def _merge_first_only(ids, pair, new_id):
    ids = list(ids)
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return ids


def _merge_right_to_left(ids, pair, new_id):
    return _merge(list(ids)[::-1], tuple(pair)[::-1], new_id)[::-1]


def _merge_inputs(length, alphabet, repeat_run=False):
    def make(g):
        ids = torch.randint(alphabet, (length,), generator=g).tolist()
        if repeat_run:                                     # a run like "aaa": overlapping pairs
            start = torch.randint(length - 4, (1,), generator=g).item()
            ids[start:start + 3] = [7, 7, 7]
            return ids, (7, 7), 256
        a = torch.randint(alphabet, (1,), generator=g).item()
        pair = (a, (a + 1) % alphabet)                     # two different symbols...
        ids[0:2] = pair                                    # ...occurring at least twice
        ids[length // 2:length // 2 + 2] = pair
        return ids, pair, 256
    return make


# ----------------------------------------------------------------------------
# 12: counting a GPT's parameters
# ----------------------------------------------------------------------------

def count_ref(n_layer, n_embd, vocab_size, block_size):
    return gpt.count_params(gpt.GPTConfig(n_layer=n_layer, n_head=1, n_embd=n_embd,
                                          vocab_size=vocab_size, block_size=block_size))


def _count_variant(kind):
    def wrong(n_layer, n_embd, vocab_size, block_size):
        right = count_ref(n_layer, n_embd, vocab_size, block_size)
        return {"no positions": right - block_size * n_embd,
                "untied": right + vocab_size * n_embd,
                "12LC^2": 12 * n_layer * n_embd ** 2 + vocab_size * n_embd,
                "no final LN": right - 2 * n_embd}[kind]
    return wrong


def _count_inputs(n_layer, n_embd, vocab, block):
    return lambda g: (n_layer, n_embd, vocab, block)


def _count_random():
    def make(g):
        n = lambda lo, hi: torch.randint(lo, hi, (1,), generator=g).item()
        return n(1, 13), 8 * n(2, 100), n(50, 60000), n(16, 4096)
    return make


# ----------------------------------------------------------------------------
# 13: top-k, top-p and the KV cache
# ----------------------------------------------------------------------------

def _topk_off_by_one(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits <= kth, float("-inf"))        # drops the k-th too


def _topk_large_negative(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -1e9)


def _topp_sorted_order(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    drop = torch.cumsum(probs, -1) - probs >= p
    drop[..., 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))                  # never put back in token order


def _topp_off_by_one(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, -1), -1)
    drop = cum > p                                                  # drops the token that crosses p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _logits_inputs(B, V, extra, dtype=torch.float32):
    # logits of spread 1: no single token holds half the probability, so p cuts mid-list
    return lambda g: (randn(g, B, V, dtype=dtype), extra(g) if callable(extra) else extra)


def kv_update_ref(cache_k, cache_v, k_new, v_new):
    return torch.cat([cache_k, k_new], dim=-2), torch.cat([cache_v, v_new], dim=-2)


def _kv_inputs(B, H, T, T_new, d, dtype=torch.float32):
    return lambda g: (randn(g, B, H, T, d, dtype=dtype), randn(g, B, H, T, d, dtype=dtype),
                      randn(g, B, H, T_new, d, dtype=dtype), randn(g, B, H, T_new, d, dtype=dtype))



# ----------------------------------------------------------------------------
# 14: a real chat model's pieces: RMSNorm and rotary position embeddings
# ----------------------------------------------------------------------------

def rms_norm_ref(x, weight, eps=1e-5):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. x (..., C), weight (C,)"""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _rms_variant(kind):
    def wrong(x, weight, eps=1e-5):
        if kind == "centred":
            x = x - x.mean(dim=-1, keepdim=True)
        if kind == "sum":
            return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps) * weight
        if kind == "eps outside":
            return x / (x.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps) * weight
        if kind == "no weight":
            return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
    return wrong


def _rms_inputs(shape, dtype=torch.float32, scale=3.0):
    return lambda g: (randn(g, *shape, dtype=dtype) * scale + 1.5 * scale, randn(g, shape[-1], dtype=dtype),
                      1e-5)


def rope_ref(x, positions, base=10000.0):
    """Rotate each pair (x_2i, x_2i+1) of x (..., T, d) at position m by the angle
    m * base^(-2i/d); positions: (T,) integers. Returns (..., T, d) in x's dtype,
    computed in at least float32 (as gptcourse.llama.apply_rope does)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * theta[None, :]                # (T, d/2)
    wide = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos().to(wide), angles.sin().to(wide)
    a, b = x[..., 0::2].to(wide), x[..., 1::2].to(wide)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def _rope_low_precision(angles_from):
    """RoPE with its angles rounded to x's dtype (float16 here): "theta" casts theta and
    the positions first, "angles" computes the angles in float32 and casts them."""
    def wrong(x, positions, base=10000.0):
        d = x.shape[-1]
        theta = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        if angles_from == "theta":
            angles = positions.to(x.dtype)[:, None] * theta.to(x.dtype)
        else:
            angles = (positions.float()[:, None] * theta).to(x.dtype)
        cos, sin = angles.cos(), angles.sin()
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return wrong


def _rope_variant(kind):
    def wrong(x, positions, base=10000.0):
        if kind == "halves":                    # pairs (x_i, x_i+d/2): the other layout
            d = x.shape[-1]
            perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
            inverse = torch.argsort(perm)
            return rope_ref(x[..., inverse], positions, base)[..., perm]
        if kind == "sign":
            return rope_ref(x, -positions, base)
        if kind == "i/d":
            return rope_ref(x, positions, base ** 0.5)
        if kind == "from 1":
            return rope_ref(x, positions + 1, base)
        if kind == "integer exponent":          # 2i // d == 0: every theta_i is 1
            return rope_ref(x, positions, 1.0)
        if kind == "float32 out":               # computed in float32, never cast back to x's dtype
            return rope_ref(x.float(), positions, base)
        return rope_ref(x, positions, base)
    return wrong


def _rope_inputs(lead, T, d, start=0, dtype=torch.float32, base=10000.0):
    return lambda g: (randn(g, *lead, T, d, dtype=dtype), torch.arange(start, start + T), base)


# ----------------------------------------------------------------------------
# 14: grouped-query attention, the ChatML prompt, the KV cache's size
# ----------------------------------------------------------------------------

def gqa_ref(q, k, v):
    """Causal attention where query head h reads key/value head h // (H / H_kv).
    q (B, H, T, d); k, v (B, H_kv, T, d), H a multiple of H_kv -> (B, H, T, d)"""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[-2]
    out, _ = attention.scaled_dot_product_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril())
    return out


def _gqa_variant(kind):
    def wrong(q, k, v):
        group = q.shape[1] // k.shape[1]
        if kind == "repeat":                    # tiles the heads: 0, 1, 2, 0, 1, 2
            k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
        else:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1)
        if kind != "no scale":
            scores = scores / math.sqrt(q.shape[-1])
        if kind != "no mask":
            T = q.shape[-2]
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v
    return wrong


def _gqa_inputs(B, H, H_kv, T, d, dtype=torch.float32):
    return lambda g: (randn(g, B, H, T, d, dtype=dtype), randn(g, B, H_kv, T, d, dtype=dtype),
                      randn(g, B, H_kv, T, d, dtype=dtype))


def chatml_ref(messages):
    """SmolLM2's prompt of a conversation: gptcourse.chat.format_chatml (the default
    system message first unless there is one, and the assistant's generation prompt)."""
    return chat.format_chatml(messages)


def _chatml_variant(kind):
    def wrong(messages):
        if kind == "no system":
            return chat.format_chatml(messages, default_system=None)
        text = chat.format_chatml(messages, add_generation_prompt=False)
        if kind == "no newline":                # <|im_end|> not followed by a newline
            return text.replace("<|im_end|>\n", "<|im_end|>") + "<|im_start|>assistant\n"
        if kind == "no generation prompt":
            return text
        if kind == "generation prompt without newline":
            return text + "<|im_start|>assistant"
        return chat.format_chatml(messages)
    return wrong


_CHAT_WORDS = ("What", "is", "the", "capital", "of", "France", "Paris", "please", "explain", "a", "KV",
               "cache", "in", "one", "sentence", "Thanks", "Hello", "Sure", "here", "it", "2 + 2 = 4.",
               "Write", "haiku", "about", "rain", "def f(x):", "return", "x", "Be brief.")


def _chat_text(g, lo=1, hi=9):
    n = torch.randint(lo, hi, (1,), generator=g).item()
    picks = torch.randint(len(_CHAT_WORDS), (n,), generator=g).tolist()
    text = " ".join(_CHAT_WORDS[i] for i in picks)
    if torch.rand(1, generator=g).item() < 0.3:                 # a line break inside a message
        text = text.replace(" ", "\n", 1)
    return text


def _chatml_inputs(turns, system=False):
    """A conversation of `turns` messages, user first, alternating with assistant; with
    system=True a system message of its own comes first."""
    def make(g):
        messages = [{"role": "system", "content": _chat_text(g)}] if system else []
        for i in range(turns):
            messages.append({"role": ("user", "assistant")[i % 2], "content": _chat_text(g)})
        return (messages,)
    return make


def kv_bytes_ref(n_layer, n_head, n_kv_head, head_size, bytes_per_element):
    """Bytes of KV cache per token: a key and a value (2) per layer and per key/value head,
    head_size numbers each (n_head, the query heads, does not enter)."""
    return 2 * n_layer * n_kv_head * head_size * bytes_per_element


def _kv_bytes_variant(kind):
    def wrong(n_layer, n_head, n_kv_head, head_size, bytes_per_element):
        return {"no 2": n_layer * n_kv_head * head_size * bytes_per_element,
                "n_head": 2 * n_layer * n_head * head_size * bytes_per_element,
                "elements": 2 * n_layer * n_kv_head * head_size}[kind]
    return wrong


def _kv_bytes_random():
    def make(g):
        n = lambda lo, hi: torch.randint(lo, hi, (1,), generator=g).item()
        n_kv = n(1, 9)
        return n(1, 81), n_kv * n(2, 9), n_kv, 16 * n(1, 17), (2, 4)[n(0, 2)]
    return make


# ----------------------------------------------------------------------------
# the list
# ----------------------------------------------------------------------------

f64 = torch.float64
# ready-made attention in PyTorch: the torch functions and the ATen operators they run
# (under a dispatch mode F.scaled_dot_product_attention runs its math path, whose
# _safe_softmax no hand-written attention calls)
_ATTENTION_OPS = ("scaled_dot_product", "_safe_softmax", "multi_head_attention", "_native_multi_head_attention",
                  "MultiheadAttention", "_transformer_encoder_layer_fwd")
_NORM_OPS = ("layer_norm", "group_norm", "batch_norm", "instance_norm", "_native_batch_norm_legit",
             "LayerNorm", "GroupNorm", "BatchNorm", "InstanceNorm")
_ATTENTION_REFS = ("gptcourse.attention.scaled_dot_product_attention",
                   "torch.nn.functional.scaled_dot_product_attention",
                   "gptcourse.exercises.sdpa_ref",
                   "gptcourse.attention.MultiHeadAttention.forward")

# the same mistake, written two ways (angles computed in float16, or cast to it)
_ROPE_FLOAT16_HINT = ("Compute the angles m * theta_i in float32 or float64, not in x's dtype: float16 rounds "
                      "an angle near 100 to steps of 0.06 radians. Cast cos and sin (or the result) to "
                      "x's dtype after.")

EXERCISES = {e.key: e for e in [
    Exercise("additive_scores", "additive_scores", "Exercise 2.1: Bahdanau's alignment scores",
             "02_attention_with_rnns", additive_scores_ref,
             [Case("B=2, T=5, d_s=4, d_h=6, A=3", _additive_inputs(2, 5, 4, 6, 3)),
              Case("B=3, T=1 (one source position)", _additive_inputs(3, 1, 5, 5, 4)),
              Case("B=1, T=9, float64", _additive_inputs(1, 9, 3, 8, 7, f64))],
             [("no tanh", lambda s, h, W, U, v: ((s @ W.T)[:, None, :] + h @ U.T) @ v,
               "The alignment model is v^T tanh(W s + U h_j): the tanh seems to be missing.")],
             ("gptcourse.attention.AdditiveAttention.forward", "gptcourse.exercises.additive_scores_ref")),
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
             ("gptcourse.attention.AdditiveAttention.forward", "gptcourse.exercises.context_vector_ref")),
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
             _ATTENTION_REFS, _ATTENTION_OPS),
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
             ("gptcourse.attention.causal_mask", "gptcourse.exercises.causal_mask_ref")),
    Exercise("split_heads", "split_heads", "Exercise 5.1: splitting into heads",
             "05_multi_head_attention", split_heads_ref,
             [Case("B=2, T=5, C=12, H=3", lambda g: (randn(g, 2, 5, 12), 3)),
              Case("B=1, T=1, C=8, H=8", lambda g: (randn(g, 1, 1, 8), 8)),
              Case("B=3, T=7, C=64, H=4, float64", lambda g: (randn(g, 3, 7, 64, dtype=f64), 4))],
             [("no transpose", lambda x, H: x.reshape(x.shape[0], H, x.shape[1], x.shape[2] // H),
               "Reshape to (B, T, H, d) first, THEN swap the T and H axes: a direct reshape to "
               "(B, H, T, d) mixes positions and heads.")],
             ("gptcourse.attention.MultiHeadAttention.split_heads", "gptcourse.exercises.split_heads_ref")),
    Exercise("merge_heads", "merge_heads", "Exercise 5.2: concatenating the heads",
             "05_multi_head_attention", merge_heads_ref,
             [Case("B=2, H=3, T=5, d=4", lambda g: (randn(g, 2, 3, 5, 4),)),
              Case("B=1, H=8, T=1, d=2", lambda g: (randn(g, 1, 8, 1, 2),)),
              Case("B=2, H=4, T=6, d=16, float64", lambda g: (randn(g, 2, 4, 6, 16, dtype=f64),))],
             [("no transpose", lambda x: x.reshape(x.shape[0], x.shape[2], -1),
               "Swap the H and T axes back (transpose(1, 2)) before reshaping to (B, T, C).")],
             ("gptcourse.attention.MultiHeadAttention.merge_heads", "gptcourse.exercises.merge_heads_ref")),
    Exercise("positional", "sinusoidal_encoding", "Exercise 7.1: the sinusoidal positional encoding",
             "07_positional_encoding", pe_ref,
             [Case("'I am a robot': n_positions=4, d=4, base=100", lambda g: (4, 4, 100), fixed=True),
              Case("50 positions, d=16", lambda g: (50, 16, 10000)),
              Case("random size", lambda g: (torch.randint(2, 60, (1,), generator=g).item(),
                                             2 * torch.randint(2, 40, (1,), generator=g).item(), 10000)),
              Case("one position", lambda g: (1, 8, 10000), fixed=True, trivial=True)],
             [("swapped", _pe_variant(swap=True),
               "Even columns (2i) take the sine and odd columns (2i+1) the cosine: they look swapped."),
              ("i/d", _pe_variant(exponent="i/d"),
               "The exponent is 2i/d where 2i is the even column index: use n^(2i/d), not n^(i/d)."),
              ("halves", _pe_halves,
               "Interleave sine and cosine: sines in the even columns 0, 2, 4, ..., cosines in the odd "
               "ones, not all sines in the first half and all cosines in the second."),
              ("multiply", _pe_variant(divide=False),
               "Divide the position by n^(2i/d): k / n^(2i/d), not k * n^(2i/d).")],
             ("gptcourse.positional.sinusoidal_encoding", "gptcourse.exercises.pe_ref")),
    Exercise("layer_norm", "layer_norm", "Exercise 8.1: layer normalisation",
             "08_residuals_and_layer_norm", layer_norm_ref,
             [Case("B=2, T=5, C=8", _ln_inputs((2, 5, 8))),
              Case("one token, C=32, float64", _ln_inputs((1, 32), f64)),
              Case("B=4, T=3, C=6, tiny variance, float64", _ln_inputs((4, 3, 6), f64, scale=1e-3))],
             [("unbiased", _ln_variant(unbiased=True),
               "LayerNorm uses the biased variance (divide by C, not C - 1): var(unbiased=False)."),
              ("wrong dim", _ln_variant(dim=0),
               "Normalise each token over its features (the last axis), not over the batch."),
              ("eps outside", _ln_variant(eps_outside=True),
               "eps goes inside the square root: (x - mean) / sqrt(var + eps).")],
             ("torch.nn.functional.layer_norm", "torch.layer_norm", "torch.nn.LayerNorm.forward",
              "gptcourse.exercises.layer_norm_ref"), _NORM_OPS),
    Exercise("bpe_merge", "merge_pair", "Exercise 10.1: one BPE merge",
             "10_tokens_and_embeddings", merge_ref,
             [Case("hand example", lambda g: ([1, 2, 3, 1, 2], (1, 2), 9), fixed=True),
              Case("random ids, 30 long", _merge_inputs(30, 5)),
              Case("overlapping run 'aaa'", _merge_inputs(20, 5, repeat_run=True)),
              Case("pair absent", lambda g: ([4, 5, 6], (6, 4), 300), fixed=True, trivial=True)],
             [("first only", _merge_first_only, "Replace EVERY occurrence of the pair, not only the first."),
              ("right to left", _merge_right_to_left,
               "Scan left to right: in 'a a a' the pair (a, a) merges the FIRST two.")],
             ("gptcourse.tokenizers._merge", "gptcourse.exercises.merge_ref")),
    Exercise("count_params", "count_gpt_params", "Exercise 12.1: counting a GPT's parameters",
             "12_gpt3_on_a_napkin", count_ref,
             [Case("GPT-2 small (124M)", _count_inputs(12, 768, 50257, 1024), 2, fixed=True),
              Case("GPT-3 175B", _count_inputs(96, 12288, 50257, 2048), fixed=True),
              Case("random config", _count_random(), 2)],
             [("no positions", _count_variant("no positions"),
               "Count the learned position embeddings too: block_size x n_embd."),
              ("untied", _count_variant("untied"),
               "The output layer shares its weight with the token embedding: count it once."),
              ("no final LN", _count_variant("no final LN"),
               "Count the final LayerNorm after the last block too: 2 x n_embd."),
              ("12LC^2", _count_variant("12LC^2"),
               "12 n_layer d^2 is only the blocks' matrices: add biases, LayerNorms and position embeddings.")],
             ("gptcourse.gpt.count_params", "gptcourse.gpt.GPT.__init__", "gptcourse.exercises.count_ref")),
    Exercise("top_k", "top_k_filter", "Exercise 13.1: top-k filtering",
             "13_decoding_and_kv_cache", sampling.top_k_filter,
             [Case("B=2, V=10, k=3", _logits_inputs(2, 10, 3)),
              Case("k=1 (greedy)", _logits_inputs(3, 20, 1)),
              Case("k = V (keep all)", _logits_inputs(1, 7, 7)),
              Case("float64, random k", _logits_inputs(4, 50, lambda g: torch.randint(1, 50, (1,), generator=g).item(), f64))],
             [("off by one", _topk_off_by_one,
               "Keep the k largest logits: the k-th largest itself must stay (use < not <=)."),
              ("large negative", _topk_large_negative,
               "Set the dropped logits to float('-inf'), not a large negative number: only -inf gives "
               "them probability exactly 0 at any temperature.")],
             ("gptcourse.sampling.top_k_filter",)),
    Exercise("top_p", "top_p_filter", "Exercise 13.2: top-p (nucleus) filtering",
             "13_decoding_and_kv_cache", sampling.top_p_filter,
             [Case("B=2, V=10, p=0.9", _logits_inputs(2, 10, 0.9)),
              Case("p=0.5", _logits_inputs(3, 30, 0.5)),
              Case("float64, p=0.95", _logits_inputs(2, 100, 0.95, f64)),
              Case("p=1.0 keeps everything", _logits_inputs(1, 12, 1.0))],
             [("off by one", _topp_off_by_one,
               "Keep the token that makes the cumulative probability cross p: drop a token only when "
               "the tokens ranked ABOVE it already reach p."),
              ("sorted order", _topp_sorted_order,
               "Put the filtered logits back in the original token order (scatter with the sort indices): "
               "column j of the output must still be token j.")],
             ("gptcourse.sampling.top_p_filter",)),
    Exercise("kv_cache", "kv_cache_update", "Exercise 13.3: a KV-cache update step",
             "13_decoding_and_kv_cache", kv_update_ref,
             [Case("B=1, H=2, 5 cached, 1 new", _kv_inputs(1, 2, 5, 1, 4)),
              Case("B=2, H=4, 3 cached, 2 new", _kv_inputs(2, 4, 3, 2, 8)),
              Case("float64", _kv_inputs(1, 1, 7, 1, 16, f64))],
             [("new first", lambda ck, cv, kn, vn: (torch.cat([kn, ck], -2), torch.cat([vn, cv], -2)),
               "Append the new keys and values AFTER the cached ones: the order is the positions' order.")],
             ("gptcourse.attention.KVCache.update",)),
    Exercise("rms_norm", "rms_norm", "Exercise 14.1: RMSNorm",
             "14_a_real_chat_model", rms_norm_ref,
             [Case("B=2, T=5, C=8", _rms_inputs((2, 5, 8))),
              Case("one token, C=576 (SmolLM2's width), float64", _rms_inputs((1, 576), f64)),
              Case("B=3, T=4, C=6, tiny values, float64", _rms_inputs((3, 4, 6), f64, scale=1e-3))],
             [("centred", _rms_variant("centred"),
               "RMSNorm does not subtract the mean (that is LayerNorm): x / sqrt(mean(x^2) + eps) * weight."),
              ("sum", _rms_variant("sum"),
               "Take the MEAN of the squares over the last axis (divide by C), not their sum."),
              ("eps outside", _rms_variant("eps outside"),
               "eps goes inside the square root: x / sqrt(mean(x^2) + eps)."),
              ("no weight", _rms_variant("no weight"),
               "Multiply by the learned scale `weight` at the end.")],
             ("torch.nn.functional.rms_norm", "torch.rms_norm", "torch.nn.RMSNorm.forward",
              "gptcourse.llama.rms_norm", "gptcourse.llama.RMSNorm.forward", "gptcourse.exercises.rms_norm_ref"),
             _NORM_OPS + ("rms_norm", "RMSNorm")),
    Exercise("rope", "apply_rope", "Exercise 14.2: rotary position embeddings",
             "14_a_real_chat_model", rope_ref,
             [Case("positions 0..4, B=2, H=3, d=8", _rope_inputs((2, 3), 5, 8)),
              # float32 angles, as chapter 14 and gptcourse.llama compute them, are off by up to
              # ~1e-5 at m ~ 100 (a float32 ulp of 103 is 8e-6): within this case's atol
              Case("positions 100..103 (after a KV cache), d=16, float64", _rope_inputs((1,), 4, 16, 100, f64),
                   atol=1e-4),
              Case("SmolLM2's head: d=64, base 100000", _rope_inputs((1, 9), 6, 64, 0, torch.float32, 100000.0)),
              # float16 keeps ~3 digits: angles near 100 rounded to float16 are off by up to 0.03
              Case("float16 (as on a GPU), positions 100..103, d=16", _rope_inputs((2, 2), 4, 16, 100, torch.float16),
                   rtol=5e-3, atol=5e-3),
              Case("position 0 only (no rotation)", _rope_inputs((2,), 1, 4), fixed=True, trivial=True)],
             [("halves", _rope_variant("halves"),
               "Here the pairs are ADJACENT, (x_0, x_1), (x_2, x_3), ...: x[..., 0::2] and x[..., 1::2]. "
               "Pairing x_i with x_(i + d/2) is the other layout (Hugging Face's rotate_half)."),
              ("sign", _rope_variant("sign"),
               "Rotate counter-clockwise: x'_2i = x_2i cos - x_2i+1 sin, x'_2i+1 = x_2i sin + x_2i+1 cos."),
              ("i/d", _rope_variant("i/d"),
               "theta_i = base^(-2i/d) with 2i = 0, 2, 4, ...: use torch.arange(0, d, 2) / d."),
              ("from 1", _rope_variant("from 1"),
               "Rotate by the positions you are given (the first token is position 0), not position + 1."),
              ("integer exponent", _rope_variant("integer exponent"),
               "Every theta_i came out as 1: the exponent 2i/d must be a fraction (true division /, "
               "not integer division //)."),
              ("float16 angles (theta)", _rope_low_precision("theta"), _ROPE_FLOAT16_HINT),
              ("float16 angles (cast)", _rope_low_precision("angles"), _ROPE_FLOAT16_HINT),
              ("float32 out", _rope_variant("float32 out"),
               "Return a tensor of x's dtype: compute in float32 if you like, then cast back with .to(x.dtype).")],
             ("gptcourse.llama.apply_rope", "gptcourse.llama.rope_angles", "gptcourse.exercises.rope_ref")),
    Exercise("gqa", "grouped_query_attention", "Exercise 14.3: grouped-query attention",
             "14_a_real_chat_model", gqa_ref,
             [Case("B=2, 6 query heads, 2 key/value heads, T=5, d=8", _gqa_inputs(2, 6, 2, 5, 8), 2),
              Case("SmolLM2's heads: 9 query, 3 key/value, d=64, float64", _gqa_inputs(1, 9, 3, 4, 64, f64), 2),
              Case("8 query heads, 4 key/value heads, T=7", _gqa_inputs(1, 8, 4, 7, 16)),
              Case("one key/value head (multi-query attention)", _gqa_inputs(2, 4, 1, 6, 8)),
              Case("as many key/value heads as query heads", _gqa_inputs(1, 3, 3, 5, 4)),
              Case("one token (T=1)", _gqa_inputs(2, 6, 3, 1, 8))],
             [("repeat", _gqa_variant("repeat"),
               "Query heads 0..g-1 share key/value head 0, the next g share head 1, and so on: "
               "k.repeat_interleave(g, dim=1) gives 0, 0, 1, 1, 2, 2; k.repeat(1, g, 1, 1) tiles them "
               "0, 1, 2, 0, 1, 2, which pairs the queries with the wrong keys."),
              ("no scale", _gqa_variant("no scale"), "Divide the scores q k^T by sqrt(d) before the softmax."),
              ("no mask", _gqa_variant("no mask"),
               "The attention is causal: position i may attend only to positions j <= i (mask the "
               "scores above the diagonal with -inf before the softmax).")],
             _ATTENTION_REFS + ("gptcourse.llama.GroupedQueryAttention.forward", "gptcourse.exercises.gqa_ref"),
             _ATTENTION_OPS),
    Exercise("chatml", "chatml_prompt", "Exercise 14.4: the ChatML prompt of a conversation",
             "14_a_real_chat_model", chatml_ref,
             [Case("one user message", lambda g: ([{"role": "user", "content": "Hi"}],), fixed=True),
              Case("a user question (random words)", _chatml_inputs(1)),
              Case("three turns: user, assistant, user", _chatml_inputs(3), 2),
              Case("a system message of its own, then two turns", _chatml_inputs(2, system=True), 2)],
             [("no system", _chatml_variant("no system"),
               "A conversation without a system message gets SmolLM2's default one first: "
               "<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n."),
              ("no newline", _chatml_variant("no newline"),
               "Every message ends with <|im_end|> AND a newline: <|im_start|>role\\ncontent<|im_end|>\\n."),
              ("no generation prompt", _chatml_variant("no generation prompt"),
               "End with the generation prompt <|im_start|>assistant\\n: it is the cue after which the model "
               "writes its answer."),
              ("generation prompt without newline", _chatml_variant("generation prompt without newline"),
               "The generation prompt ends with a newline too: <|im_start|>assistant\\n.")],
             ("gptcourse.chat.format_chatml", "gptcourse.chat.encode_chatml", "gptcourse.chat._with_system",
              "gptcourse.exercises.chatml_ref")),
    Exercise("kv_bytes", "kv_cache_bytes_per_token", "Exercise 14.5: the KV cache's bytes per token",
             "14_a_real_chat_model", kv_bytes_ref,
             [Case("SmolLM2-135M in float32", lambda g: (30, 9, 3, 64, 4), fixed=True),
              Case("SmolLM2-135M in bfloat16", lambda g: (30, 9, 3, 64, 2), fixed=True),
              Case("random config", _kv_bytes_random(), 2),
              Case("another random config", _kv_bytes_random())],
             [("no 2", _kv_bytes_variant("no 2"),
               "The cache holds a key AND a value per layer, head and position: multiply by 2."),
              ("n_head", _kv_bytes_variant("n_head"),
               "Only the n_kv_head key/value heads are cached (grouped-query attention): the n_head "
               "query heads share them, so n_head does not enter."),
              ("elements", _kv_bytes_variant("elements"),
               "That is the number of values; the question is bytes: multiply by bytes_per_element.")],
             ("gptcourse.llama.Llama.kv_cache_bytes_per_token", "gptcourse.exercises.kv_bytes_ref")),
]}
