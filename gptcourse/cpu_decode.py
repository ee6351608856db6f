"""One decoding step of a Llama, one token, on the CPU, at the speed of memory.

A decoding step reads every weight once to produce one token: SmolLM2-135M's
538 MB of float32 weights, for two arithmetic operations per weight. Its
speed is the speed at which the matrix-vector products stream the weights
from memory, plus whatever the step pays per operation. In PyTorch that is a
lot: about 600 small operations a token (30 layers of norms, rotations,
attention, activations), each a few microseconds of dispatch, a quarter of
the step. This module is the same step written against numpy, what
llama.cpp does in C: each small operation costs a microsecond or two, and
the products go to OpenBLAS's sgemv, which streams a weight faster than
oneMKL's on SmolLM2's shapes (benchmarks/bench_llama.py measures both).

    weights = usable_weights(model, idx, caches)         # None: PyTorch's forward instead
    logits = token_logits(model, token_id, caches, weights)     # (V,) float32 tensor

It computes what `Llama.forward(idx (1, 1), caches=caches)` computes, to
float32 rounding (tests/test_cpu_decode.py compares the two, and the tokens
of greedy decoding), reads the weights where the model keeps them (no copy),
and appends the token's keys and values to the same KVCaches. Llama.forward
takes this path by itself when usable_weights finds it can: one float32
token on the CPU, a KV cache, no gradient, and the model as built (every
module of its own class: no LoRA, no hooks). Anything else (a GPU, a batch,
a prompt, training) runs PyTorch's forward. With several threads, OpenBLAS
uses its own (OPENBLAS_NUM_THREADS, by default one per core) while torch's
wait: the step calls no parallel torch operation.
"""
import weakref

import numpy as np
import torch

from .attention import KVCache


def usable_weights(model, idx, caches):
    """The weights token_logits reads (numpy views, see _weights) when model(idx,
    caches=caches) can take the numpy step (see the module's docstring), else None."""
    weight = model.wte.weight
    if (caches is not None and tuple(idx.shape) == (1, 1) and idx.device.type == "cpu"
            and not torch.is_grad_enabled() and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and len(caches) == len(model.blocks) and _one_sequence(caches)):
        return _weights(model)
    return None


def usable(model, idx, caches):
    """Whether model(idx, caches=caches) can take the numpy step."""
    return usable_weights(model, idx, caches) is not None


def _one_sequence(caches):
    """KVCaches (the class itself) of one sequence, all of the same length."""
    return all(type(c) is KVCache and len(c) == len(caches[0]) and (c._k is None or c._k.shape[0] == 1)
               for c in caches)


def _weights(model):
    """The model's weights as numpy arrays (views, no copy): per block those of rms_1,
    w_q, w_k, w_v, w_o, rms_2, gate, up and down; then rms_f's, lm_head's and wte's.
    None if a module is not of the class Llama built it with (a LoRA wrapper, a
    replaced layer) or has a hook. Kept beside the model (_VIEWS), and made again
    when a parameter's tensor is replaced or moved."""
    from .llama import Block, GroupedQueryAttention, Linear, Llama, RMSNorm, SwiGLU
    kinds = {"attn": GroupedQueryAttention, "mlp": SwiGLU, "rms_1": RMSNorm, "rms_2": RMSNorm,
             "w_q": Linear, "w_k": Linear, "w_v": Linear, "w_o": Linear, "gate": Linear, "up": Linear,
             "down": Linear, "wte": torch.nn.Embedding, "rms_f": RMSNorm, "lm_head": Linear}
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or type(model) is not Llama:
        return None
    params, todo = {}, [("", model)]
    for path, module in todo:                 # the module tree, without nn.Module.modules()' overhead
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        for name, child in module._modules.items():
            kind = kinds.get(name, torch.nn.ModuleList if module is model else Block)
            if type(child) is not kind:
                return None
            todo.append((f"{path}{name}.", child))
        if "weight" in module._parameters:
            params[path] = module._parameters["weight"]
    order = [f"blocks.{i}.{part}." for i in range(len(model.blocks))
             for part in ("rms_1", "attn.w_q", "attn.w_k", "attn.w_v", "attn.w_o", "rms_2",
                          "mlp.gate", "mlp.up", "mlp.down")] + ["rms_f.", "lm_head.", "wte."]
    tensors = [params[key] for key in order]
    key = [t.data_ptr() for t in tensors]
    cached = _VIEWS.get(model)
    if cached is None or cached[0] != key:
        arrays = [t.detach().numpy() for t in tensors]
        cached = (key, [arrays[i:i + 9] for i in range(0, len(arrays) - 3, 9)], arrays[-3:])
        _VIEWS[model] = cached
    return cached[1:]


