"""Speed of the library's core, measured side by side in one run (ratios, not
absolute times: single timings drift 10-20% on a shared machine, so the two
sides of each comparison are timed in alternation and compared by median).

    python benchmarks/bench_core.py [--device cuda] [--full]
    make bench                          # this, the book build and the test times

1. Training step of the library's trainer (gptcourse.train.training_step,
   AdamW, gradient clipping) at the reference configuration of
   ../shared/TOOLCHAIN.md (4 layers, 4 heads, d=128, context 64, batch 12,
   char-level pydoc corpus), with the model's fused attention vs the same
   model, same weights and batches, with explicit softmax(QK^T/sqrt(d))V
   attention (MultiHeadAttention(fast=False)). Reference point: 35 ms/step.
2. Fused attention (F.scaled_dot_product_attention) vs the explicit one,
   causal, forward + backward, at T = 64, 256, 1024.
3. KV-cache generation vs recomputing the whole context at every step,
   256 new tokens with context 256, read two ways: a 256-token window filled
   from a 1-token prompt, and 256 tokens generated after a 256-token prompt
   (the same greedy tokens are checked first).
4. With --full: the whole 2000-step reference run, val loss next to the
   reference point.

`run(device)` returns the results as rows for a summary table
(benchmarks/bench_all.py prints them with the others).
"""
import argparse
import copy
import statistics
import time

import torch

from gptcourse import attention
from gptcourse.data import load_corpus, train_val_split
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.tokenizers import CharTokenizer
from gptcourse.train import lm_batches, make_optimizer, pick_device, train, training_step

REFERENCE_MS_PER_STEP = 35.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(fns, device, repeats, warmup=1):
    """Median wall time of each of `fns` (a dict name -> fn), the functions
    called in turn (a, b, a, b, ...) so that drift hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def row(measure, a_name, a, b_name, b, unit="ms", goal=""):
    """A summary row: b/a is the ratio (how many times faster a is than b)."""
    return {"measure": measure, "a": f"{a_name} {a:.4g} {unit}", "b": f"{b_name} {b:.4g} {unit}",
            "ratio": b / a, "goal": goal}


def reference_setup(device):
    """The reference configuration: a fresh char-level GPT and its pydoc batches."""
    text = load_corpus("pydoc")
    tok = CharTokenizer(text)
    train_data, val_data = train_val_split(torch.tensor(tok.encode(text)))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("course-char", vocab_size=tok.vocab_size))
    batches = lm_batches(train_data, val_data, block_size=64, batch_size=12, seed=0, device=device)
    return model, batches, (train_data, val_data)


def set_fast_attention(model, fast):
    """Switch every MultiHeadAttention of `model` to the fused (True) or the
    explicit (False) path; returns how many were switched."""
    found = [m for m in model.modules() if isinstance(m, attention.MultiHeadAttention)]
    for m in found:
        m.fast = fast
    return len(found)


def bench_train_step(device, steps=60):
    """ms per training step with fused vs explicit attention: two copies of
    one model, each with its own AdamW and the same batch sequence, stepped
    in alternation."""
    model, _, (train_data, val_data) = reference_setup(device)
    model.to(device).train()
    sides = {}
    for name, fast in (("fused", True), ("explicit", False)):
        m = copy.deepcopy(model)
        n = set_fast_attention(m, fast)
        assert n == m.config.n_layer, f"expected {m.config.n_layer} attention layers, found {n}"
        batches = lm_batches(train_data, val_data, block_size=64, batch_size=12, seed=0, device=device)
        sides[name] = {"model": m, "opt": make_optimizer(m, 1e-3, device=device),
                       "batches": batches, "times": [], "losses": []}
    for step in range(steps + 5):                       # the first 5 are warm-up
        for side in sides.values():
            batch = side["batches"]("train")
            _sync(device)
            start = time.perf_counter()
            loss = training_step(side["model"], side["opt"], batch, 1e-3)
            side["losses"].append(loss.item())
            _sync(device)
            if step >= 5:
                side["times"].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(s["times"]) for name, s in sides.items()}
    diff = max(abs(a - b) for a, b in zip(sides["fused"]["losses"], sides["explicit"]["losses"]))
    print(f"training step (gptcourse.train.training_step), 4 layers, d=128, context 64, batch 12, "
          f"median of {steps}:")
    print(f"  fused attention    : {ms['fused']:7.1f} ms/step "
          f"(reference point in TOOLCHAIN.md: {REFERENCE_MS_PER_STEP:.0f} ms/step)")
    print(f"  explicit attention : {ms['explicit']:7.1f} ms/step   "
          f"fused is x{ms['explicit'] / ms['fused']:.2f} faster; "
          f"same losses over {steps + 5} steps: max |diff| {diff:.1e}")
    assert diff < 1e-3, f"fused and explicit training diverge: max loss difference {diff}"
    return [row("training step, fused vs explicit attention", "fused", ms["fused"],
                "explicit", ms["explicit"], goal=f"ref. {REFERENCE_MS_PER_STEP:.0f} ms fused")]


def bench_full_run(device, steps=2000):
    """The whole reference run: val loss at 500/1000/1500/2000 steps next to the
    reference point's 2.04 / 1.70 / 1.56 / 1.46 (warm-up 100, cosine to 1e-4)."""
    model, batches, _ = reference_setup(device)
    start = time.perf_counter()
    h = train(model, batches, steps=steps, lr=1e-3, warmup_steps=100, min_lr=1e-4, eval_every=500,
              eval_batches=20, device=device, seed=0, progress=False)
    seconds = time.perf_counter() - start
    print(f"full run, {steps} steps in {seconds:.0f} s: val loss "
          + ", ".join(f"{v:.2f} @ {s}" for s, v in zip(h.eval_steps, h.val_loss))
          + "  (reference: 2.04 @ 500, 1.70 @ 1000, 1.56 @ 1500, 1.46 @ 2000)")
    return [{"measure": f"full reference run, {steps} steps", "a": f"{seconds:.0f} s",
             "b": f"val loss {h.val_loss[-1]:.2f}", "ratio": None, "goal": "ref. 1.46 @ 2000"}]


