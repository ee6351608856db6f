"""Writes the book's appendix "How fast, measured" (chapters/appendix_how_fast.md)
from the saved measurements in benchmarks/results/*.json. `make bench` saves
its run there and then calls this, so the page follows the measurements.

    python benchmarks/write_appendix.py [--results DIR] [--out PAGE] [--check]

Each JSON file is one measurement: what was measured, when, on which host,
with which command, and where the figures come from:

    {"section": "core", "date": "2026-12-07", "title": "...",
     "host": "...", "command": "make bench", "source": "...",
     "text": ["a paragraph", ...],                              (optional)
     "tables": [{"columns": ["measure", ...], "rows": [["...", ...], ...]}],
     "notes": ["a paragraph after the tables", ...]}            (optional)

The page has one section per kind of measurement (SECTIONS, in this order),
each with its records newest first, so a measurement's history reads down
the section. --check writes nothing and exits 1 if the page is out of date.
The benchmarks save their runs with `save` (`--save DIR`, as the Makefile's
bench targets run them).
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "chapters" / "appendix_how_fast.md"

# (key, heading, what it measures and which command measures it)
SECTIONS = [
    ("bench", "`make bench`: the summary",
     "`make bench` (`benchmarks/bench_all.py`) measures each comparison side by side in one run on one "
     "machine and prints one summary table: A is the faster side, B/A how many times faster it is. "
     "`make bench BENCH=--no-book` skips the book builds, `BENCH=--no-serve` the chat server; "
     "`BENCH=--full` adds the 2000-step reference run. Each run saves its table here."),
    ("core", "The core: training, attention, generation",
     "`benchmarks/bench_core.py` (part of `make bench`): the training step with fused vs explicit "
     "attention, attention alone at T = 64, 256, 1024, and greedy generation with the KV cache vs "
     "recomputing every step."),
    ("book", "Building the book",
     "`benchmarks/bench_book.py` (part of `make bench`): `make book` cold (an empty execution cache, "
     "every notebook executed) and warm (unchanged, or every page rewritten); goals under 10 minutes "
     "cold and under 1 minute warm on 2 cores."),
    ("tests", "The test suite",
     "`benchmarks/suite_times.py` (part of `make bench`) reads the times of the last `make test` from "
     "`_build/test-report.xml`: the total, and every notebook's own time, slowest first."),
    ("chapters", "Every chapter's execution time",
     "`make bench-chapters` (`benchmarks/chapter_times.py`): each chapter's time from its recording (the "
     "cells' execution times that `make outputs` stores, pinned, one thread), beside an earlier revision's "
     "recordings or a fresh execution of every chapter one at a time; goals under 60 s a chapter and under "
     "12 minutes in all, on 2 cores."),
    ("pinning", "Same outputs on every CPU: what the pins cost",
     "Every run that records or compares the notebooks' outputs pins the CPU kernels "
     "(`scripts/pinned_cpu.py`, see {doc}`appendix_same_outputs`). `make bench-pinning` runs every "
     "chapter pinned and unpinned side by side, one per core."),
    ("llama", "The real chat model against `transformers`",
     "`make bench-llama` (`benchmarks/bench_llama.py`): SmolLM2-135M-Instruct on the course's code "
     "(`gptcourse.llama`) and on `transformers`, the same GGUF file, each cell a fresh process."),
    ("serve", "The chat server under load",
     "`make bench-serve` (`benchmarks/bench_serve.py`, also part of `make bench`): two server processes "
     "one after the other, continuous batching (`--max-batch 16`) and one request at a time "
     "(`--max-batch 1`), under 1, 4 and 16 clients."),
    ("grading", "Grading time",
     "`make bench-grading` (`benchmarks/bench_grading.py`): each solved exercise notebook graded alone, "
     "sandboxed and with `--unsafe-no-sandbox`, alternating, median of 3."),
]
HEADER = """\
# Appendix: how fast, measured

Every figure the course quotes about its own speed, with the day it was
measured, the machine and the command. Timings on a shared 2-core machine
drift by 10-20% from run to run, so each comparison is measured side by side
in one run and read as a ratio; figures from different days and hosts are
not comparable with each other.

This page is written by `benchmarks/write_appendix.py` from the files in
`benchmarks/results/`; `make bench` adds its run there and rewrites the page.
Edit the JSON files, not this page.
"""


def check(record, name):
    """Raises ValueError, naming the file and the field, unless `record` is a measurement."""
    for field in ("section", "date", "title", "host", "command", "source"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise ValueError(f"{name}: {field!r} must be a non-empty string, got {record.get(field)!r}")
    keys = {key for key, _, _ in SECTIONS}
    if record["section"] not in keys:
        raise ValueError(f"{name}: unknown section {record['section']!r} (one of {sorted(keys)})")
    for table in record.get("tables", []):
        width = len(table["columns"])
        for row in table["rows"]:
            if len(row) != width:
                raise ValueError(f"{name}: a row of {len(row)} cells under {width} columns: {row!r}")


def load(results=RESULTS):
    """Every record in `results`, checked: a list of dicts, each with its file name as "file"."""
    records = []
    for path in sorted(Path(results).glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        check(record, path.name)
        records.append(dict(record, file=path.name))
    return records


def cpu_model():
    """The CPU's name as Linux reports it (or the machine type elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host():
    """This machine as a measurement names it: name, CPU, cores, Python, torch, load average."""
    try:
        import torch
        torch_version = f", torch {torch.__version__}"
    except ImportError:
        torch_version = ""
    return (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            f"{torch_version}, load average {os.getloadavg()[0]:.1f}")


def save(record, folder=RESULTS):
    """Writes one measurement to folder/<date>-<section>-<host name>.json (today and this host
    filled in where the record has none); returns the path."""
    record = {"date": datetime.date.today().isoformat(), "host": host(), **record}
    check(record, "the measurement to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['date']}-{record['section']}-{platform.node() or 'host'}.json"
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"saved {path}")
    return path


def cell(value):
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table):
    lines = ["| " + " | ".join(cell(c) for c in table["columns"]) + " |",
             "|" + "|".join("---" for _ in table["columns"]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table["rows"]]
    if table.get("title"):
        lines.insert(0, f"{table['title']}\n")
    return "\n".join(lines)


def render(records):
    """The page's text: the header, then each section that has records, newest first."""
    out = [HEADER]
    for key, heading, about in SECTIONS:
        mine = sorted((r for r in records if r["section"] == key), key=lambda r: (r["date"], r["file"]),
                      reverse=True)
        if not mine:
            continue
        out.append(f"## {heading}\n\n{about}\n")
        for r in mine:
            out.append(f"### {r['date']}: {r['title']}\n")
            out.append(f"- **Host:** {r['host']}\n- **Command:** {r['command']}\n- **Source:** {r['source']}\n")
            out += [f"{p}\n" for p in r.get("text", [])]
            out += [markdown_table(t) + "\n" for t in r.get("tables", [])]
            out += [f"{p}\n" for p in r.get("notes", [])]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the saved measurements")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not what would be written")
    args = parser.parse_args(argv)
    text = render(load(args.results))
    if args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is out of date: run python benchmarks/write_appendix.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} from {len(load(args.results))} measurements in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
