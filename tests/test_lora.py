"""gptcourse.lora against independent computations: the adapted layer starts as
the base layer exactly, its forward is W x + scale B A x, the merged layer gives
the unmerged outputs, only A and B train, and add_lora fits the course's GPT and
Llama."""
import math

import pytest
import torch
import torch.nn as nn

from gptcourse import llama
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.llama import Llama, LlamaConfig
from gptcourse.lora import LoRALinear, add_lora, count_trainable, merge_lora


@pytest.mark.parametrize("base", [lambda: nn.Linear(12, 7), lambda: llama.Linear(12, 7)],
                         ids=["nn.Linear with bias", "llama.Linear"])
def test_lora_linear_at_init_is_the_base_layer_exactly(base):
    torch.manual_seed(0)
    base = base()
    lora = LoRALinear(base, r=3, alpha=6)
    x = torch.randn(4, 5, 12)
    assert torch.equal(lora(x), base(x))
    assert torch.equal(lora.B, torch.zeros(7, 3)) and lora.A.shape == (3, 12) and lora.scale == 2.0
    assert lora.A.abs().max() > 0
    bound = 1 / math.sqrt(12)                                      # kaiming uniform with a=sqrt(5)
    assert lora.A.abs().max() <= bound
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["A", "B"]


def test_lora_linear_forward_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, r=2, alpha=8)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(3, 6)
    by_hand = x @ base.weight.T + base.bias + 4.0 * (x @ lora.A.T) @ lora.B.T      # alpha / r = 4
    torch.testing.assert_close(lora(x), by_hand)
    assert LoRALinear(nn.Linear(6, 5), r=4).scale == 1.0                               # alpha defaults to r
    without_scale = x @ base.weight.T + base.bias + (x @ lora.A.T) @ lora.B.T
    assert not torch.allclose(lora(x), without_scale)


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(10, 8), lambda: llama.Linear(10, 8)],
                         ids=["nn.Linear with bias", "llama.Linear"])
def test_merged_equals_unmerged_after_training(make_base):
    torch.manual_seed(0)
    base = make_base()
    frozen = base.weight.detach().clone()
    lora = LoRALinear(base, r=2, alpha=4)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-1)
    x, target = torch.randn(16, 10), torch.randn(16, 8)
    for _ in range(5):
        loss = ((lora(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(base.weight, frozen) and base.weight.grad is None    # the base never moved
    assert lora.B.abs().max() > 0
    merged = lora.merged()
    assert type(merged) is type(base)
    assert (merged.bias is None) == (base.bias is None)
    torch.testing.assert_close(merged(x), lora(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.weight, frozen + 2.0 * lora.B @ lora.A)
    x1 = torch.randn(1, 1, 10)                                     # llama.Linear's decoding path too
    torch.testing.assert_close(merged(x1), lora(x1), rtol=1e-5, atol=1e-5)


def test_lora_linear_checks_its_arguments():
    with pytest.raises(ValueError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=2)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(3, 3), r=2, alpha=-1.0)


def tiny_llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=40, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                             block_size=16)).eval()


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=40)).eval()


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt], ids=["Llama", "GPT"])
def test_add_lora_train_and_merge_on_a_model(make_model):
    model = make_model()
    idx = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    before = model(idx)[0].detach()
    paths = add_lora(model, r=2, alpha=4)
    assert paths == [f"blocks.{i}.attn.{n}" for i in range(3) for n in ("w_q", "w_v")]
    assert all(isinstance(model.get_submodule(p), LoRALinear) for p in paths)
    assert torch.equal(model(idx)[0], before)                      # B = 0: the same model
    d_q, d_v = model.blocks[0].attn.w_q.out_features, model.blocks[0].attn.w_v.out_features
    C = model.config.n_embd
    assert count_trainable(model) == 3 * 2 * ((C + d_q) + (C + d_v))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.{m}" for p in paths for m in ("A", "B")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted = model(idx)[0].detach()
    assert not torch.allclose(adapted, before)
    assert merge_lora(model) == paths
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.blocks[0].attn.w_q) is type(make_model().blocks[0].attn.w_q)
    torch.testing.assert_close(model(idx)[0], adapted, rtol=1e-4, atol=1e-5)


def test_add_lora_on_chosen_layers_and_names():
    model = tiny_llama()
    paths = add_lora(model, r=1, names=("w_o", "down"), layers=[2])
    assert paths == ["blocks.2.attn.w_o", "blocks.2.mlp.down"]
    assert count_trainable(model) == (32 + 32) + (48 + 32)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(tiny_gpt(), r=1, names=("nope",))
    with pytest.raises(ValueError, match="block indices"):
        add_lora(tiny_gpt(), r=1, layers=[3])


def test_count_trainable_counts_tied_weights_once():
    model = tiny_gpt()
    assert count_trainable(model) == model.num_params() == sum(p.numel() for p in set(model.parameters()))
