"""Speed of the library's core, measured side by side in one run (ratios, not
absolute times: single timings drift 10-20% on a shared machine).

    make bench                # or: python benchmarks/bench_core.py [--device cuda]

1. Training step of gptcourse.train at the reference configuration of
   ../shared/TOOLCHAIN.md (4 layers, 4 heads, d=128, context 64, batch 12,
   char-level pydoc corpus), next to that reference point (35 ms/step there).
2. KV-cache generation vs recomputing the whole context at every step,
   256 new tokens with context 256 (the same greedy tokens are checked first).
3. Fused attention (F.scaled_dot_product_attention) vs the explicit
   softmax(QK^T / sqrt(d)) V, causal, forward + backward.
"""
import argparse
import statistics
import time

import torch

from gptcourse import attention
from gptcourse.data import load_corpus, train_val_split
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.tokenizers import CharTokenizer
from gptcourse.train import lm_batches, pick_device, train


def timed(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_setup(device):
    """The reference configuration: a fresh char-level GPT and its pydoc batches."""
    text = load_corpus("pydoc")
    tok = CharTokenizer(text)
    train_data, val_data = train_val_split(torch.tensor(tok.encode(text)))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("course-char", vocab_size=tok.vocab_size))
    batches = lm_batches(train_data, val_data, block_size=64, batch_size=12, seed=0, device=device)
    return model, batches


def bench_train_step(device, steps=100):
    model, batches = reference_setup(device)
    train(model, batches, steps=10, eval_batches=1, device=device, progress=False)      # warm-up
    start = time.perf_counter()
    train(model, batches, steps=steps, eval_every=steps, eval_batches=1, device=device, progress=False)
    ms = 1000 * (time.perf_counter() - start) / steps
    print(f"training step, 4 layers, d=128, context 64, batch 12: {ms:.1f} ms/step "
          f"(reference point in TOOLCHAIN.md: 35 ms/step on this machine kind)")


def bench_full_run(device, steps=2000):
    """The whole reference run: val loss at 500/1000/1500/2000 steps next to the
    reference point's 2.04 / 1.70 / 1.56 / 1.46 (warm-up 100, cosine to 1e-4)."""
    model, batches = reference_setup(device)
    start = time.perf_counter()
    h = train(model, batches, steps=steps, lr=1e-3, warmup_steps=100, min_lr=1e-4, eval_every=500,
              eval_batches=20, device=device, seed=0, progress=False)
    seconds = time.perf_counter() - start
    print(f"full run, {steps} steps in {seconds:.0f} s: val loss "
          + ", ".join(f"{v:.2f} @ {s}" for s, v in zip(h.eval_steps, h.val_loss))
          + "  (reference: 2.04 @ 500, 1.70 @ 1000, 1.56 @ 1500, 1.46 @ 2000)")


def bench_generation(device, new_tokens=256, repeats=3):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=103)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 1), device=device)
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    full = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, full), "KV-cache generation differs from recomputation"
    t_cache = timed(lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=True), device, repeats)
    t_full = timed(lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=False), device, repeats)
    print(f"generation, {config.n_layer} layers, d={config.n_embd}, context {config.block_size}, "
          f"{new_tokens} new tokens, batch 1 (same tokens: True)")
    print(f"  recompute : {new_tokens / t_full:8.0f} tokens/s")
    print(f"  KV cache  : {new_tokens / t_cache:8.0f} tokens/s   speed-up x{t_full / t_cache:.2f}")


def bench_attention(device, repeats=20):
    print("causal attention fwd+bwd, B=12, H=4, head 32: fused vs explicit")
    for T in (64, 128, 256):
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(12, 4, T, 32, generator=g).to(device).requires_grad_() for _ in range(3))
        mask = attention.causal_mask(T, device=device)

        def explicit():
            out, _ = attention.scaled_dot_product_attention(q, k, v, mask)
            out.sum().backward()

        def fused():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()

        t_explicit, t_fused = timed(explicit, device, repeats), timed(fused, device, repeats)
        print(f"  T={T:4d}: explicit {t_explicit * 1e3:7.2f} ms, fused {t_fused * 1e3:7.2f} ms, "
              f"fused is x{t_explicit / t_fused:.2f} faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--full", action="store_true", help="also train the whole 2000-step reference run")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_train_step(device)
    if args.full:
        bench_full_run(device)
    bench_generation(device)
    bench_attention(device)
