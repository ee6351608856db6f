"""Positional encodings against the formula worked out by hand, published
values and an independent NumPy computation (the Annotated Transformer's)."""
import math

import numpy as np
import pytest
import torch

from gptcourse.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_encoding


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def by_hand(n_positions, d, n):
    """P(k, 2i) = sin(k / n^(2i/d)), P(k, 2i+1) = cos(k / n^(2i/d)), one cell at a time."""
    P = [[0.0] * d for _ in range(n_positions)]
    for k in range(n_positions):
        for i in range((d + 1) // 2):
            denominator = n ** (2 * i / d)
            P[k][2 * i] = math.sin(k / denominator)
            if 2 * i + 1 < d:
                P[k][2 * i + 1] = math.cos(k / denominator)
    return P


def test_i_am_a_robot_by_hand(float64_default):
    # the lecture's example: the 4 words of "I am a robot", d = 4, n = 100
    P = sinusoidal_encoding(4, 4, base=100)
    assert P.shape == (4, 4) and P.dtype == torch.float64
    torch.testing.assert_close(P, torch.tensor(by_hand(4, 4, 100)), rtol=0, atol=1e-15)


def test_i_am_a_robot_published_values():
    # the matrix as printed in the tutorial (8 decimals)
    published = torch.tensor([
        [0.0, 1.0, 0.0, 1.0],
        [0.84147098, 0.54030231, 0.09983342, 0.99500417],
        [0.90929743, -0.41614684, 0.19866933, 0.98006658],
        [0.14112001, -0.9899925, 0.29552021, 0.95533649],
    ])
    P = sinusoidal_encoding(4, 4, base=100)
    assert P.dtype == torch.float32  # follows the default dtype
    torch.testing.assert_close(P, published, rtol=0, atol=1e-7)


@pytest.mark.parametrize("d", [1, 2, 4, 7, 16])
def test_row_zero(d):
    # position 0: sin 0 = 0 in even columns, cos 0 = 1 in odd columns
    expected = [0.0 if j % 2 == 0 else 1.0 for j in range(d)]
    assert sinusoidal_encoding(3, d).tolist()[0] == expected


@pytest.mark.parametrize("d,n", [(5, 100), (7, 10000), (1, 10), (3, 2.5)])
def test_odd_and_other_sizes_by_hand(float64_default, d, n):
    P = sinusoidal_encoding(9, d, base=n)
    assert P.shape == (9, d)
    torch.testing.assert_close(P, torch.tensor(by_hand(9, d, n)), rtol=0, atol=1e-14)


def test_odd_d_model_last_column_is_sine(float64_default):
    # d = 5: column 4 is pair i = 2, sin(k / 100^(4/5))
    P = sinusoidal_encoding(6, 5, base=100)
    for k in range(6):
        assert P[k, 4].item() == pytest.approx(math.sin(k / 100 ** 0.8), abs=1e-15)


@pytest.mark.parametrize("d", [64, 512])
def test_default_base_matches_annotated_transformer_numpy(float64_default, d):
    # "The Annotated Transformer": div_term = exp(arange(0, d, 2) * -(ln 10000 / d))
    n_positions = 200
    position = np.arange(n_positions)[:, None]
    div_term = np.exp(np.arange(0, d, 2) * -(np.log(10000.0) / d))
    pe = np.zeros((n_positions, d))
    pe[:, 0::2] = np.sin(position * div_term)
    pe[:, 1::2] = np.cos(position * div_term)
    P = sinusoidal_encoding(n_positions, d)
    np.testing.assert_allclose(P.numpy(), pe, rtol=0, atol=1e-10)
    assert torch.equal(P, sinusoidal_encoding(n_positions, d, base=10000))


def test_dot_product_depends_only_on_offset(float64_default):
    # P_k . P_{k+m} = sum_i cos(m w_i): the relative-position property
    d, n = 16, 10000
    P = sinusoidal_encoding(50, d, base=n)
    for m in (0, 1, 5, 13):
        expected = sum(math.cos(m / n ** (2 * i / d)) for i in range(d // 2))
        dots = (P[: 50 - m] * P[m:]).sum(-1)
        torch.testing.assert_close(dots, torch.full_like(dots, expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_positions=0, d_model=4), "n_positions must be a positive integer, got 0"),
    (dict(n_positions=4.0, d_model=4), "n_positions must be a positive integer, got 4.0"),
    (dict(n_positions=4, d_model=-2), "d_model must be a positive integer, got -2"),
    (dict(n_positions=4, d_model="4"), "d_model must be a positive integer, got '4'"),
    (dict(n_positions=4, d_model=4, base=1), "base must be > 1, got 1"),
    (dict(n_positions=4, d_model=4, base=0.5), "base must be > 1, got 0.5"),
])
def test_sinusoidal_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinusoidal_encoding(**kwargs)


def test_sinusoidal_module_adds_code():
    pe = SinusoidalPositionalEncoding(10, 6, base=100)
    assert list(pe.parameters()) == [] and "P" not in pe.state_dict()  # fixed, not saved
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(pe(x) - x, torch.tensor(by_hand(7, 6, 100), dtype=torch.float32).expand(2, 7, 6))
    with pytest.raises(ValueError, match="sequence length T=11 exceeds n_positions=10"):
        pe(torch.randn(1, 11, 6))


def test_learned_embedding():
    torch.manual_seed(0)
    emb = LearnedPositionalEmbedding(8, 5)
    assert [p.shape for p in emb.parameters()] == [(8, 5)]
    assert emb.weight.std().item() == pytest.approx(0.02, rel=0.4)
    assert torch.equal(emb(3), emb.weight[:3])
    assert torch.equal(emb(3, offset=5), emb.weight[5:8])
    assert torch.equal(emb(8), emb.weight)
    with pytest.raises(ValueError, match=r"positions up to 8 requested, but only n_positions=8 .*block_size"):
        emb(9)
    with pytest.raises(ValueError, match="positions up to 8 requested"):
        emb(2, offset=7)
