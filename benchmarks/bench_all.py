"""The benchmark suite: `make bench`. Each comparison is measured side by side
in one run on this machine and reported as a ratio, then summed up in one table.

    python benchmarks/bench_all.py [--full] [--no-book] [--no-serve] [--device cuda]

1. the core (benchmarks/bench_core.py): training step with fused vs explicit
   attention, fused vs explicit attention at T = 64, 256, 1024, cached vs
   uncached generation (--full: also the whole 2000-step reference run);
2. the book (benchmarks/bench_book.py): cold vs warm `make book`, goals
   under 10 min cold and under 1 min warm on 2 cores (--no-book skips it:
   the cold build takes 5-10 minutes of both cores);
3. the chat server (benchmarks/bench_serve.py): SmolLM2 served with
   continuous batching vs one request at a time, 1, 4 and 16 clients:
   tokens/s, latency, time to first token (about 3 minutes; --no-serve
   skips it);
4. the test suite (benchmarks/suite_times.py): total and per-notebook time,
   slowest first, from the report the last `make test` wrote.
"""
import argparse
import os
import platform
import time

import torch

import bench_book
import bench_core
import bench_serve
import suite_times
from gptcourse.train import pick_device


def table(rows):
    head = ("measure", "A", "B", "B/A", "goal")
    cells = [head] + [(r["measure"], r["a"], r["b"], "" if r["ratio"] is None else f"x{r['ratio']:.2f}",
                       r["goal"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--full", action="store_true", help="also train the whole 2000-step reference run")
    parser.add_argument("--no-book", action="store_true", help="skip the cold/warm book build")
    parser.add_argument("--no-serve", action="store_true", help="skip the chat server under load")
    parser.add_argument("--report", default=suite_times.REPORT, help="the test report to read")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")
    rows = bench_core.run(pick_device(args.device), full=args.full)
    print()
    if not args.no_book:
        rows += bench_book.run()
        print()
    if not args.no_serve:
        rows += bench_serve.run()
        print()
    rows += suite_times.run(args.report)
    print(f"\nsummary (A is the faster side, B/A how many times faster it is; "
          f"benchmarks took {time.perf_counter() - start:.0f} s, "
          f"load average now {os.getloadavg()[0]:.1f})\n")
    print(table(rows))
