"""Training throughput and model FLOPs utilisation (MFU) of GPT-2 124M on a GPU.

    python benchmarks/bench_gpu.py                      # batch sized to the GPU, torch.compile
    python benchmarks/bench_gpu.py --no-compile --batch-size 8
    python benchmarks/bench_gpu.py --smoke [--peak 1e12] # a tiny model on the CPU: the code path

The step is gptcourse.train's own (`training_step`: bf16 autocast, fp16 with
a grad scaler on GPUs without bf16, fused AdamW, gradient clipping) on
GPTConfig.from_name("gpt2") at context 1024, the vocabulary padded from 50257
to 50304 = 393 x 128 (tensor-core-friendly, as nanoGPT; --no-pad-vocab keeps
50257). Batches: random token windows through get_batch (pinned memory,
non-blocking copies); the speed does not depend on what the tokens are.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu):

    6 N + 12 L T d

N: the parameters that multiply activations: all but the position embedding
(the token embedding counts: it is also the output layer). 6N = 2N forward
+ 4N backward. 12 L T d: per layer the scores QK^T and the sum AV, 2 T d
multiply-adds each per token forward, times 3 with the backward, counted for
the whole T x T square (what causal masking skips is not subtracted).
MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak (table below).
"""
import argparse
import json
import sys
import time

import torch

from gptcourse.data import get_batch
from gptcourse.gpt import GPT, GPTConfig, count_params
from gptcourse.train import autocast_for, compiled, learning_rate, make_optimizer, training_step

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from NVIDIA's data sheets;
# fp16 for GPUs without bf16. First match in the device name wins.
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),            # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),            # fp16 (no bf16)
    ("T4", 65e12),               # fp16 (no bf16), Colab's free GPU
]


def peak_flops(device_name):
    """The dense bf16 (fp16 where no bf16) peak of a GPU by its name, or None.

    >>> peak_flops("NVIDIA H100 80GB HBM3") / 1e12, peak_flops("Tesla T4") / 1e12
    (989.0, 65.0)
    """
    for key, peak in PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


def flops_per_token(config):
    """6 N + 12 L T d for GPT(config) (see the module docstring), on paper.

    >>> flops_per_token(GPTConfig.from_name("gpt2"))     # N = 124,439,808 - 1024 x 768
    855166464
    """
    n = count_params(config) - config.block_size * config.n_embd   # tied lm_head counted once
    return 6 * n + 12 * config.n_layer * config.block_size * config.n_embd


def default_batch_size(device):
    """Micro-batch of 1024-token windows that fits the GPU's memory."""
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 32 if gib >= 70 else 16 if gib >= 35 else 8 if gib >= 20 else 4


def bench(config, batch_size, device, warmup, steps, compile):
    """Time `steps` training steps after `warmup` ones; returns (seconds per step, model)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.train()
    optimizer = make_optimizer(model, 6e-4, device=device)
    ctx, use_scaler = autocast_for(device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    net = compiled(model, compile)
    data = torch.randint(config.vocab_size, (2**22,), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    total = warmup + steps

    def step(i):
        batch = get_batch(data, config.block_size, batch_size, generator=gen, device=device)
        lr = learning_rate(i, total, 6e-4, warmup_steps=min(10, total), min_lr=6e-5)
        return training_step(net, optimizer, batch, lr, ctx=ctx, scaler=scaler, grad_clip=1.0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(1, warmup + 1):            # compiles on the first call
        first = step(i).item()
    sync()
    start = time.perf_counter()
    for i in range(warmup + 1, total + 1):
        loss = step(i)
    last = loss.item()                         # waits for the last step
    sync()
    seconds = (time.perf_counter() - start) / steps
    return seconds, model, first, last


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=None, help="default: sized to the GPU's memory")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-pad-vocab", action="store_true", help="vocabulary 50257, not 50304")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s (default: by GPU name)")
    p.add_argument("--min-mfu", type=float, default=None, help="exit 1 if MFU is below this (0..1)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the code")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        config = GPTConfig.from_name("course-tiny")
        batch_size, compile, name = args.batch_size or 4, False, "cpu (smoke run)"
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; this benchmark needs one "
              "(python benchmarks/bench_gpu.py --smoke runs a tiny model on the CPU)")
        return 0
    else:
        device = torch.device("cuda")
        torch.set_float32_matmul_precision("high")   # TF32 for the few fp32 matmuls left
        config = GPTConfig.from_name("gpt2", **({} if args.no_pad_vocab else {"vocab_size": 50304}))
        batch_size, compile = args.batch_size or default_batch_size(device), not args.no_compile
        name = torch.cuda.get_device_name(device)
    peak = args.peak or (None if args.smoke else peak_flops(name))

    precision = {"cuda": "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else "fp16 + grad scaler"}.get(device.type, "fp32")
    print(f"{name}, torch {torch.__version__}; {config.n_layer} layers, d={config.n_embd}, "
          f"context {config.block_size}, vocab {config.vocab_size}, micro-batch {batch_size}, "
          f"{precision}, compile={compile}", flush=True)
    while True:
        try:
            seconds, model, first, last = bench(config, batch_size, device, args.warmup, args.steps, compile)
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            print(f"out of memory: retrying with micro-batch {batch_size}", flush=True)
    tokens_per_s = batch_size * config.block_size / seconds
    fpt = flops_per_token(config)
    result = {"device": name, "params": model.num_params(), "batch_size": batch_size,
              "context": config.block_size, "compile": compile, "precision": precision,
              "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens_per_s,
              "flops_per_token": fpt, "achieved_flops": tokens_per_s * fpt, "peak_flops": peak,
              "mfu": tokens_per_s * fpt / peak if peak else None,
              "loss_first": first, "loss_last": last}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{model.num_params():,} parameters, {fpt:,} FLOPs per token "
          f"(6N + 12LTd); loss {first:.3f} at warm-up step 1 -> {last:.3f} (random tokens)")
    print(f"{1e3 * seconds:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, "
          f"{tokens_per_s * fpt / 1e12:.1f} TFLOP/s achieved")
    if peak:
        print(f"MFU {100 * result['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s peak")
    else:
        print(f"MFU: no peak known for {name!r}; pass --peak FLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.min_mfu is not None and (result["mfu"] is None or result["mfu"] < args.min_mfu):
        print(f"MFU below the target {100 * args.min_mfu:.0f}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
