"""The server's KV cache, contiguous vs paged, side by side (issue 27).

Memory: a fresh process per cache loads SmolLM2-135M-Instruct and sends one
prompt (1,400 tokens by default) through a batch of 16 rows of up to 2,048
positions, as the server's engine does (pieces of 256 tokens, then 8 decoding
steps, the conversation remembered by the prefix cache, the row released):

    contiguous  the server's cache until issue 27: a RaggedKVCache (every row
                reserves the longest row's capacity) and a PrefixCache of copies
    paged       gptcourse.serve.LlamaBatch: a PagedKVCache (blocks of 16 from a
                pool that follows the tokens in use) and a BlockPrefixCache that
                shares the row's blocks

and reports the cache's bytes and the process's RSS before, after the prompt,
and after the sequence ended. Speed: in one process, both caches step the
same rows (8 rows of 512 past tokens: a step where all decode, and a step
where one reads a 256-token piece of a prompt), alternated, the best of 10
of each: milliseconds and tokens per second.
Timings drift on a shared machine: compare the columns of one run. Usage:

    python benchmarks/bench_paged.py [--prompt 1400] [--rows 8] [--past 512] [--reps 10] [--threads 2] [--skip-memory]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptcourse import llama  # noqa: E402
from gptcourse.batching import PrefixCache, RaggedKVCache, llama_step  # noqa: E402
from gptcourse.serve.engine import resident_bytes  # noqa: E402
from gptcourse.serve.runner import LlamaBatch  # noqa: E402

MiB = 2 ** 20


class ContiguousBatch:
    """The server's LlamaBatch before the paged cache (kept here to compare): rows of
    a RaggedKVCache, a PrefixCache of copied keys and values."""

    def __init__(self, model, rows, max_length, prefix_tokens=4096):
        c, p = model.config, next(model.parameters())
        self.model, self.max_length = model, min(max_length, c.block_size)
        self.cache = RaggedKVCache(c.n_layer, rows, c.n_kv_head, c.head_size, self.max_length,
                                   dtype=p.dtype, device=p.device)
        self.prefixes = PrefixCache(prefix_tokens)

    def start(self, row, prompt_ids, salt=None):
        same, entry = self.prefixes.longest(prompt_ids[:-1], salt)
        if same:
            self.cache.put(row, [k[:, :same] for k in entry[1]], [v[:, :same] for v in entry[2]])
        self.cache.lengths[row] = same
        return list(prompt_ids[same:]), same

    def step(self, chunks):
        return llama_step(self.model, chunks, self.cache)

    def remember(self, row, ids, salt=None):
        if 0 < len(ids) <= self.prefixes.max_tokens:
            self.prefixes.add(ids, *self.cache.get(row), salt)

    def move(self, src, dst):
        self.cache.move(src, dst)

    def nbytes(self):
        c = self.cache
        return sum(t.nbytes for t in c.k + c.v) + sum(
            t.nbytes for e in self.prefixes.entries for t in e[1] + e[2])


def paged_nbytes(batch):
    return batch.cache.nbytes


def make(kind, model, rows, max_length):
    if kind == "contiguous":
        batch = ContiguousBatch(model, rows, max_length)
        return batch, batch.nbytes
    batch = LlamaBatch(model, rows, max_length)
    return batch, lambda: paged_nbytes(batch)


def one_prompt(kind, n_prompt, threads):
    """In a fresh process: RSS and cache bytes around one long prompt."""
    torch.set_num_threads(threads)
    model, _ = llama.load_gguf()
    model.eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (n_prompt,)).tolist()
    out = {"kind": kind, "rss_loaded": resident_bytes()}
    with torch.inference_mode():
        batch, nbytes = make(kind, model, 16, 2048)
        todo, _ = batch.start(0, prompt)
        while todo:
            logits = batch.step([todo[:256]])
            todo = todo[256:]
        batch.remember(0, prompt)
        out.update(rss_prompt=resident_bytes(), cache_prompt=nbytes())
        answer = []
        for _ in range(8):
            answer.append(int(logits[0].argmax()))
            logits = batch.step([[answer[-1]]])
        batch.remember(0, prompt + answer)
        batch.move(0, 0)                                   # the sequence ends
        out.update(rss_end=resident_bytes(), cache_end=nbytes())
    return out


def speed(model, rows, past, reps):
    """Seconds of one step (the best of reps), both caches on the same rows, the
    kinds alternated so that a busy moment of the machine hits both: a decoding
    step of `rows` rows with `past` tokens each, and a 256-token piece of a
    prompt after `past` tokens. The step is rerun on the same state (the rows'
    lengths restored: the new keys overwrite the same positions)."""
    torch.manual_seed(1)
    V = model.config.vocab_size
    pasts = [torch.randint(0, V, (past,)).tolist() for _ in range(rows)]
    piece = torch.randint(0, V, (256,)).tolist()
    batches = {}
    with torch.inference_mode():
        for kind in ("contiguous", "paged"):
            batch, _ = make(kind, model, rows, 2048)
            for r in range(rows):
                batch.start(r, [0])                             # an empty row r (the token is not read)
            for at in range(0, past, 256):                      # every row's past, read together
                batch.step([p[at:at + 256] for p in pasts])
            batches[kind] = batch
        best = {kind: {"decode": float("inf"), "prefill": float("inf")} for kind in batches}
        for _ in range(reps):
            for kind, batch in batches.items():
                lengths = batch.cache.lengths.clone()
                for name, chunks in (("decode", [[1]] * rows), ("prefill", [piece] + [[]] * (rows - 1))):
                    t = time.perf_counter()
                    batch.step(chunks)
                    best[kind][name] = min(best[kind][name], time.perf_counter() - t)
                    batch.cache.lengths.copy_(lengths)
    return best


def memory(args):
    print(f"one {args.prompt}-token prompt, a batch of 16 rows of up to 2,048 positions "
          f"(a fresh process each; MiB):")
    print(f"{'cache':<11} {'cache after prompt':>19} {'cache after end':>16} "
          f"{'RSS loaded':>11} {'RSS prompt':>11} {'RSS end':>9}")
    for kind in ("contiguous", "paged"):
        run = subprocess.run([sys.executable, __file__, "--child", kind, "--prompt", str(args.prompt),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{kind:<11} {r['cache_prompt'] / MiB:19.1f} {r['cache_end'] / MiB:16.1f} "
              f"{r['rss_loaded'] / MiB:11.0f} {r['rss_prompt'] / MiB:11.0f} {r['rss_end'] / MiB:9.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=1400)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--past", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["contiguous", "paged"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_prompt(args.child, args.prompt, args.threads)))
        return
    if not args.skip_memory:
        memory(args)
    if args.skip_speed:
        return
    torch.set_num_threads(args.threads)
    model, _ = llama.load_gguf()
    model.eval()
    best = speed(model, args.rows, args.past, args.reps)
    print(f"\none step, best of {args.reps} ({args.threads} threads), {args.rows} rows of {args.past} "
          f"past tokens: all {args.rows} decode one token; or one row reads 256 prompt tokens")
    for kind, b in best.items():
        print(f"{kind:<11} decode {b['decode'] * 1000:7.1f} ms ({args.rows / b['decode']:6.1f} tokens/s)   "
              f"prefill {b['prefill'] * 1000:7.1f} ms ({256 / b['prefill']:6.1f} tokens/s)")

if __name__ == "__main__":
    main()
