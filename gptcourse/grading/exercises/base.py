"""What an exercise is: its test cases and the Exercise record the judge reads, and
what several exercises share (random inputs, the ready-made PyTorch versions a
student may not call)."""
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

f64 = torch.float64

@dataclass
class Case:
    name: str
    make: Callable            # torch.Generator -> tuple of arguments
    points: int = 1
    fixed: bool = False       # the same inputs every time (a worked example): earns its
                              # points only if the function also passes a random case
    trivial: bool = False     # a fixed case that honest but wrong code often passes (T=1):
                              # passing it alone is no sign of hard-coded answers
    rtol: float = None        # tolerances of this case's comparison (None: by dtype, see
    atol: float = None        # grading.judge.compare), used for the reference and the mistakes alike


@dataclass
class Exercise:
    key: str                  # what the student passes to check()
    function: str             # the function's name in the notebook
    title: str
    notebook: str             # exercises/<notebook>.ipynb
    reference: Callable
    cases: list
    mistakes: list = field(default_factory=list)      # (name, wrong implementation, hint)
    forbidden_names: tuple = ()                       # dotted names the student may not call
    forbidden_ops: tuple = ()                         # parts of the names of torch functions and ATen
                                                      # operators whose execution earns zero

    @property
    def possible(self):
        return sum(c.points for c in self.cases)

    def forbidden(self):
        """{name: function} resolved now (so patched modules are seen)."""
        found = {}
        for dotted in self.forbidden_names:
            module, _, attr = dotted.rpartition(".")
            obj = {"torch": torch, "F": F, "torch.nn.functional": F}.get(module)
            if obj is None:
                try:
                    obj = importlib.import_module(module)
                except ImportError:                     # a class attribute: module.Class.method
                    mod, _, cls = module.rpartition(".")
                    obj = getattr(importlib.import_module(mod), cls)
            fn = getattr(obj, attr)
            found[dotted] = getattr(fn, "__func__", fn)
        return found


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ready-made attention in PyTorch: the torch functions and the ATen operators they run
# (under a dispatch mode F.scaled_dot_product_attention runs its math path, whose
# _safe_softmax no hand-written attention calls)
ATTENTION_OPS = ("scaled_dot_product", "_safe_softmax", "multi_head_attention", "_native_multi_head_attention",
                  "MultiheadAttention", "_transformer_encoder_layer_fwd")
NORM_OPS = ("layer_norm", "group_norm", "batch_norm", "instance_norm", "_native_batch_norm_legit",
             "LayerNorm", "GroupNorm", "BatchNorm", "InstanceNorm")
ATTENTION_REFS = ("gptcourse.attention.scaled_dot_product_attention",
                   "torch.nn.functional.scaled_dot_product_attention",
                   "gptcourse.grading.exercises.sdpa_ref",
                   "gptcourse.attention.MultiHeadAttention.forward")
