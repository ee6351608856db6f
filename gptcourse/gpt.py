"""A GPT: a decoder-only Transformer language model (GPT-2 layout).

    ids (B, T) -> token embedding + learned position embedding (B, T, C)
               -> n_layer x Block:  x = x + attn(ln_1(x))   (causal self-attention)
                                    x = x + mlp(ln_2(x))    (C -> 4C -> C, GELU)
               -> ln_f -> x @ wte^T  -> logits (B, T, V)

Pre-norm (LayerNorm before each sublayer, as GPT-2 and GPT-3), and the
output layer shares its weight with the token embedding ("tied").
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, MultiHeadAttention
from .positional import LearnedPositionalEmbedding
from .sampling import decode, evaluating, model_step


def check_sizes(config, names):
    """Raise ValueError naming the first of config's fields `names` that is not a
    positive integer (GPTConfig's and gptcourse.llama.LlamaConfig's sizes)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 64        # context length: the most positions the model sees
    vocab_size: int = 103
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128           # d_model, C
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm (GPT-2: True)
    gelu: str = "exact"         # "exact": GELU with erf; "tanh": GPT-2's tanh approximation ("gelu_new")
    causal: bool = True         # False: every position sees every other (BERT, see gptcourse.bert)

    def __post_init__(self):
        check_sizes(self, ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.gelu == "none":                 # the name PyTorch's F.gelu gives the exact form
            object.__setattr__(self, "gelu", "exact")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"GPTConfig.gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name, **overrides):
        """A named preset, e.g. GPTConfig.from_name("gpt3-175b") or
        GPTConfig.from_name("course-char", vocab_size=103)."""
        if name not in PRESETS:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


_GPT2 = dict(block_size=1024, vocab_size=50257, gelu="tanh")
# GPT-3 paper (Brown et al. 2020), Table 2.1: n_layer, d_model, n_heads, d_head; context 2048.
# Two rows of that table do not multiply out (n_heads * d_head != d_model):
#   GPT-3 XL lists 24 heads of 128 for d_model 2048 -> we use 16 heads of 128;
#   GPT-3 13B lists d_model 5140 with 40 heads of 128 -> we use 5120 = 40 * 128.
_GPT3 = dict(block_size=2048, vocab_size=50257)
PRESETS = {
    "gpt2":        GPTConfig(n_layer=12, n_head=12, n_embd=768, **_GPT2),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, **_GPT2),
    "gpt2-large":  GPTConfig(n_layer=36, n_head=20, n_embd=1280, **_GPT2),
    "gpt2-xl":     GPTConfig(n_layer=48, n_head=25, n_embd=1600, **_GPT2),
    "gpt3-small":  GPTConfig(n_layer=12, n_head=12, n_embd=768, **_GPT3),
    "gpt3-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, **_GPT3),
    "gpt3-large":  GPTConfig(n_layer=24, n_head=16, n_embd=1536, **_GPT3),
    "gpt3-xl":     GPTConfig(n_layer=24, n_head=16, n_embd=2048, **_GPT3),
    "gpt3-2.7b":   GPTConfig(n_layer=32, n_head=32, n_embd=2560, **_GPT3),
    "gpt3-6.7b":   GPTConfig(n_layer=32, n_head=32, n_embd=4096, **_GPT3),
    "gpt3-13b":    GPTConfig(n_layer=40, n_head=40, n_embd=5120, **_GPT3),
    "gpt3-175b":   GPTConfig(n_layer=96, n_head=96, n_embd=12288, **_GPT3),
    # small course models that train on a laptop CPU
    "course-char": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=103),
    "course-tiny": GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=103),
}


def count_params(config):
    """Number of parameters of GPT(config), counted on paper (nothing allocated).

    Per block: 2 LayerNorms, W^Q W^K W^V W^O (4 C^2), MLP C->4C->C (8 C^2),
    so about 12 C^2 per layer; plus the token and position embeddings. The
    output layer is tied to the token embedding and adds nothing.
    """
    C, V, L, T = config.n_embd, config.vocab_size, config.n_layer, config.block_size
    b = 1 if config.bias else 0
    layer_norm = C + b * C
    attention = 4 * (C * C + b * C)
    mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)
    block = 2 * layer_norm + attention + mlp
    return V * C + T * C + L * block + layer_norm


