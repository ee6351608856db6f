"""GPT: parameter counts against published figures, the forward pass against
PyTorch's own TransformerEncoderLayer, and KV-cached generation against
recomputing everything."""
import math
import re
import time
import tracemalloc
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from gptcourse.attention import causal_mask
from gptcourse.gpt import PRESETS, GPT, Block, GPTConfig, count_params


def small(**kw):
    cfg = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPTConfig(**cfg)


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("cfg", [
    small(),
    small(bias=False),
    small(n_layer=1, vocab_size=5, block_size=3),
    small(n_layer=3, n_head=4, n_embd=32, vocab_size=103, block_size=64),
    small(n_layer=3, n_head=3, n_embd=24, bias=False, vocab_size=256, block_size=7),
    GPTConfig.from_name("course-tiny"),
    GPTConfig.from_name("course-char"),
], ids=str)
def test_count_params_matches_the_module(cfg):
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())  # the tied weight counts once
    assert count_params(cfg) == n == model.num_params()


@pytest.mark.parametrize("name,published", [
    # Hugging Face's GPT-2 checkpoints, tied embeddings
    ("gpt2", 124_439_808),
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_count_params_gpt2_published(name, published):
    assert count_params(GPTConfig.from_name(name)) == published


def test_gpt2_built_on_meta_device_matches():
    cfg = GPTConfig.from_name("gpt2")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.wte.weight.is_meta
    assert model.lm_head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg) == 124_439_808


# GPT-3 paper (Brown et al. 2020), Table 2.1, n_params as printed
GPT3_NOMINAL = {
    "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13.0e9, "gpt3-175b": 175.0e9,
}


@pytest.mark.parametrize("name", GPT3_NOMINAL)
def test_count_params_gpt3_table(name):
    # measured ratios: 1.0018, 1.0168, 1.0004, 1.0121, 0.9821, 0.9938, 0.9887, 0.9977
    ratio = count_params(GPTConfig.from_name(name)) / GPT3_NOMINAL[name]
    assert abs(ratio - 1) < 0.02, ratio


def test_gpt3_presets_match_table():
    # (n_layer, d_model, n_heads) from Table 2.1, with the two documented fixes
    table = {"gpt3-small": (12, 768, 12), "gpt3-medium": (24, 1024, 16), "gpt3-large": (24, 1536, 16),
             "gpt3-xl": (24, 2048, 16), "gpt3-2.7b": (32, 2560, 32), "gpt3-6.7b": (32, 4096, 32),
             "gpt3-13b": (40, 5120, 40), "gpt3-175b": (96, 12288, 96)}
    d_head = {"gpt3-small": 64, "gpt3-medium": 64, "gpt3-large": 96, "gpt3-xl": 128, "gpt3-2.7b": 80,
              "gpt3-6.7b": 128, "gpt3-13b": 128, "gpt3-175b": 128}
    for name, (L, C, H) in table.items():
        cfg = GPTConfig.from_name(name)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size) == (L, C, H, 2048)
        assert cfg.head_size == d_head[name]


def test_count_params_gpt3_175b_allocates_nothing(monkeypatch):
    cfg = GPTConfig.from_name("gpt3-175b")

    def no_modules(*args, **kwargs):
        raise AssertionError("count_params must not build modules")
    monkeypatch.setattr(nn.Module, "__init__", no_modules)  # building GPT(cfg) would need 700 GB
    tracemalloc.start()
    try:
        start = time.perf_counter()
        n = count_params(cfg)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(n, int) and n == 174_604_259_328
    assert peak < 1_000_000
    assert elapsed < 0.1


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gpt")])
def test_blocks_are_about_12_L_C_squared(name):
    cfg = GPTConfig.from_name(name)
    per_block = count_params(replace(cfg, n_layer=2)) - count_params(replace(cfg, n_layer=1))
    approx = 12 * cfg.n_embd ** 2
    # exactly 12 C^2 + 9 C (biases: 4 C attention, 4 C + C MLP) + 4 C (two LayerNorms)
    assert per_block == approx + 13 * cfg.n_embd
    assert abs(cfg.n_layer * per_block / (cfg.n_layer * approx) - 1) < 0.01