def bench_generation(device, new_tokens=256, repeats=3):
    """Two readings of "256 new tokens with context 256", both measured:
    (a) a window of 256 (block_size 256) filled from a 1-token prompt, so the
        recomputing decoder sees 1..256 tokens (128 on average) per step;
    (b) 256 tokens of context already there (a 256-token prompt, block_size
        512), then 256 new ones: the recomputing decoder sees 256..511 tokens
        per step, the cached one still computes a single token."""
    rows = []
    for block_size, prompt_len in ((256, 1), (512, 256)):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=block_size, vocab_size=103)
        model = GPT(config).to(device).eval()
        prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
        cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
        full = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
        assert torch.equal(cached, full), "KV-cache generation differs from recomputation"
        t = side_by_side({
            "cache": lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=True),
            "full": lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=False)},
            device, repeats)
        print(f"generation, {config.n_layer} layers, d={config.n_embd}, block_size {block_size}, "
              f"prompt {prompt_len}, {new_tokens} new tokens, batch 1 (same tokens: True)")
        print(f"  recompute : {new_tokens / t['full']:8.0f} tokens/s")
        print(f"  KV cache  : {new_tokens / t['cache']:8.0f} tokens/s   "
              f"speed-up x{t['full'] / t['cache']:.2f}")
        rows.append(row(f"generation, prompt {prompt_len} + {new_tokens} new, cached vs uncached",
                        "cached", new_tokens / t["cache"], "uncached", new_tokens / t["full"],
                        unit="tok/s", goal=">= x5") | {"ratio": t["full"] / t["cache"]})
    return rows


def bench_attention(device, sizes=(64, 256, 1024)):
    print("causal attention fwd+bwd, B=12, H=4, head 32: fused vs explicit")
    rows = []
    for T in sizes:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(12, 4, T, 32, generator=g).to(device).requires_grad_() for _ in range(3))
        mask = attention.causal_mask(T, device=device)

        def explicit():
            out, _ = attention.scaled_dot_product_attention(q, k, v, mask)
            out.sum().backward()

        def fused():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()

        out_e, _ = attention.scaled_dot_product_attention(q, k, v, mask)
        out_f = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out_f, out_e, atol=1e-4, rtol=1e-4)
        repeats = max(3, min(20, 20 * 64 // T))
        t = side_by_side({"explicit": explicit, "fused": fused}, device, repeats)
        print(f"  T={T:4d}: explicit {t['explicit'] * 1e3:8.2f} ms, fused {t['fused'] * 1e3:8.2f} ms, "
              f"fused is x{t['explicit'] / t['fused']:.2f} faster (median of {repeats}, same outputs)")
        rows.append(row(f"attention fwd+bwd T={T}, fused vs explicit", "fused", t["fused"] * 1e3,
                        "explicit", t["explicit"] * 1e3))
    return rows


def run(device, full=False):
    """Every benchmark of this file; returns the summary rows."""
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = bench_train_step(device)
    if full:
        rows += bench_full_run(device)
    rows += bench_attention(device)
    rows += bench_generation(device)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--full", action="store_true", help="also train the whole 2000-step reference run")
    args = parser.parse_args()
    run(pick_device(args.device), full=args.full)
