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

With --save DIR (as `make bench` runs it) the run is also saved as
DIR/<date>-bench-<host name>.json, which benchmarks/write_appendix.py turns into
the book's appendix "How fast, measured".
"""
import argparse
import json
import os
import time
from pathlib import Path

import bench_book
import bench_core
import bench_serve
import suite_times
import write_appendix
from gptcourse.train import pick_device


def table(rows):
    head = ("measure", "A", "B", "B/A", "goal")
    cells = [head] + [(r["measure"], r["a"], r["b"], "" if r["ratio"] is None else f"x{r['ratio']:.2f}",
                       r["goal"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def record(rows, host, args, serve_json=None, report=None):
    """The run as benchmarks/write_appendix.py reads it: the summary table, the chat server's
    table when it ran, the slowest notebooks of the last `make test` when there is a report."""
    flags = " ".join([f"--device {args.device}"] * bool(args.device) + ["--full"] * args.full
                     + ["--no-book"] * args.no_book + ["--no-serve"] * args.no_serve)
    tables = [{"columns": ["measure", "A", "B", "B/A", "goal"],
               "rows": [[r["measure"], r["a"], r["b"], "" if r["ratio"] is None else f"x{r['ratio']:.2f}",
                         r["goal"]] for r in rows]}]
    if serve_json and Path(serve_json).is_file():
        tables.append(dict(bench_serve.table(json.loads(Path(serve_json).read_text())),
                           title="The chat server, batched vs one request at a time (`benchmarks/bench_serve.py`):"))
    if report and Path(report).is_file():
        r = suite_times.read(report)
        tables.append({"title": f"The last `make test` ({r['when']}: {r['tests']} tests, {r['failed']} failed), "
                                "its slowest notebooks:",
                       "columns": ["notebook", "seconds"],
                       "rows": [[name, f"{s:.1f}"] for name, s in r["notebooks"][:10]]})
    return {"section": "bench", "title": "`make bench`" + (f" ({flags})" if flags else ""),
            "host": host, "command": f"`make bench BENCH=\"{flags}\"`" if flags else "`make bench BENCH=`",
            "source": "`benchmarks/bench_all.py --save`, this run's printed summary", "tables": tables}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--full", action="store_true", help="also train the whole 2000-step reference run")
    parser.add_argument("--no-book", action="store_true", help="skip the cold/warm book build")
    parser.add_argument("--no-serve", action="store_true", help="skip the chat server under load")
    parser.add_argument("--report", default=suite_times.REPORT, help="the test report to read")
    parser.add_argument("--save", type=Path, default=None,
                        help="also save the run as DIR/<date>-bench-<host name>.json (for write_appendix.py)")
    args = parser.parse_args()
    start = time.perf_counter()
    host = write_appendix.host()
    print(host + "\n")
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
    if args.save:
        print()
        write_appendix.save(record(rows, host, args, None if args.no_serve else bench_serve.OUT, args.report),
                            args.save)
