"""gptcourse.bert: the masking recipe's proportions and a bidirectional body
that sees the future (and a causal one that does not)."""
import pytest
import torch

from gptcourse.bert import IGNORE, fill_in, mask_tokens
from gptcourse.gpt import GPT, GPTConfig


def test_mask_tokens_follows_the_80_10_10_recipe():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (200, 500), generator=g)
    inputs, targets = mask_tokens(ids, mask_id=0, vocab_size=100, generator=g)
    chosen = targets != IGNORE
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])                    # the rest untouched
    masked = (inputs == 0) & chosen
    kept = (inputs == ids) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 100)) < 0.01    # 10% kept, + random draws of the same id
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, 0, 100, prob=1.5)


@pytest.mark.parametrize("causal", [True, False])
def test_who_sees_the_future(causal):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=20, block_size=8, causal=causal)).eval()
    idx = torch.randint(0, 20, (1, 8))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 20
    a, _ = model(idx)
    b, _ = model(changed)
    # position 3 is before the change: only a bidirectional model notices it
    assert torch.allclose(a[0, 3], b[0, 3]) == causal


def test_fill_in_and_generate_guard_their_objective():
    bert = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=10, block_size=6, causal=False))
    idx = torch.tensor([[1, 2, 0, 4]])
    filled = fill_in(bert, idx, mask_id=0)
    assert filled[0, [0, 1, 3]].tolist() == [1, 2, 4] and filled.shape == idx.shape
    with pytest.raises(ValueError, match="causal model"):
        bert.generate(idx, 3)
    with pytest.raises(ValueError, match="bidirectional"):
        fill_in(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=10, block_size=6)), idx, 0)