def test_blocks_of_a_real_model_are_about_12_L_C_squared():
    cfg = small(n_layer=3, n_head=4, n_embd=256, vocab_size=11)
    model = GPT(cfg)
    in_blocks = sum(p.numel() for p in model.blocks.parameters())
    assert in_blocks == 3 * (12 * 256 ** 2 + 13 * 256)
    assert abs(in_blocks / (12 * 3 * 256 ** 2) - 1) < 0.01


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "GPTConfig.block_size must be a positive integer, got 0"),
    (dict(vocab_size=2.5), "GPTConfig.vocab_size must be a positive integer, got 2.5"),
    (dict(n_layer=-1), "GPTConfig.n_layer must be a positive integer, got -1"),
    (dict(n_head=0), "GPTConfig.n_head must be a positive integer"),
    (dict(n_embd=None), "GPTConfig.n_embd must be a positive integer, got None"),
    (dict(n_embd=30, n_head=4), "n_embd=30 must be divisible by n_head=4"),
    (dict(dropout=1.0), re.escape("dropout must be in [0, 1), got 1.0")),
    (dict(dropout=-0.1), "dropout must be in"),
])
def test_config_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_from_name():
    cfg = GPTConfig.from_name("course-char", vocab_size=65)
    assert cfg.vocab_size == 65 and cfg.n_layer == 4 and cfg.block_size == 64
    assert PRESETS["course-char"].vocab_size == 103  # the preset itself is unchanged
    with pytest.raises(ValueError, match=r"unknown config 'gpt4'; known: gpt2, gpt2-medium"):
        GPTConfig.from_name("gpt4")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig.from_name("gpt2", n_head=7)


# ---------------------------------------------------------------- forward


def test_forward_shapes_loss_at_init_and_tied_weights():
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("course-tiny")
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(cfg.vocab_size, (4, 32))
    targets = torch.randint(cfg.vocab_size, (4, 32))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, cfg.vocab_size)
    # small init -> nearly uniform prediction -> cross-entropy ln V
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.1)
    # the loss is the mean negative log-probability of the targets
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, nll)
    logits2, none = model(idx)
    assert none is None and torch.equal(logits2, logits)
    # tied: one gradient reaches the shared matrix from both uses
    loss.backward()
    assert model.lm_head.weight.grad is model.wte.weight.grad


def test_block_matches_pytorch_encoder_layer():
    # a pre-norm block with causal self-attention and a GELU MLP is PyTorch's
    # TransformerEncoderLayer(norm_first=True, activation="gelu") with a causal mask
    torch.manual_seed(0)
    cfg = small(n_embd=24, n_head=3)
    block = Block(cfg).double()
    ref = nn.TransformerEncoderLayer(24, 3, dim_feedforward=96, dropout=0.0, activation="gelu",
                                     batch_first=True, norm_first=True).double()
    with torch.no_grad():
        a = block.attn
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.w_q.weight, a.w_k.weight, a.w_v.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.w_q.bias, a.w_k.bias, a.w_v.bias]))
        ref.self_attn.out_proj.weight.copy_(a.w_o.weight)
        ref.self_attn.out_proj.bias.copy_(a.w_o.bias)
        for ours, theirs in ((block.mlp.fc, ref.linear1), (block.mlp.proj, ref.linear2),
                             (block.ln_1, ref.norm1), (block.ln_2, ref.norm2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
            theirs.bias.normal_()  # nonzero biases so they are compared too
            ours.bias.copy_(theirs.bias)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    expected = ref(x, src_mask=~causal_mask(9))  # True = NOT allowed
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)


def test_gpt_forward_matches_composition_of_pytorch_layers():
    torch.manual_seed(0)
    cfg = small(n_layer=2, n_embd=16, n_head=4, bias=False)
    model = GPT(cfg).double()
    refs = []
    for block in model.blocks:
        ref = nn.TransformerEncoderLayer(16, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True, bias=False).double()
        with torch.no_grad():
            a = block.attn
            ref.self_attn.in_proj_weight.copy_(torch.cat([a.w_q.weight, a.w_k.weight, a.w_v.weight]))
            ref.self_attn.out_proj.weight.copy_(a.w_o.weight)
            ref.linear1.weight.copy_(block.mlp.fc.weight)
            ref.linear2.weight.copy_(block.mlp.proj.weight)
            ref.norm1.weight.copy_(block.ln_1.weight)
            ref.norm2.weight.copy_(block.ln_2.weight)
        refs.append(ref)
    idx = torch.randint(cfg.vocab_size, (3, 11))
    with torch.no_grad():
        x = model.wte.weight[idx] + model.wpe.weight[:11]
        for ref in refs:
            x = ref(x, src_mask=~causal_mask(11))
        x = nn.functional.layer_norm(x, (16,), model.ln_f.weight)
        expected = x @ model.wte.weight.T
        logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)


