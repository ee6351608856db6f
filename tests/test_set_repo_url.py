"""`make fork URL=...` (scripts/set_repo_url.py) on a fresh `git clone` of this
repository: afterwards no file names the old URL, every chapter's install cell
and Colab badge names the new one, the notebooks' outputs and metadata are the
same bytes, and running it back restores the clone exactly."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import set_repo_url  # noqa: E402

# Written in two pieces, so that this file itself never names the fork (or the
# course's own URL): running the script back must leave it as it is.
FORK_PATH = "a-teacher/" + "gpt-course-2027"
FORK = "https://github.com/" + FORK_PATH


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A clone of the committed course, its URL before, and every notebook's text before."""
    where = tmp_path_factory.mktemp("fork") / "course"
    git("clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(where), cwd=ROOT)
    old = set_repo_url.current_url(where)
    notebooks = {p: p.read_text(encoding="utf-8") for p in where.rglob("*.ipynb")}
    # as an instructor runs it: `make fork URL=...` in the clone (its own Makefile and script)
    run = subprocess.run(["make", "-s", "fork", f"URL={FORK}.git/", f"PYTHON={sys.executable}"], cwd=where,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return where, old, notebooks, run.stdout


def fork(url, where):
    """This checkout's script, run on the clone (which may predate it)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repo_url.py"), url, "--root", str(where)],
                          cwd=where, capture_output=True, text=True)


def without_sources(text):
    nb = json.loads(text)
    return nb["metadata"], [{k: v for k, v in c.items() if k != "source"} for c in nb["cells"]]


def test_no_file_names_the_old_url(clone):
    where, old, _, out = clone
    assert old != FORK and old.startswith("https://github.com/")
    owner_name = old[len("https://github.com/"):]
    grep = subprocess.run(["git", "grep", "-l", "-F", "-e", old, "-e", f"/github/{owner_name}/"],
                          cwd=where, capture_output=True, text=True)
    assert grep.returncode == 1 and grep.stdout == "", f"still name {old}: {grep.stdout.split()}"
    assert set_repo_url.current_url(where) == FORK
    assert f"-> {FORK}: changed" in out


def test_every_chapter_installs_from_the_fork_and_its_badge_opens_it(clone):
    where, *_ = clone
    chapters = sorted((where / "chapters").glob("[0-9][0-9]_*.ipynb"))
    assert len(chapters) >= 17
    readme = (where / "README.md").read_text()
    for path in chapters + sorted((where / "exercises").glob("**/*.ipynb")):
        first = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert f'"git+{FORK}"' in "".join(first["source"]), path.name
    for path in chapters:
        badge = f"(https://colab.research.google.com/github/{FORK_PATH}/blob/main/chapters/{path.name})"
        assert badge in readme, path.name
    # the book's own checks agree, run in the clone against its new _config.yml
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                          "tests/test_book_structure.py", "-k", "saved_ready or readme"],
                         cwd=where, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]


def test_outputs_and_metadata_are_untouched_and_only_url_lines_changed(clone):
    where, old, notebooks, _ = clone
    changed = git("diff", "--name-only", cwd=where).split()
    assert any(name.endswith(".ipynb") for name in changed) and "_config.yml" in changed
    for path, before in notebooks.items():
        assert without_sources(path.read_text(encoding="utf-8")) == without_sources(before), path.name
    diff = git("diff", "-U0", cwd=where).splitlines()
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff if line.startswith("-") and not line.startswith("---")]
    assert len(added) == len(removed) > 0
    assert all(FORK_PATH in line for line in added)
    assert all(old[len("https://github.com/"):] in line for line in removed)


def test_running_it_back_restores_the_clone_exactly(clone):
    where, old, _, _ = clone
    again = fork(FORK, where)
    assert again.returncode == 0 and ": changed 0 files" in again.stdout
    back = fork(old, where)
    assert back.returncode == 0, back.stderr
    assert git("status", "--porcelain", cwd=where) == ""


@pytest.mark.parametrize("url", ["https://gitlab.com/a/b", "github.com/a/b", "https://github.com/a",
                                 "https://github.com/a/b/c", ""])
def test_a_url_colab_cannot_open_is_refused_by_name(url, tmp_path):
    with pytest.raises(ValueError, match="not a GitHub repository URL"):
        set_repo_url.parse_url(url)


def test_only_the_repository_itself_is_renamed():
    rename = set_repo_url.replacer(("old", "course"), ("me", "fork"))
    assert rename("pip install git+https://github.com/old/course") == "pip install git+https://github.com/me/fork"
    assert rename("https://github.com/old/course.git") == "https://github.com/me/fork.git"
    assert rename("https://colab.research.google.com/github/old/course/blob/main/x.ipynb") == (
        "https://colab.research.google.com/github/me/fork/blob/main/x.ipynb")
    for other in ("https://github.com/old/course-data", "https://github.com/old/course.io",
                  "https://example.com/old/course", "old/course"):
        assert rename(other) == other


def test_a_notebook_whose_outputs_name_the_old_url_is_reported(tmp_path):
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/old/course\n")
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "metadata": {},
                     "source": ["!pip install git+https://github.com/old/course\n"],
                     "outputs": [{"output_type": "stream", "name": "stdout",
                                  "text": ["Collecting git+https://github.com/old/course\n"]}]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "a.ipynb").write_text(json.dumps(nb, indent=1) + "\n")
    changed, left = set_repo_url.set_repo_url("https://github.com/new/course", tmp_path)
    assert [str(p) for p in changed] == ["_config.yml", "a.ipynb"] and [str(p) for p in left] == ["a.ipynb"]
    after = json.loads((tmp_path / "a.ipynb").read_text())
    assert after["cells"][0]["source"] == ["!pip install git+https://github.com/new/course\n"]
    assert after["cells"][0]["outputs"] == nb["cells"][0]["outputs"]
