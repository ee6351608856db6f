"""The exercises of chapters 7, 8 and 10: the sinusoidal positional encoding,
layer normalisation, one BPE merge."""
import torch
import torch.nn.functional as F

from ... import positional
from ...tokenizers import _merge
from .base import NORM_OPS, Case, Exercise, f64, randn


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


EXERCISES = [
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
             ("gptcourse.positional.sinusoidal_encoding", "gptcourse.grading.exercises.pe_ref")),
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
              "gptcourse.grading.exercises.layer_norm_ref"), NORM_OPS),
    Exercise("bpe_merge", "merge_pair", "Exercise 10.1: one BPE merge",
             "10_tokens_and_embeddings", merge_ref,
             [Case("hand example", lambda g: ([1, 2, 3, 1, 2], (1, 2), 9), fixed=True),
              Case("random ids, 30 long", _merge_inputs(30, 5)),
              Case("overlapping run 'aaa'", _merge_inputs(20, 5, repeat_run=True)),
              Case("pair absent", lambda g: ([4, 5, 6], (6, 4), 300), fixed=True, trivial=True)],
             [("first only", _merge_first_only, "Replace EVERY occurrence of the pair, not only the first."),
              ("right to left", _merge_right_to_left,
               "Scan left to right: in 'a a a' the pair (a, a) merges the FIRST two.")],
             ("gptcourse.tokenizers._merge", "gptcourse.grading.exercises.merge_ref")),
]
