"""The book's structure: the table of contents matches the syllabus plan, and
every chapter notebook is saved in a state the book, nbval and Colab can use."""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))

# The chapter plan of the syllabus: (part caption prefix, chapter files).
PLAN = {
    "Part I.": ["01_seq2seq_rnn", "02_attention_with_rnns"],
    "Part II.": ["03_scaled_dot_product_attention", "04_query_key_value", "05_multi_head_attention",
                 "06_transformer", "07_positional_encoding", "08_residuals_and_layer_norm"],
    "Part III.": ["09_gpt_and_bert", "10_tokens_and_embeddings", "11_gpt_from_scratch",
                  "12_gpt3_on_a_napkin", "13_decoding_and_kv_cache"],
    # the real chat model opens Part IV (SYLLABUS: "Beyond the lecture"), before the ChatGPT chapters
    "Part IV.": ["14_a_real_chat_model", "15_from_gpt_to_chatgpt", "16_talking_to_chatgpt", "17_chatgpt_api", "18_plugins_and_tools",
                  "19_tool_calls_with_a_real_model"],
}


def test_toc_follows_the_syllabus_plan():
    parts = [p for p in TOC["parts"] if p["caption"].startswith("Part")]
    assert [p["caption"].split()[0] + " " + p["caption"].split()[1] for p in parts] == list(PLAN)
    for part, (prefix, files) in zip(parts, PLAN.items()):
        assert [c["file"] for c in part["chapters"]] == [f"chapters/{f}" for f in files], prefix


def toc_entries(entries):
    """Every entry of a toc list, its sections (the appendices') included."""
    for entry in entries:
        yield entry
        yield from toc_entries(entry.get("sections", []))


def test_every_toc_entry_is_exactly_one_page():
    for part in TOC["parts"]:
        for chapter in toc_entries(part["chapters"]):
            found = [p for p in (ROOT / f"{chapter['file']}.ipynb", ROOT / f"{chapter['file']}.md")
                     if p.exists()]
            assert len(found) == 1, f"{chapter['file']}: expected one .ipynb or .md page, found {found}"


def test_every_appendix_page_is_in_the_toc():
    """The appendices (and the grading guide) are markdown pages beside the chapters;
    the book builds only what _toc.yml lists."""
    listed = {c["file"] for p in TOC["parts"] for c in toc_entries(p["chapters"])}
    for page in sorted((ROOT / "chapters").glob("*.md")):
        if not page.name[:2].isdigit():
            assert f"chapters/{page.stem}" in listed, f"{page.name} is not in _toc.yml"


def test_placeholders_say_they_are_planned():
    for page in sorted((ROOT / "chapters").glob("[0-9][0-9]_*.md")):
        title = page.read_text().splitlines()[0]
        assert title.startswith("# ") and title.endswith("(planned)"), page.name


def test_every_notebook_is_in_the_toc():
    listed = {c["file"] for p in TOC["parts"] for c in p["chapters"]}
    for nb in NOTEBOOKS:
        assert f"chapters/{nb.stem}" in listed, f"{nb.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_ready(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    # saved with outputs, in order, with no error
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not executed top to bottom: {counts}"
    for c in code:
        for out in c["outputs"]:
            assert out["output_type"] != "error", f"error output saved: {out.get('ename')}"
    # the first code cell installs gptcourse only when missing, from the book's repository
    first = "".join(code[0]["source"])
    assert 'find_spec("gptcourse") is None' in first
    assert f"git+{CONFIG['repository']['url']}" in first
    assert "pick_device()" in first
    # seeded
    assert re.search(r"seed_everything\(\d+\)|manual_seed\(\d+\)", first)


def test_readme_lists_every_chapter_with_its_colab_badge():
    readme = (ROOT / "README.md").read_text()
    colab = CONFIG["repository"]["url"].replace("https://github.com/", "https://colab.research.google.com/github/")
    for nb in NOTEBOOKS:
        assert f"({colab}/blob/main/chapters/{nb.name})" in readme, f"README: no Colab badge for {nb.name}"
        assert f"(chapters/{nb.name})" in readme, f"README: no link to {nb.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_has_a_caption_that_says_what_to_look_for(path):
    """Every code cell that stores a figure is followed directly by a markdown
    cell that starts with "**What to look for:**" and says something."""
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not any(
                "image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
            continue
        first_line = "".join(cell["source"]).strip().splitlines()[0]
        after = cells[i + 1] if i + 1 < len(cells) else None
        assert after is not None and after["cell_type"] == "markdown", (
            f"{path.name}, cell {i} ({first_line!r}): its figure is not followed by a markdown caption")
        caption = "".join(after["source"]).strip()
        assert caption.startswith("**What to look for:**"), (
            f"{path.name}, cell {i} ({first_line!r}): the cell after the figure does not start "
            f"with '**What to look for:**' but {caption[:40]!r}")
        assert len(caption.removeprefix("**What to look for:**").split()) >= 8, (
            f"{path.name}, cell {i}: the caption says too little: {caption!r}")
