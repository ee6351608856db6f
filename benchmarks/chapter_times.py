"""How long each chapter takes to execute, against the goals of 60 s a chapter
and 12 minutes for all of them (2-core host, pinned settings: one thread, or
the two that a chapter which only runs a model sets, chapters 16 and 19).

    python benchmarks/chapter_times.py [--baseline REV] [--run] [--save DIR]

By default it reads the recordings: `make outputs` stores, for every code
cell, when it started and finished executing (the cell's execution
metadata), and a chapter's time is the sum over its cells. --baseline REV
puts the recordings of a git revision beside them (before and after a change,
from the same kind of measurement). --run executes every chapter again, one
at a time in a fresh kernel, in a temporary folder (nothing is saved into the
notebooks), under the pinned settings (scripts/pinned_cpu.py): run it on an
otherwise idle machine. The recordings say which host and settings they were
made with; the table says which it is reading.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_CHAPTER, GOAL_TOTAL = 60.0, 12 * 60.0


def chapters():
    return sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def _when(stamp):
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def recorded_seconds(notebook):
    """Sum over the code cells of (finished - started), from the stored execution metadata;
    None if the notebook holds no timings."""
    cells = [c.get("metadata", {}).get("execution", {}) for c in notebook["cells"] if c["cell_type"] == "code"]
    spans = [(_when(e["iopub.execute_input"]), _when(e["shell.execute_reply"]))
             for e in cells if "iopub.execute_input" in e and "shell.execute_reply" in e]
    return sum((end - start).total_seconds() for start, end in spans) if spans else None


def at_revision(rev, path):
    """The notebook `path` as stored at git revision rev, found by its name without the
    chapter number (chapters are renumbered when one is inserted); None if it did not exist."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:chapters"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    slug = path.name.split("_", 1)[1]
    names = [n for n in listing if n[:2].isdigit() and n.split("_", 1)[1] == slug]
    if not names:
        return None
    out = subprocess.run(["git", "show", f"{rev}:chapters/{names[0]}"], cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def run_seconds(path):
    """Execute a copy of the notebook in a fresh kernel in a temporary folder; wall seconds."""
    import nbformat
    from nbclient import NotebookClient
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        shutil.copy(path, copy)
        notebook = nbformat.read(copy, as_version=4)
        start = time.perf_counter()
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": folder}}).execute()
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="a git revision whose recordings to show beside")
    parser.add_argument("--run", action="store_true", help="also execute every chapter again, one at a time")
    parser.add_argument("--save", type=Path, help="save the table for the book's appendix in DIR")
    args = parser.parse_args()
    if args.run:
        sys.path.insert(0, str(ROOT / "scripts"))
        import pinned_cpu
        missing = pinned_cpu.missing()
        if missing:
            sys.exit("chapter_times --run: run it under the pinned settings: "
                     "python scripts/pinned_cpu.py -- python benchmarks/chapter_times.py --run")

    columns = ["chapter"] + ([f"recorded at {args.baseline}"] if args.baseline else []) + ["recorded"] \
        + (["executed now"] if args.run else []) + ["under 60 s"]
    rows, totals, hosts = [], [0.0] * (len(columns) - 2), set()
    for path in chapters():
        notebook = json.loads(path.read_text())
        hosts.add(notebook.get("metadata", {}).get("gptcourse", {}).get("outputs_recorded_on", "?"))
        values = []
        if args.baseline:
            old = at_revision(args.baseline, path)
            values.append(recorded_seconds(old) if old else None)
        values.append(recorded_seconds(notebook))
        if args.run:
            values.append(run_seconds(path))
            print(f"  executed {path.name}: {values[-1]:.1f} s", flush=True)
        current = values[-1]
        totals = [t + (v or 0.0) for t, v in zip(totals, values)]
        rows.append([path.stem] + [f"{v:.1f} s" if v is not None else "-" for v in values]
                    + ["yes" if current is not None and current < GOAL_CHAPTER else "NO"])
    rows.append(["all chapters"] + [f"{t / 60:.1f} min" for t in totals]
                + ["yes" if totals[-1] < GOAL_TOTAL else "NO (goal 12 min)"])

    widths = [max(len(str(r[i])) for r in rows + [columns]) for i in range(len(columns))]
    for row in [columns] + rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("\nrecordings made on: " + "; ".join(sorted(hosts)))
    slow = [r[0] for r in rows[:-1] if r[-1] != "yes"]
    print(f"chapters over {GOAL_CHAPTER:.0f} s: {', '.join(slow) if slow else 'none'}")
    if args.save:
        import write_appendix
        write_appendix.save({
            "section": "chapters", "title": "Every chapter's execution time",
            "command": "`make bench-chapters`" + (f" (`--baseline {args.baseline}`)" if args.baseline else ""),
            "source": "`benchmarks/chapter_times.py --save`, this run's table",
            "text": ["A chapter's recorded time is the sum of its code cells' execution times as `make outputs` "
                     "stored them (pinned settings: one thread, or two in the chapters that only run a model, "
                     "16 and 19, whose outputs are the same bits either way); 'executed now' runs each chapter again, one "
                     "at a time, in a fresh kernel. Goals: under 60 s a chapter, under 12 minutes in all."],
            "tables": [{"columns": columns, "rows": rows}],
            "notes": ["Recordings made on: " + "; ".join(sorted(hosts)) + "."]}, args.save)


if __name__ == "__main__":
    main()
