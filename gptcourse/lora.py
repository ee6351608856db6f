"""Low-rank adaptation (LoRA, Hu et al. 2021): fine-tune a few matrices beside frozen weights.

A weight W (out, in) stays frozen; beside it, two small matrices learn the
change: B (out, r) @ A (r, in), of rank r, scaled by alpha / r:

    y = x W^T + b + (alpha / r) * (x A^T) B^T

B starts at zero, so the adapted layer starts as the base layer exactly, and
training moves it away from there. A (r, in) + B (out, r) is r (in + out)
numbers instead of in * out: r = 8 on a 576 x 576 matrix is 9,216 trainable
numbers instead of 331,776. After training, W + (alpha / r) B A is one
matrix again (merged): the adapted model costs nothing extra to run.

    add_lora(model, r)   freeze the model, wrap its w_q and w_v in LoRALinear
    count_trainable      how many numbers the optimiser still moves
    merge_lora(model)    fold each B A back into its weight
"""

import copy
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. (..., in) -> (..., out)

    LoRALinear(base, r, alpha=None): base is kept (as self.base) and frozen
    (requires_grad False); A (r, in_features) is initialised as nn.Linear
    initialises its weight (kaiming uniform, a=sqrt(5)), B (out_features, r)
    to zero; scale = alpha / r (alpha defaults to r: scale 1).

        forward(x) = base(x) + scale * (x @ A.T) @ B.T

    Works around any nn.Linear, with or without a bias (gptcourse.llama.Linear
    included). merged() returns the equivalent single linear layer.
    """

    def __init__(self, base, r, alpha=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r (the rank) must be a positive integer, got {r!r}")
        alpha = r if alpha is None else alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        weight = base.weight
        self.A = nn.Parameter(torch.empty(r, base.in_features, dtype=weight.dtype, device=weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))       # as nn.Linear.reset_parameters

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A.T) @ self.B.T)

    def delta_weight(self):
        """scale * B @ A: (out_features, in_features), what the adapter adds to W."""
        return self.scale * (self.B @ self.A)

    @torch.no_grad()
    def merged(self):
        """The adapted layer as one linear layer: weight W + scale * B @ A, base's bias.

        A copy of base (so the same class: an nn.Linear, or a
        gptcourse.llama.Linear) with its weight replaced; frozen like base.
        Its output equals this module's to rounding.
        """
        layer = copy.deepcopy(self.base)
        layer.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
        return layer

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def _set_submodule(model, path, module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def add_lora(model, r, alpha=None, names=("w_q", "w_v"), layers=None):
    """Freeze the whole model and put a LoRALinear around chosen linear layers.

    In each block model.blocks[i], i in `layers` (default: every block), every
    nn.Linear submodule whose attribute name is in `names` (default the
    attention's query and value projections, as in the LoRA paper; w_k, w_o,
    or the MLP's fc/proj, gate/up/down can be named too) is replaced by
    LoRALinear(it, r, alpha). Every other parameter of the model is frozen.
    Works on gptcourse.gpt.GPT and gptcourse.llama.Llama (anything with
    .blocks). Returns the replaced modules' paths, e.g. "blocks.0.attn.w_q".
    """
    if not hasattr(model, "blocks"):
        raise ValueError(f"model must have .blocks (a GPT or a Llama), got {type(model).__name__}")
    if isinstance(names, str):
        names = (names,)
    n_blocks = len(model.blocks)
    layers = range(n_blocks) if layers is None else list(layers)
    for i in layers:
        if not isinstance(i, int) or not -n_blocks <= i < n_blocks:
            raise ValueError(f"layers must be block indices in [0, {n_blocks}), got {i!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen, linear_names = [], set()
    for i in sorted({i % n_blocks for i in layers}):
        for path, module in model.blocks[i].named_modules():
            name = path.rpartition(".")[2]
            if isinstance(module, nn.Linear):
                linear_names.add(name)
                if name in names:
                    chosen.append((f"blocks.{i}.{path}", module))
    if not chosen:
        raise ValueError(f"no nn.Linear named {tuple(names)} in the chosen blocks; "
                         f"their linear layers are named {sorted(linear_names)}")
    for path, module in chosen:
        _set_submodule(model, path, LoRALinear(module, r, alpha))
    return [path for path, _ in chosen]


def merge_lora(model):
    """Replace every LoRALinear in model by its merged() linear layer, in place.

    The model then has its original structure back (and runs as fast), with
    W + scale * B @ A in each adapted weight. Returns the merged modules' paths.
    """
    paths = [path for path, module in model.named_modules() if isinstance(module, LoRALinear)]
    for path in paths:
        _set_submodule(model, path, model.get_submodule(path).merged())
    return paths


def count_trainable(model):
    """The number of parameters (numbers, not tensors) the optimiser will update:
    those with requires_grad, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
