"""The built book, looked at like a reader would, in headless Chromium, offline.

The book is built once per test session from the outputs stored in the
notebooks (execute_notebooks: off), which nbval validates in the same run, so
no chapter is executed twice. Then each chapter page is rendered in Chromium
and its DOM (after MathJax and the widget scripts ran) is checked: math
typeset, every figure present, no error output, nothing loaded from the
internet, and a Colab launch button that points at the right notebook.
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000", "--window-size=1280,2000"]


@pytest.fixture(scope="session")
def html_dir(tmp_path_factory):
    """Build the book from stored outputs, warnings as errors; return _build/html."""
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (out / "_config.yml").write_text(yaml.safe_dump(config))
    jb = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run([str(jb), "build", str(ROOT), "--config", str(out / "_config.yml"),
                             "--path-output", str(out), "-W", "-n", "--keep-going"],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out / "_build" / "html"


def render(page):
    """The page's DOM after its scripts ran, from headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test: `make test` installs it"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 "--dump-dom", page.as_uri()],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return BeautifulSoup(result.stdout, "html.parser")


def test_every_planned_page_is_built(html_dir):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    assert len(files) == 19 + 10 + 1     # 19 chapters, 10 exercise notebooks, 1 appendix
    for f in files:
        assert (html_dir / f"{f}.html").is_file(), f"{f} missing from the built book"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_page_renders_offline(html_dir, notebook):
    nb = json.loads(notebook.read_text())
    page = html_dir / "chapters" / f"{notebook.stem}.html"
    soup = render(page)

    # nothing is fetched from the internet: every script and stylesheet is local
    for tag, attr in (("script", "src"), ("link", "href")):
        for el in soup.find_all(tag):
            url = el.get(attr) or ""
            if tag == "link" and "stylesheet" not in (el.get("rel") or []):
                continue
            assert "://" not in url, f"{page.name} loads {url} from the network"

    # math is typeset by MathJax, none left raw
    maths = soup.select(".math")
    assert maths, f"{page.name}: no math found"
    for el in maths:
        assert el.find("mjx-container"), f"{page.name}: math left untypeset: {el.get_text()[:80]!r}"
    prose = "".join(t for t in soup.find_all(string=True)
                    if not t.find_parent(["pre", "code", "script", "style", "mjx-container"]))
    for raw in ("$$", "\\[", "\\("):
        assert raw not in prose, f"{page.name}: raw math delimiter {raw!r} in the page"

    # every figure the notebook stored is on the page, and its file exists
    n_figures = sum(1 for c in nb["cells"] if c["cell_type"] == "code"
                    for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    images = soup.select(".cell_output img")
    assert len(images) >= n_figures > 0, f"{page.name}: {len(images)} images, notebook has {n_figures}"
    for img in images:
        src = img["src"]
        if not src.startswith("data:"):
            assert (page.parent / src).resolve().is_file(), f"{page.name}: image {src} missing"

    # presentation code (plots, table formatting) is collapsed, one click from
    # view, and its figure shown; every other cell's code is in plain view
    hidden = [c for c in nb["cells"] if c["cell_type"] == "code"
              and "hide-input" in c.get("metadata", {}).get("tags", [])]
    collapsed = soup.select(".cell.tag_hide-input")
    assert len(collapsed) == len(hidden), (
        f"{page.name}: {len(collapsed)} collapsed code cells, the notebook tags {len(hidden)}")
    for cell, source in zip(collapsed, hidden):
        toggle = cell.select_one("details")
        assert toggle is not None and not toggle.has_attr("open"), f"{page.name}: hidden code not collapsed"
        assert "Show code cell source" in toggle.summary.get_text(" ", strip=True)
        first_line = "".join(source["source"]).strip().splitlines()[0].strip()
        assert first_line[:30] in toggle.get_text(), f"{page.name}: collapsed cell lost its code"
        if any("image/png" in o.get("data", {}) for o in source.get("outputs", [])):
            output = cell.select_one(".cell_output")
            assert output is not None and output.find("img") and not output.find_parent("details"), (
                f"{page.name}: the figure of a collapsed cell must stay visible")
    for cell in soup.select(".cell"):
        if "tag_hide-input" not in cell.get("class", []) and cell.select_one(".cell_input"):
            assert not cell.select_one(".cell_input").find_parent("details"), (
                f"{page.name}: a code cell not tagged hide-input is collapsed")

    # no error output
    assert not soup.select(".traceback"), f"{page.name} shows an error output"
    assert "Traceback (most recent call last)" not in soup.get_text()

    # the Colab launch button opens this very notebook
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    colab = repo.replace("https://github.com/", "https://colab.research.google.com/github/")
    expected = f"{colab}/blob/main/chapters/{notebook.name}"
    links = [a.get("href", "") for a in soup.find_all("a")]
    assert expected in links, f"{page.name}: no Colab button to {expected}"
