"""`make book` (from the stored outputs) and `make book-execute` (every chapter run
again, with the execution cache), cold and warm, timed side by side in one run.

    python benchmarks/bench_book.py                 # the whole book: about 10-15 min
    python benchmarks/bench_book.py --no-execute    # only `make book`: about a minute
    python benchmarks/bench_book.py --chapters 03_scaled_dot_product_attention
                                                    # a book of just those pages (to try it)

The book is built in a temporary copy of the working tree (the files git
tracks or would track; --head: the last commit), sharing this checkout's `.venv` and `book_static/`
through links, with the Makefile's own recipes (install and assets steps taken as done):

1. `make book`, cold (no `_build/`): the pages from the notebooks' stored outputs,
   which `make test` validates; no notebook runs;
2. `make book` again, nothing changed;
3. `make book-execute`, cold: an empty execution cache, every notebook runs;
4. `make book-execute` again, nothing changed: notebooks come from the cache.

Goals (issues 8 and 25): `make book` in about a minute; `make book-execute` under
10 minutes cold and under 1 minute warm, on 2 cores. `run()` returns summary rows
for benchmarks/bench_all.py.
"""
import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_COLD_S, GOAL_WARM_S, GOAL_BOOK_S = 600, 60, 90
SHARED = (".venv", "book_static")       # linked, not copied: installed by `make install assets`


def copy_tree(dest, chapters=None, head=False):
    """Copy the working tree (tracked and untracked-but-not-ignored files), or
    with `head` the last commit, to `dest`; link the installed folders; with
    `chapters` (file stems) keep only those pages in `_toc.yml`."""
    if head:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    else:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\0")
        for f in filter(None, files):
            if (ROOT / f).is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest / f)
    for name in SHARED:
        if not (ROOT / name).exists():
            raise SystemExit(f"{ROOT / name} is missing: run `make install assets` first")
        (dest / name).symlink_to(ROOT / name)
    if chapters:                               # a small book: those pages only (no appendix, which links them all)
        import yaml
        keep = set(chapters)
        toc = yaml.safe_load((dest / "_toc.yml").read_text())
        for part in toc["parts"]:
            part["chapters"] = [c for c in part["chapters"] if c["file"].split("/")[-1] in keep]
        toc["parts"] = [part for part in toc["parts"] if part["chapters"]]
        (dest / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
        missing = keep - {c["file"].split("/")[-1] for part in toc["parts"] for c in part["chapters"]}
        if missing:
            raise SystemExit(f"not in _toc.yml: {sorted(missing)}")


def make_book(book, target="book"):
    """`make <target>` in `book`, not re-running its install/assets steps; returns
    (seconds, output, "N executed, M from the cache")."""
    start = time.perf_counter()
    r = subprocess.run(["make", "-o", "install", "-o", "assets", target], cwd=book,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"make {target} failed in {book} (exit {r.returncode}):\n{output[-6000:]}")
    executed = len(re.findall(r"Executing notebook", output))
    cached = len(re.findall(r"Using cached notebook", output))
    return seconds, output, f"notebooks: {executed} executed, {cached} from the cache"


def load():
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def run(chapters=None, keep=False, head=False, execute=True):
    """The four builds (the last two only with execute); prints them and returns summary rows."""
    book = Path(tempfile.mkdtemp(prefix="bench-book-"))
    rows = []
    try:
        copy_tree(book, chapters, head)
        what = "the last commit" if head else "the working tree"
        print(f"book build in a copy of {what} ({book}), {os.cpu_count()} cores, {load()}")
        plain, _, n_plain = make_book(book)
        print(f"  make book, cold (stored outputs)   : {plain:7.1f} s, {n_plain} (goal < {GOAL_BOOK_S} s)")
        again, _, n_again = make_book(book)
        print(f"  make book, again (unchanged)       : {again:7.1f} s, {n_again}")
        rows.append({"measure": "make book (stored outputs), cold vs again", "a": f"again {again:.1f} s",
                     "b": f"cold {plain:.1f} s", "ratio": plain / again,
                     "goal": f"< {GOAL_BOOK_S} s: {'met' if plain < GOAL_BOOK_S else 'MISSED'}"})
        if execute:
            shutil.rmtree(book / "_build", ignore_errors=True)
            cold, _, n_cold = make_book(book, "book-execute")
            print(f"  make book-execute, cold            : {cold:7.1f} s, {n_cold} "
                  f"(goal < {GOAL_COLD_S // 60} min)   make book is x{cold / plain:.1f} faster")
            warm, _, n_warm = make_book(book, "book-execute")
            print(f"  make book-execute, warm (cache hit): {warm:7.1f} s, {n_warm} (goal < {GOAL_WARM_S} s)   "
                  f"{load()}")
            rows += [{"measure": "make book-execute, cold vs warm", "a": f"warm {warm:.1f} s",
                      "b": f"cold {cold:.0f} s", "ratio": cold / warm,
                      "goal": f"< {GOAL_COLD_S // 60} min: {'met' if cold < GOAL_COLD_S else 'MISSED'}; "
                              f"< {GOAL_WARM_S} s: {'met' if warm < GOAL_WARM_S else 'MISSED'}"},
                     {"measure": "make book vs make book-execute, cold", "a": f"book {plain:.1f} s",
                      "b": f"book-execute {cold:.0f} s", "ratio": cold / plain, "goal": "book in about a minute"}]
    finally:
        if keep:
            print(f"  kept {book}")
        else:
            shutil.rmtree(book, ignore_errors=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chapters", help="comma-separated page stems to keep in _toc.yml (a small book)")
    parser.add_argument("--head", action="store_true", help="build the last commit, not the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--no-execute", action="store_true", help="only `make book`, not `make book-execute`")
    args = parser.parse_args()
    run(args.chapters.split(",") if args.chapters else None, keep=args.keep, head=args.head,
        execute=not args.no_execute)
