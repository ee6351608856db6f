"""The chat server under load: continuous batching vs one request at a time, side by side.

Starts `python -m gptcourse.serve` (SmolLM2-135M-Instruct) twice in one run,
with --max-batch 16 and with --max-batch 1, and for 1, 4 and 16 concurrent
clients (each sending streamed requests back to back) measures:

    tokens/s   completion tokens of all requests / wall time of the level
    latency    p50 / p95 seconds from sending a request to its [DONE]
    TTFT       p50 / p95 seconds to the first content chunk (time to first token)

Goals (issue 16): 16 clients get at least 3x the tokens/s of one client
(batched), and p50 TTFT under 0.5 s. Timings drift on a shared machine:
compare the columns of one run. `make bench` runs it too (`run()` returns
its rows for the summary). Usage:

    python benchmarks/bench_serve.py [--max-tokens 32] [--threads 1] [--levels 1 4 16] [--save DIR]
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench_core import row

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "bench_serve.json"
PROMPTS = ["Write a long story about a dragon who learns to read.",
           "Explain in detail how a steam engine works.",
           "Describe a walk through a forest in autumn, in many sentences.",
           "List twenty ideas for a birthday party and explain each one.",
           "Tell me everything you know about the history of Paris.",
           "Write a letter to a friend about your holiday by the sea."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads, *options):
    """`python -m gptcourse.serve --threads threads *options` on a free port: (process, url)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptcourse.serve", "--port", str(port),
                             "--threads", str(threads), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, f"http://127.0.0.1:{port}"


async def one_request(client, url, prompt, max_tokens):
    body = {"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return time.perf_counter() - start, first if first is not None else float("nan"), tokens


async def level(url, clients, requests_each, max_tokens):
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def worker(i):
            out = []
            for j in range(requests_each):
                out.append(await one_request(client, url, PROMPTS[(i + j) % len(PROMPTS)], max_tokens))
            return out
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)

    def pct(xs, p):
        return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]
    return dict(clients=clients, requests=len(results), tokens=tokens, wall=wall, tok_s=tokens / wall,
                lat_p50=statistics.median(latencies), lat_p95=pct(latencies, 0.95),
                ttft_p50=statistics.median(ttfts), ttft_p95=pct(ttfts, 0.95))


def table(levels):
    """The saved levels ({"batched|16": {...}, "one at a time|16": {...}, ...}) as a table for
    benchmarks/write_appendix.py."""
    clients = sorted({int(k.split("|")[1]) for k in levels})
    cols = ["clients", "batched tok/s", "one-at-a-time tok/s", "batched latency p50 / p95 (s)",
            "one-at-a-time latency p50 / p95 (s)", "batched TTFT p50 / p95 (s)", "one-at-a-time TTFT p50 / p95 (s)"]
    rows = []
    for c in clients:
        b, o = levels[f"batched|{c}"], levels[f"one at a time|{c}"]
        rows.append([str(c), f"{b['tok_s']:.1f}", f"{o['tok_s']:.1f}", f"{b['lat_p50']:.2f} / {b['lat_p95']:.2f}",
                     f"{o['lat_p50']:.2f} / {o['lat_p95']:.2f}", f"{b['ttft_p50']:.2f} / {b['ttft_p95']:.2f}",
                     f"{o['ttft_p50']:.2f} / {o['ttft_p95']:.2f}"])
    return {"columns": cols, "rows": rows}


def run(max_tokens=32, threads=1, levels=(1, 4, 16), out=OUT):
    """Both servers at every level; prints the table, returns rows for bench_all's summary."""
    rows = {}
    for mode, max_batch in (("batched", 16), ("one at a time", 1)):
        proc, url = start_server(threads, "--max-batch", str(max_batch))
        try:
            asyncio.run(one_request(httpx.AsyncClient(timeout=600), url, PROMPTS[0], 4))     # warm-up
            for clients in levels:
                each = max(1, 4 // clients)                # at least 4 requests per level
                rows[(mode, clients)] = r = asyncio.run(level(url, clients, each, max_tokens))
                print(f"{mode:14s} {clients:3d} clients: {r['tok_s']:6.1f} tok/s, latency p50 {r['lat_p50']:.2f} "
                      f"p95 {r['lat_p95']:.2f} s, TTFT p50 {r['ttft_p50']:.2f} p95 {r['ttft_p95']:.2f} s "
                      f"({r['requests']} requests, {r['tokens']} tokens, {r['wall']:.1f} s)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\nSmolLM2-135M-Instruct, greedy, max_tokens={max_tokens}, {threads} torch thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    printed = table({f"{m}|{c}": r for (m, c), r in rows.items()})
    for line in [printed["columns"], ["---"] * len(printed["columns"])] + printed["rows"]:
        print("| " + " | ".join(line) + " |")
    lo, hi = min(levels), max(levels)
    b_lo, b_hi, o_hi = rows[("batched", lo)], rows[("batched", hi)], rows[("one at a time", hi)]
    speedup = b_hi["tok_s"] / b_lo["tok_s"]
    print(f"\nbatched: {hi} clients get {speedup:.1f}x the tokens/s of {lo} (goal >= 3x: "
          f"{'met' if speedup >= 3 else 'not met'}); p50 TTFT at {hi} clients "
          f"{b_hi['ttft_p50']:.2f} s (goal < 0.5 s: {'met' if b_hi['ttft_p50'] < 0.5 else 'not met'})")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({f"{m}|{c}": r for (m, c), r in rows.items()}, indent=1))
    return [
        {"measure": f"chat server (SmolLM2), batched: tokens/s, {hi} clients vs {lo}",
         "a": f"{hi} clients {b_hi['tok_s']:.1f} tok/s", "b": f"{lo} client(s) {b_lo['tok_s']:.1f} tok/s",
         "ratio": speedup, "goal": ">= 3x"},
        row(f"chat server, {hi} clients: p50 time to first token", "batched", b_hi["ttft_p50"],
            "one at a time", o_hi["ttft_p50"], unit="s", goal="batched < 0.5 s"),
        row(f"chat server, {hi} clients: p50 latency ({max_tokens} tokens)", "batched", b_hi["lat_p50"],
            "one at a time", o_hi["lat_p50"], unit="s"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--save", type=Path, default=None,
                        help="also save the run for the book's appendix (benchmarks/write_appendix.py) in DIR")
    args = parser.parse_args()
    run(args.max_tokens, args.threads, args.levels, args.out)
    if args.save:
        import write_appendix
        write_appendix.save({
            "section": "serve", "title": "continuous batching vs one request at a time, "
                                         + ", ".join(map(str, args.levels)) + " clients",
            "command": "`make bench-serve`", "source": "`benchmarks/bench_serve.py --save`, this run's table",
            "text": [f"SmolLM2 greedy, {args.max_tokens} tokens per request, streamed, {args.threads} torch "
                     "thread(s), clients sending requests back to back."],
            "tables": [table(json.loads(Path(args.out).read_text()))]}, args.save)


if __name__ == "__main__":
    main()