def test_forward_bad_inputs():
    model = GPT(small(block_size=16))
    with pytest.raises(ValueError, match=r"context of 17 tokens is longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"torch\.long.*\(2, 3\).*torch\.int32"):
        model(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=re.escape("got shape (5,)")):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("targets must have the shape of idx (2, 3), got (2, 4)")):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_forward_with_caches_beyond_block_size_raises():
    from gptcourse.attention import KVCache
    model = GPT(small(block_size=8))
    caches = [KVCache() for _ in model.blocks]
    model(torch.zeros(1, 6, dtype=torch.long), caches=caches)
    with pytest.raises(ValueError, match="context of 9 tokens is longer than block_size=8"):
        model(torch.zeros(1, 3, dtype=torch.long), caches=caches)


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def gen_model():
    torch.manual_seed(0)
    model = GPT(small(block_size=16, vocab_size=23, n_embd=32, n_head=4)).double()
    with torch.no_grad():  # far from the 0.02 init, so greedy tokens vary and sampling is not flat
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.5)
        model.wte.weight.normal_(std=0.3)
    return model


def record_positions(model):
    """Record how many token positions each forward call feeds (idx.shape[1])."""
    fed = []
    handle = model.wte.register_forward_hook(lambda mod, inp, out: fed.append(inp[0].shape[1]))
    return fed, handle


@pytest.mark.parametrize("prompt_len,new", [(5, 30), (1, 10), (16, 4), (20, 3)])
def test_greedy_cached_equals_uncached(gen_model, prompt_len, new):
    idx = torch.randint(23, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    cached = gen_model.generate(idx, new, temperature=0, use_cache=True)
    plain = gen_model.generate(idx, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, plain)


def test_greedy_is_argmax_of_the_full_forward(gen_model):
    idx = torch.randint(23, (2, 3), generator=torch.Generator().manual_seed(2))
    out = gen_model.generate(idx, 20, temperature=0)
    assert len(set(out[:, 3:].flatten().tolist())) > 3  # not one repeated token
    for t in range(3, 23):
        logits, _ = gen_model(out[:, max(0, t - 16):t])
        assert torch.equal(out[:, t], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.3, top_p=0.9)])
