"""The exercises of chapter 14, a real chat model's pieces: RMSNorm, rotary position
embeddings, grouped-query attention, the ChatML prompt, the KV cache's bytes per token."""
import math

import torch

from ... import attention, chat
from .base import ATTENTION_OPS, ATTENTION_REFS, NORM_OPS, Case, Exercise, f64, randn


# the same mistake, written two ways (angles computed in float16, or cast to it)
_ROPE_FLOAT16_HINT = ("Compute the angles m * theta_i in float32 or float64, not in x's dtype: float16 rounds "
                      "an angle near 100 to steps of 0.06 radians. Cast cos and sin (or the result) to "
                      "x's dtype after.")


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


EXERCISES = [
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
              "gptcourse.llama.rms_norm", "gptcourse.llama.RMSNorm.forward", "gptcourse.grading.exercises.rms_norm_ref"),
             NORM_OPS + ("rms_norm", "RMSNorm")),
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
             ("gptcourse.llama.apply_rope", "gptcourse.llama.rope_angles", "gptcourse.grading.exercises.rope_ref")),
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
             ATTENTION_REFS + ("gptcourse.llama.GroupedQueryAttention.forward", "gptcourse.grading.exercises.gqa_ref"),
             ATTENTION_OPS),
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
              "gptcourse.grading.exercises.chatml_ref")),
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
             ("gptcourse.llama.Llama.kv_cache_bytes_per_token", "gptcourse.grading.exercises.kv_bytes_ref")),
]
