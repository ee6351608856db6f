"""Cold vs warm `make book`, timed side by side in one run.

    python benchmarks/bench_book.py                 # the whole book: about 5-10 min
    python benchmarks/bench_book.py --chapters 03_scaled_dot_product_attention
                                                    # a book of just those pages (to try it)

The book is built in a temporary copy of the working tree (the files git
tracks or would track; --head: the last commit), sharing this checkout's `.venv` and `book_static/`
through links, with the Makefile's own `book` recipe (`make book`, with the
install and assets steps taken as done):

1. cold: no `_build/`, so an empty execution cache: every notebook runs;
2. warm: `make book` again, nothing changed: notebooks come from the
   execution cache and Sphinx has nothing to rewrite;
3. warm, pages rewritten: the HTML and Sphinx's environment removed, the
   execution cache kept: every page is rendered again, no notebook runs.

Goals (issue 8): under 10 minutes cold and under 1 minute warm, on 2 cores.
`run()` returns summary rows for benchmarks/bench_all.py.
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
GOAL_COLD_S, GOAL_WARM_S = 600, 60
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
    if chapters:
        keep = set(chapters)
        lines, out = (dest / "_toc.yml").read_text().splitlines(), []
        for line in lines:
            m = re.match(r"\s*- file: \S+/(\S+)$", line)
            if m is None or m.group(1) in keep:
                out.append(line)
        # drop parts left with no chapters
        text = re.sub(r"  - caption: [^\n]*\n    chapters:\n(?=  - caption|\Z)", "", "\n".join(out) + "\n")
        (dest / "_toc.yml").write_text(text)
        missing = keep - set(re.findall(r"- file: \S+/(\S+)", text))
        if missing:
            raise SystemExit(f"not in _toc.yml: {sorted(missing)}")


def make_book(book):
    """`make book` in `book`, not re-running its install/assets steps; returns
    (seconds, output, "N executed, M from the cache")."""
    start = time.perf_counter()
    r = subprocess.run(["make", "-o", "install", "-o", "assets", "book"], cwd=book,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"make book failed in {book} (exit {r.returncode}):\n{output[-6000:]}")
    executed = len(re.findall(r"Executing notebook", output))
    cached = len(re.findall(r"Using cached notebook", output))
    return seconds, output, f"notebooks: {executed} executed, {cached} from the cache"


def load():
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def run(chapters=None, keep=False, head=False):
    """Cold, warm and warm-rewritten builds; prints them and returns summary rows."""
    book = Path(tempfile.mkdtemp(prefix="bench-book-"))
    try:
        copy_tree(book, chapters, head)
        what = "the last commit" if head else "the working tree"
        print(f"book build in a copy of {what} ({book}), {os.cpu_count()} cores, {load()}")
        cold, _, n_cold = make_book(book)
        print(f"  cold  (empty execution cache)      : {cold:7.1f} s, {n_cold} "
              f"(goal < {GOAL_COLD_S // 60} min)")
        warm, _, n_warm = make_book(book)
        print(f"  warm  (unchanged, cache hit)       : {warm:7.1f} s, {n_warm} "
              f"(goal < {GOAL_WARM_S} s)   cold/warm x{cold / warm:.1f}")
        for sub in ("html", ".doctrees", "jupyter_execute"):
            shutil.rmtree(book / "_build" / sub, ignore_errors=True)
        pages, _, n_pages = make_book(book)
        print(f"  warm, every page rewritten (cache) : {pages:7.1f} s, {n_pages} "
              f"(goal < {GOAL_WARM_S} s)   {load()}")
    finally:
        if keep:
            print(f"  kept {book}")
        else:
            shutil.rmtree(book, ignore_errors=True)
    cold_goal = f"< {GOAL_COLD_S // 60} min: {'met' if cold < GOAL_COLD_S else 'MISSED'}"
    warm_goal = f"< {GOAL_WARM_S} s: {'met' if max(warm, pages) < GOAL_WARM_S else 'MISSED'}"
    return [{"measure": "make book, cold vs warm (unchanged)", "a": f"warm {warm:.1f} s",
             "b": f"cold {cold:.0f} s", "ratio": cold / warm, "goal": f"{cold_goal}; {warm_goal}"},
            {"measure": "make book, warm with every page rewritten", "a": f"warm {pages:.1f} s",
             "b": f"cold {cold:.0f} s", "ratio": cold / pages, "goal": warm_goal},
            {"measure": "make book, notebooks executed cold / warm / rewritten",
             "a": n_cold.split()[1], "b": f"{n_warm.split()[1]} / {n_pages.split()[1]}", "ratio": None,
             "goal": "0 when warm"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chapters", help="comma-separated page stems to keep in _toc.yml (a small book)")
    parser.add_argument("--head", action="store_true", help="build the last commit, not the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()
    run(args.chapters.split(",") if args.chapters else None, keep=args.keep, head=args.head)