# model -> (the weights' addresses, the numpy views): beside the model, not in it, so that
# copying or pickling a model never copies the views (each a second reference to 538 MB)
_VIEWS = weakref.WeakKeyDictionary()


def token_logits(model, token_id, caches, weights=None):
    """The logits (V,) after one more token: Llama.forward for idx = [[token_id]] with
    the KV caches `caches` (one per block, each holding (1, H_kv, T, d)), which it
    extends by the token's keys and values. weights: usable_weights' answer, when
    the caller has it (else the model's are looked up again)."""
    from .llama import rope_angles
    c = model.config
    H, H_kv, d = c.n_head, c.n_kv_head, c.head_size
    if not 0 <= token_id < c.vocab_size:
        raise IndexError(f"token id {token_id} is out of range [0, {c.vocab_size})")
    layers, (w_norm, w_head, w_embed) = weights if weights is not None else _weights(model)
    T = len(caches[0]) + 1                                                     # positions after this token
    angles = rope_angles(torch.tensor([T - 1]), d, c.rope_base)[0]             # (d/2,), as the torch path
    # rotary pairs (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin), as
    # x * cos2 + swap(x) * sin2 with cos2 = (cos, cos), sin2 = (-sin, sin) per pair
    cos2 = angles.cos().numpy().repeat(2)
    sin2 = np.stack([-angles.sin().numpy(), angles.sin().numpy()], axis=-1).reshape(d)
    rms = lambda x, w: x * (w * np.float32(1.0 / np.sqrt(float(x @ x) / x.shape[0] + c.rms_eps)))  # noqa: E731
    x = w_embed[token_id].copy()                                               # (C,)
    for (w_rms1, w_q, w_k, w_v, w_o, w_rms2, w_gate, w_up, w_down), cache in zip(layers, caches):
        h = rms(x, w_rms1)
        qk = np.concatenate([w_q @ h, w_k @ h]).reshape(H + H_kv, d)           # (heads, d)
        qk = qk * cos2 + qk.reshape(H + H_kv, d // 2, 2)[..., ::-1].reshape(H + H_kv, d) * sin2
        keys, values = _append(cache, qk[H:], w_v @ h, T)                      # (H_kv, T, d) each
        scores = qk[:H].reshape(H_kv, H // H_kv, d) @ keys.transpose(0, 2, 1)  # (H_kv, group, T)
        scores *= np.float32(1.0 / np.sqrt(d))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        x = x + w_o @ (scores @ values).reshape(H * d)
        h = rms(x, w_rms2)
        gate = w_gate @ h
        x = x + w_down @ (gate / (np.float32(1) + np.exp(-gate)) * (w_up @ h))  # silu(gate) * up
    return torch.from_numpy(w_head @ rms(x, w_norm))


def _append(cache, k, v, T):
    """Write position T - 1's keys and values (H_kv, d) into a KVCache of one sequence;
    returns numpy views (H_kv, T, d) of all its keys and values."""
    if cache._k is None or T > cache._k.shape[-2]:                  # full: the cache grows itself
        cache.update(torch.from_numpy(k[None, :, None]), torch.from_numpy(v.reshape(k.shape)[None, :, None]))
    keys, values = cache._k.detach().numpy()[0], cache._v.detach().numpy()[0]     # (H_kv, capacity, d)
    keys[:, T - 1], values[:, T - 1] = k, v.reshape(k.shape)
    cache.length = T
    return keys[:, :T], values[:, :T]
