"""Batch-grading time per notebook, with the bubblewrap sandbox and without
(--unsafe-no-sandbox), side by side in one run.

    .venv/bin/python benchmarks/bench_grading.py [--repeat 3] [--save DIR]

Grades each solved exercise notebook (exercises/solutions/*.ipynb) alone,
one job at a time, alternating sandboxed and unsandboxed runs so drift on a
shared machine hits both alike; prints the median wall time of each and the
ratio. Single timings drift 10-20% here: read the ratio.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptcourse import grading  # noqa: E402


def time_one(path, sandbox):
    """Seconds to grade one notebook (its own exercises), and its total points."""
    start = time.perf_counter()
    report = grading.grade_one(path.stem, path.read_text(), timeout_s=300, notebook=path.stem, sandbox=sandbox)
    seconds = time.perf_counter() - start
    points = sum(r["points"] for r in report["exercises"].values())
    possible = sum(r["possible"] for r in report["exercises"].values())
    assert points == possible, (path.name, sandbox, report["status"], points, possible)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each notebook in each mode (default 3)")
    parser.add_argument("--save", type=Path, default=None,
                        help="also save the run for the book's appendix (benchmarks/write_appendix.py) in DIR")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    paths = sorted((ROOT / "exercises" / "solutions").glob("[0-9]*.ipynb"))
    print(f"{'notebook':<36} {'sandbox s':>10} {'no sandbox s':>13} {'ratio':>6}")
    totals, table = [0.0, 0.0], []
    for path in paths:
        times = {True: [], False: []}
        for _ in range(args.repeat):
            for sandbox in (True, False):
                times[sandbox].append(time_one(path, sandbox))
        with_, without = statistics.median(times[True]), statistics.median(times[False])
        totals[0] += with_
        totals[1] += without
        print(f"{path.stem:<36} {with_:>10.2f} {without:>13.2f} {with_ / without:>6.2f}", flush=True)
        table.append([path.stem, f"{with_:.2f}", f"{without:.2f}", f"{with_ / without:.2f}"])
    print(f"{'total (medians)':<36} {totals[0]:>10.2f} {totals[1]:>13.2f} {totals[0] / totals[1]:>6.2f}")
    if args.save:
        import write_appendix
        table.append(["total", f"{totals[0]:.2f}", f"{totals[1]:.2f}", f"{totals[0] / totals[1]:.2f}"])
        write_appendix.save({
            "section": "grading", "title": "each solved notebook, sandboxed and not",
            "command": "`make bench-grading`", "source": "`benchmarks/bench_grading.py --save`, this run's table",
            "text": ["Each solved notebook graded alone, one at a time, sandboxed and not, alternating, "
                     f"median of {args.repeat}."],
            "tables": [{"columns": ["notebook", "sandboxed (s)", "`--unsafe-no-sandbox` (s)", "ratio"],
                        "rows": table}]}, args.save)


if __name__ == "__main__":
    main()