class MLP(nn.Module):
    """Position-wise feed-forward: (B, T, C) -> (B, T, 4C) -> GELU -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"      # F.gelu's own names

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """One pre-norm Transformer decoder block. (B, T, C) -> (B, T, C)"""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.causal = config.causal

    def forward(self, x, cache=None):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), causal=self.causal, cache=cache))
        x = x + self.mlp(self.ln_2(x))
        return x


def check_forward_inputs(idx, targets, caches, block_size):
    """The checks a language model's forward pass makes on its inputs (GPT and
    gptcourse.llama.Llama): idx (B, T) token ids, targets None or idx's shape,
    the cached positions plus T within block_size. Returns (T, past)."""
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (B, T) tensor of token ids (torch.long), "
                         f"got shape {tuple(idx.shape)} and dtype {idx.dtype}")
    T = idx.shape[1]
    past = len(caches[0]) if caches is not None else 0
    if past + T > block_size:
        raise ValueError(f"context of {past + T} tokens is longer than block_size={block_size}")
    if targets is not None and targets.shape != idx.shape:
        raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, "
                         f"got {tuple(targets.shape)}")
    return T, past


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)                # token -> vector
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)  # position -> vector
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                                     # tied
        # GPT-2 initialisation: N(0, 0.02), and the projections that write into
        # the residual stream scaled down by 1/sqrt(2 * n_layer).
        self.apply(self._init_weights)
        for block in self.blocks:
            for proj in (block.attn.w_o, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, caches=None):
        """idx: (B, T) token ids; targets: (B, T) next tokens or None.

        caches: one KVCache per block (for generation); the new tokens are
        placed after the positions already cached.
        Returns (logits (B, T, V), loss or None); targets equal to -100 are
        ignored by the loss (as the masked-LM targets of gptcourse.bert are).
        """
        logits = self.lm_head(self.features(idx, caches, targets))                 # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def features(self, idx, caches=None, targets=None):
        """The last hidden states, after the final norm: (B, T, C), what lm_head
        turns into logits (a scorer that needs a few positions' logits applies
        lm_head to those only). Arguments and checks as forward's."""
        T, past = check_forward_inputs(idx, targets, caches, self.config.block_size)
        x = self.drop(self.wte(idx) + self.wpe(T, offset=past))                   # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i])
        return self.ln_f(x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        With use_cache=True each step feeds only the newest token and reuses the
        keys/values of earlier positions (KV cache). Once the sequence no longer
        fits in block_size, the positions shift, so it recomputes the last
        block_size tokens each step, exactly as use_cache=False always does.
        temperature=0 is greedy decoding. The steps are those of `stream`.
        """
        steps = self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
        with evaluating(self):
            return torch.cat([idx, *steps], dim=1)

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               use_cache=True, generator=None):
        """The decoding loop of `generate`, one step at a time: an iterator over
        the (B, 1) ids of each new token (for streaming, or stopping early).
        The model should be in eval mode (generate sets it). The loop is
        gptcourse.sampling.decode; model_step runs the model with its KV cache."""
        if not self.config.causal:
            raise ValueError("generate needs a causal model (GPTConfig(causal=True)); a bidirectional "
                             "model fills in blanks instead: see gptcourse.bert.fill_in")
        return decode(model_step(self, use_cache), idx, max_new_tokens, temperature, top_k, top_p, generator)


# ----------------------------------------------------------------------------
# GPT-2 weights in the Hugging Face layout
# ----------------------------------------------------------------------------

def from_hf_gpt2_state_dict(state_dict, config=None):
    """Build a GPT from the state dict of Hugging Face's GPT2LMHeadModel.

    That layout stores its Linear layers as Conv1D, weight (in, out), i.e. the
    transpose of nn.Linear's (out, in), and W^Q, W^K, W^V side by side in one
    c_attn of shape (C, 3C). config defaults to the GPT-2 size that matches
    the state dict's shapes.
    """
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    if config is None:
        V, C = sd["wte.weight"].shape
        L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
        matches = [c for c in PRESETS.values() if (c.n_layer, c.n_embd, c.vocab_size) == (L, C, V)
                   and c.block_size == sd["wpe.weight"].shape[0] and c.gelu == "tanh"]
        if not matches:
            raise ValueError(f"no GPT-2 preset has n_layer={L}, n_embd={C}, vocab_size={V}; pass a config")
        config = matches[0]
    model = GPT(config)
    C = config.n_embd
    ours = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
            "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            ours[b + ln + ".weight"], ours[b + ln + ".bias"] = sd[h + ln + ".weight"], sd[h + ln + ".bias"]
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]      # (3C, C)
        for j, name in enumerate(("w_q", "w_k", "w_v")):
            ours[b + f"attn.{name}.weight"] = w_qkv[j * C:(j + 1) * C]
            ours[b + f"attn.{name}.bias"] = b_qkv[j * C:(j + 1) * C]
        ours[b + "attn.w_o.weight"], ours[b + "attn.w_o.bias"] = sd[h + "attn.c_proj.weight"].t(), \
            sd[h + "attn.c_proj.bias"]
        ours[b + "mlp.fc.weight"], ours[b + "mlp.fc.bias"] = sd[h + "mlp.c_fc.weight"].t(), sd[h + "mlp.c_fc.bias"]
        ours[b + "mlp.proj.weight"], ours[b + "mlp.proj.bias"] = sd[h + "mlp.c_proj.weight"].t(), \
            sd[h + "mlp.c_proj.bias"]
    ours["lm_head.weight"] = ours["wte.weight"]                                         # tied
    expected = model.state_dict()
    for key, value in ours.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.contiguous() for k, v in ours.items()}, strict=True)
    return model


def load_pretrained_gpt2(name="gpt2"):
    """The real GPT-2 weights through Hugging Face `transformers` (needs the
    package and the internet, e.g. in Colab): returns our GPT with them."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("loading real GPT-2 weights needs `pip install transformers` "
                          "and an internet connection") from e
    return from_hf_gpt2_state_dict(GPT2LMHeadModel.from_pretrained(name).state_dict(),
                                   GPTConfig.from_name(name))