def test_sampling_cached_equals_uncached(gen_model, kwargs):
    idx = torch.randint(23, (3, 4), generator=torch.Generator().manual_seed(3))
    runs = [gen_model.generate(idx, 25, use_cache=c, generator=torch.Generator().manual_seed(7), **kwargs)
            for c in (True, False, True)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = gen_model.generate(idx, 25, generator=torch.Generator().manual_seed(8), **kwargs)
    assert not torch.equal(other, runs[0])


def test_cached_generation_feeds_one_token_per_step(gen_model):
    idx = torch.zeros(1, 5, dtype=torch.long)
    fed, handle = record_positions(gen_model)
    try:
        gen_model.generate(idx, 30, temperature=0, use_cache=True)
        cached = list(fed)
        fed.clear()
        gen_model.generate(idx, 30, temperature=0, use_cache=False)
        plain = list(fed)
    finally:
        handle.remove()
    # lengths 5..34 before each step; block_size 16
    assert cached == [5] + [1] * 11 + [16] * 18      # prompt, one token each, then a sliding window
    assert plain == [min(L, 16) for L in range(5, 35)]
    assert sum(cached[:12]) == 16 and sum(plain[:12]) == sum(range(5, 17))


def test_generate_restores_mode_and_checks_args(gen_model):
    gen_model.train()
    gen_model.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert gen_model.training
    gen_model.eval()
    gen_model.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert not gen_model.training
    assert torch.equal(gen_model.generate(torch.ones(2, 3, dtype=torch.long), 0), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("T >= 1, got (1, 0)")):
        gen_model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer, got -1"):
        gen_model.generate(torch.zeros(1, 2, dtype=torch.long), -1)


# --- GPT-2 weights in the Hugging Face layout ---------------------------------

def hf_layout_state_dict(L=2, C=16, V=50, T=32, seed=0):
    """A state dict with the key names and shapes of transformers' GPT2LMHeadModel
    (Conv1D weights stored (in, out); the causal-mask buffers old checkpoints carry)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2
    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
                   p + "attn.bias": torch.ones(1, 1, T, T).tril(), p + "attn.masked_bias": torch.tensor(-1e4),
                   p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C)})
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + r(C), r(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def hf_gpt2_forward(sd, idx, n_head):
    """GPT-2's forward pass written straight from the Hugging Face layout: an
    independent reference (Conv1D is x @ W + b; GELU is the tanh form)."""
    w = lambda k: sd["transformer." + k]
    L = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    T = idx.shape[1]
    C = w("wte.weight").shape[1]

    def ln(x, name):
        m, v = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - m) / torch.sqrt(v + 1e-5) * w(name + ".weight") + w(name + ".bias")

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = w("wte.weight")[idx] + w("wpe.weight")[:T]
    for i in range(L):
        h = ln(x, f"h.{i}.ln_1")
        q, k, v = (h @ w(f"h.{i}.attn.c_attn.weight") + w(f"h.{i}.attn.c_attn.bias")).split(C, dim=-1)
        split = lambda t: t.view(*t.shape[:2], n_head, C // n_head).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // n_head)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*x.shape)
        x = x + a @ w(f"h.{i}.attn.c_proj.weight") + w(f"h.{i}.attn.c_proj.bias")
        h = ln(x, f"h.{i}.ln_2")
        x = x + gelu_new(h @ w(f"h.{i}.mlp.c_fc.weight") + w(f"h.{i}.mlp.c_fc.bias")) \
            @ w(f"h.{i}.mlp.c_proj.weight") + w(f"h.{i}.mlp.c_proj.bias")
    return ln(x, "ln_f") @ w("wte.weight").T


def test_gpt2_converter_matches_an_independent_forward_pass():
    from gptcourse.gpt import from_hf_gpt2_state_dict
    sd = hf_layout_state_dict()
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=32, gelu="tanh")
    torch.set_default_dtype(torch.float64)
    try:
        model = from_hf_gpt2_state_dict(sd, config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    idx = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, hf_gpt2_forward(sd, idx, n_head=2))
    assert model.lm_head.weight is model.wte.weight
    # and the KV-cache generation of the converted model equals recomputation
    prompt = idx[:1, :4]
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=True),
                       model.generate(prompt, 20, temperature=0, use_cache=False))


def test_gpt2_converter_shapes_of_the_real_checkpoint():
    """The 124M checkpoint's layout, on the meta device: the preset is found
    from the shapes and every tensor fits (nothing downloaded)."""
    from gptcourse.gpt import from_hf_gpt2_state_dict
    C, V, T, L = 768, 50257, 1024, 12
    with torch.device("meta"):
        sd = {"transformer.wte.weight": torch.empty(V, C), "transformer.wpe.weight": torch.empty(T, C),
              "transformer.ln_f.weight": torch.empty(C), "transformer.ln_f.bias": torch.empty(C)}
        for i in range(L):
            p = f"transformer.h.{i}."
            for name, shape in [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (C, 3 * C)),
                                ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)),
                                ("attn.c_proj.bias", (C,)), ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                                ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
                                ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))]:
                sd[p + name] = torch.empty(*shape)
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
        model = from_hf_gpt2_state_dict(sd)
    assert model.config == GPTConfig.from_name("gpt2")
    assert model.num_params() == 124_439_808
    bad = dict(sd)
    bad["transformer.h.0.mlp.c_fc.weight"] = torch.empty(C, 4 * C + 1, device="meta")
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc.weight: shape \(3073, 768\)"):
        from_hf_gpt2_state_dict(bad, GPTConfig.from_name("gpt2"))
