"""Colab from a fresh runtime.

Every chapter is copied alone into an empty folder outside the repository and
run, under nbval (strict: every stored output must come out the same), in a
new environment that holds only what a Colab runtime has preinstalled that
the course uses, not gptcourse. Its first cell installs gptcourse, from a
wheel built from this checkout standing in for the repository URL, and must
pull nothing else (no other torch). See scripts/colab_sim.py for how.

This is where `make test` executes the chapters, each once, in kernels pinned
to one thread and fixed CPU kernels (scripts/pinned_cpu.py). Run one alone:

    .venv/bin/python -m pytest tests/test_colab.py -k 11_gpt

When a stored output differs, the failure shows nbval's diff, then the host it
ran on and the pinned settings as the kernel's Python sees them, and where the
outputs were recorded.

And every chapter's Colab URL in the README's table of contents opens that
chapter's notebook (the book's launch buttons: tests/test_book_html.py).
"""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
import colab_sim  # noqa: E402  (scripts/ is on sys.path: tests/conftest.py)


# The fixtures `sim` (the preinstalled packages and gptcourse's wheel, made
# once) and `chapter_runs` (every chapter running in the background from the
# start of the session: tests/chapter_runs.py) live in conftest.py.


def run_python(python, code, cwd, **env):
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=colab_sim.clean_env(**colab_sim.kernel_env(), **env))


def test_preinstalled_is_only_what_colab_has(sim):
    have = set(sim.preinstalled)
    assert {"torch", "numpy", "matplotlib", "ipywidgets", "ipykernel", "tqdm", "pip"} <= have
    # what they require comes along (e.g. torch needs sympy, ipykernel pyzmq)
    assert {"sympy", "pyzmq", "jupyter-client"} <= have
    # but nothing of the course or of the test tooling
    for name in ("gptcourse", "nbval", "pytest", "jupyter-book", "nbclient", "nbformat"):
        assert name not in have, f"{name} would not be preinstalled in Colab"


def test_environment_is_fresh_before_the_first_cell(sim, tmp_path):
    python = colab_sim.make_env(tmp_path / "env", sim.preinstalled_dir)
    folder = tmp_path / "content"
    folder.mkdir()
    path = colab_sim.check_fresh(python, folder)
    assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in path)
    r = run_python(python, "import gptcourse", folder)
    assert r.returncode == 1 and "No module named 'gptcourse'" in r.stderr, r.stderr
    assert colab_sim.own_distributions(python) == []


def test_freshness_check_fails_when_the_repository_is_visible(sim, tmp_path):
    python = colab_sim.make_env(tmp_path / "env", sim.preinstalled_dir)
    (colab_sim.site_packages(python) / "repo.pth").write_text(f"{ROOT}\n")
    with pytest.raises(AssertionError, match="gptcourse is importable.*repository is on sys.path"):
        colab_sim.check_fresh(python, tmp_path)


def test_installing_the_wheel_keeps_the_preinstalled_torch(sim, tmp_path):
    python = colab_sim.make_env(tmp_path / "env", sim.preinstalled_dir)
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", str(sim.wheel)], cwd=tmp_path,
                       capture_output=True, text=True, env=colab_sim.clean_env(**colab_sim.kernel_env()))
    assert r.returncode == 0 and r.stdout == r.stderr == "", r.stdout + r.stderr   # a silent first cell
    assert colab_sim.own_distributions(python) == ["gptcourse"]
    r = run_python(python, "import torch, gptcourse; print(torch.__version__); print(gptcourse.__file__)",
                   tmp_path)
    version, where = r.stdout.split()
    assert version == torch.__version__
    assert Path(where).is_relative_to(colab_sim.site_packages(python)), where


def test_the_copy_differs_only_in_the_install_url(sim, tmp_path):
    original = CHAPTERS[0]
    copy = colab_sim.copy_notebook(original, tmp_path, sim.wheel)
    assert [p.name for p in tmp_path.iterdir()] == [original.name]
    a, b = json.loads(original.read_text()), json.loads(copy.read_text())
    first = next(i for i, c in enumerate(a["cells"]) if c["cell_type"] == "code")
    url = f"git+{colab_sim.repository_url()}"
    expected = "".join(a["cells"][first]["source"]).replace(f'"{url}"', repr(str(sim.wheel)))
    assert "".join(b["cells"][first]["source"]) == expected != "".join(a["cells"][first]["source"])
    b["cells"][first]["source"] = a["cells"][first]["source"]
    assert a == b


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_in_a_fresh_colab_runtime(chapter_runs, notebook, record_property):
    result = chapter_runs.result(notebook)
    # the chapter's own time (the test's time includes waiting for its turn)
    record_property("chapter_seconds", round(result["setup_s"] + result["nbval_s"], 1))
    assert result["returncode"] == 0, (
        f"{notebook.name} fails in the Colab simulation (nbval, strict):\n{result['output'][-8000:]}")
    expected = colab_sim.expected_installs(notebook)
    assert result["installed"] == expected, (
        f"the first cell should install {expected} and nothing else, got {result['installed']}")


def test_readme_colab_badge_of_every_chapter_opens_that_chapter():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]
    assert repo["url"].startswith("https://github.com/")
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    book = repo.get("path_to_book") or ""
    prefix = (f"https://colab.research.google.com/github/{repo['url'][len('https://github.com/'):]}"
              f"/blob/{repo['branch']}/{book + '/' if book else ''}")
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|")]
    colab_links = re.compile(r"\]\((https://colab\.research\.google\.com/(?!assets/)[^)\s]+)\)")
    for notebook in CHAPTERS:
        path = f"chapters/{notebook.name}"
        own = [r for r in rows if f"]({path})" in r]
        assert len(own) == 1, f"README: {len(own)} table rows link {path}"
        assert colab_links.findall(own[0]) == [prefix + path], (
            f"README: the row of {path} should have one Colab badge opening {prefix + path}")
    # and no badge opens a notebook that is not there
    for row in rows:
        for url in colab_links.findall(row):
            assert url.startswith(prefix) and (ROOT / url[len(prefix):]).is_file(), f"README: {url}"
