"""Positional encodings: attention alone ignores word order, so we add a
position code to each token embedding.

Sinusoidal (Vaswani et al. 2017), with k the position, d the embedding size,
n the base (10000 in the paper) and 0 <= i < d/2:

    P(k, 2i)   = sin(k / n^(2i/d))
    P(k, 2i+1) = cos(k / n^(2i/d))

Learned (GPT): a trainable (n_positions, d) table, one row per position.
"""
import torch
import torch.nn as nn


def sinusoidal_encoding(n_positions, d_model, base=10000):
    """The (n_positions, d_model) matrix P of the formula above.

    Row k is the code of position k; columns 2i and 2i+1 share the
    frequency 1 / base^(2i/d), so column pair i has period 2*pi*base^(2i/d).
    An odd d_model keeps the sine of its last pair.

    >>> sinusoidal_encoding(2, 4, base=100)
    tensor([[0.0000, 1.0000, 0.0000, 1.0000],
            [0.8415, 0.5403, 0.0998, 0.9950]])
    """
    for name, value in (("n_positions", n_positions), ("d_model", d_model)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base!r}")
    k = torch.arange(n_positions, dtype=torch.float64)[:, None]        # (n, 1) positions
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)           # 0, 2, 4, ...
    angle = k / base ** (two_i / d_model)                              # (n, ceil(d/2))
    P = torch.zeros(n_positions, d_model, dtype=torch.float64)
    P[:, 0::2] = torch.sin(angle)
    P[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return P.to(torch.get_default_dtype())


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal code to (B, T, C) embeddings (nothing to learn)."""

    def __init__(self, n_positions, d_model, base=10000):
        super().__init__()
        self.register_buffer("P", sinusoidal_encoding(n_positions, d_model, base), persistent=False)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)"""
        T = x.shape[1]
        if T > self.P.shape[0]:
            raise ValueError(f"sequence length T={T} exceeds n_positions={self.P.shape[0]}")
        return x + self.P[:T]


class LearnedPositionalEmbedding(nn.Module):
    """A trainable table of position vectors, as in GPT: pos -> (C,)."""

    def __init__(self, n_positions, d_model):
        super().__init__()
        self.n_positions = n_positions
        self.weight = nn.Parameter(torch.zeros(n_positions, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, T, offset=0):
        """The codes of positions offset .. offset+T-1: (T, C)."""
        if offset + T > self.n_positions:
            raise ValueError(f"positions up to {offset + T - 1} requested, but only "
                             f"n_positions={self.n_positions} are learned (block_size)")
        return self.weight[offset:offset + T]
