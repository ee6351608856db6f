"""Point the whole course at another GitHub repository (a fork): `make fork URL=...`.

    python scripts/set_repo_url.py https://github.com/you/your-fork [--dry-run]

A chapter opened in Colab carries the repository's URL literally: its first
cell runs `pip install git+<URL>`, and the README's Colab badges open
`colab.research.google.com/github/<owner>/<name>/blob/...`. This rewrites
every file git tracks that names the current URL (read from `_config.yml`,
`repository.url`) so that it names the new one:

- notebooks (`*.ipynb`) are read as JSON and only their cells' sources change;
  outputs and metadata (what nbval compares, the recording host) stay as they
  are, and the file is written in nbformat's layout (indent 1), so the diff is
  the changed source lines alone;
- every other text file (`_config.yml`, `README.md`, scripts) is rewritten
  line for line.

Both forms are rewritten: `https://github.com/<owner>/<name>` and
`https://colab.research.google.com/github/<owner>/<name>`. Run it again with
the old URL to go back. It exits 1, naming the files, if a notebook's outputs
or metadata name the old URL (re-record them: `make outputs`).
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GITHUB = re.compile(r"https://github\.com/([A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/([A-Za-z0-9._-]{1,100})")
# Folders a walk skips where the course is not a git checkout.
SKIP = {".git", ".venv", "_build", "book_static", "node_modules", ".jupyter_cache", "__pycache__"}


def parse_url(url):
    """'https://github.com/owner/name' (a trailing '/' or '.git' dropped) -> (owner, name).

    Colab opens notebooks from GitHub only, so the URL must be a GitHub repository's."""
    if not isinstance(url, str):
        raise ValueError(f"the repository URL must be a string, got {url!r}")
    clean = url.strip().rstrip("/")
    clean = clean[:-len(".git")] if clean.endswith(".git") else clean
    match = GITHUB.fullmatch(clean)
    if not match or match.group(2) in (".", ".."):
        raise ValueError(f"not a GitHub repository URL: {url!r} "
                         "(expected https://github.com/<owner>/<name>, which Colab can open)")
    return match.group(1), match.group(2)


def current_url(root=ROOT):
    """The URL the course names now: `repository.url` in `_config.yml`."""
    text = (Path(root) / "_config.yml").read_text(encoding="utf-8")
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", text, re.M)
    if not match:
        raise ValueError(f"{Path(root) / '_config.yml'} has no repository.url")
    return match.group(1)


def replacer(old, new):
    """A function text -> text that renames repository `old` (owner, name) to `new`
    in both URL forms, and nowhere else (not `.../name-extra`, not `.../name.io`)."""
    old_path, new_path = "/".join(old), "/".join(new)
    pattern = re.compile(r"(https://github\.com/|https://colab\.research\.google\.com/github/)"
                         + re.escape(old_path) + r"(?![A-Za-z0-9_-])(?!\.(?!git\b)[A-Za-z0-9_])")
    return lambda text: pattern.sub(lambda m: m.group(1) + new_path, text)


def course_files(root=ROOT):
    """Every file of the course: what git tracks, or, outside git, a walk that skips build folders."""
    root = Path(root)
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return [root / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in sorted(root.rglob("*"))
                if p.is_file() and not SKIP & set(p.relative_to(root).parts)]


def rewrite_notebook(text, rename):
    """(new text, whether outputs or metadata still name the old URL). Only cell sources change."""
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        source = cell.get("source", "")
        if isinstance(source, list):
            cell["source"] = [rename(line) for line in source]
        else:
            cell["source"] = rename(source)
    rest = {"metadata": nb.get("metadata"),
            "cells": [{k: v for k, v in c.items() if k != "source"} for c in nb.get("cells", [])]}
    left = rename(json.dumps(rest, ensure_ascii=False)) != json.dumps(rest, ensure_ascii=False)
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n", left


def set_repo_url(new_url, root=ROOT, dry_run=False):
    """Rewrites the course under `root` to name `new_url`. Returns (changed files, files whose
    notebook outputs or metadata still name the old URL), both relative to root."""
    root = Path(root)
    old_url = current_url(root)
    old, new = parse_url(old_url), parse_url(new_url)
    rename = replacer(old, new)
    changed, left = [], []
    for path in course_files(root):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue                      # binary files (images, wheels) name no URL we write
        if path.suffix == ".ipynb":
            new_text, stale = rewrite_notebook(text, rename)
            if stale:
                left.append(path.relative_to(root))
        else:
            new_text = rename(text)
        if new_text != text:
            changed.append(path.relative_to(root))
            if not dry_run:
                path.write_text(new_text, encoding="utf-8")
    return changed, left


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the fork's URL, https://github.com/<owner>/<name>")
    parser.add_argument("--root", default=ROOT, type=Path, help="the course's folder (default: this checkout)")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would change, change none")
    args = parser.parse_args(argv)
    try:
        old = current_url(args.root)
        changed, left = set_repo_url(args.url, args.root, args.dry_run)
    except ValueError as e:
        parser.exit(2, f"set_repo_url: {e}\n")
    new = "https://github.com/" + "/".join(parse_url(args.url))
    verb = "would change" if args.dry_run else "changed"
    print(f"{old} -> {new}: {verb} {len(changed)} files")
    for path in changed:
        print(f"  {path}")
    if left:
        print(f"{len(left)} notebooks still name {old} in their outputs or metadata (not changed here; "
              "re-record them with `make outputs`):", file=sys.stderr)
        for path in left:
            print(f"  {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
