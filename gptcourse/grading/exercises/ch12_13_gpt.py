"""The exercises of chapters 12 and 13: counting a GPT's parameters, top-k and top-p
filtering, a KV-cache update step."""
import torch

from ... import gpt, sampling
from .base import Case, Exercise, f64, randn


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


EXERCISES = [
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
             ("gptcourse.gpt.count_params", "gptcourse.gpt.GPT.__init__", "gptcourse.grading.exercises.count_ref")),
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
]
