"""The appendix "How fast, measured" (benchmarks/write_appendix.py): written from
saved measurements, each with its date, host, command and source, newest first;
`make bench`'s saved run (bench_all.record) is one of them; the page in the
book is what the saved measurements give."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import write_appendix  # noqa: E402

SAMPLE = {"section": "core", "date": "2026-12-01", "title": "training step", "host": "a 2-core test host",
          "command": "`make bench`", "source": "a saved sample",
          "tables": [{"columns": ["measure", "figure"], "rows": [["step", "32.0 ms | fused"]]}],
          "notes": ["Read the ratio."]}


def save(folder, name, **changes):
    (folder / name).write_text(json.dumps(dict(SAMPLE, **changes)))


def test_each_measurement_shows_date_host_command_and_source_newest_first(tmp_path):
    save(tmp_path, "old.json", date="2026-11-01", title="the older run")
    save(tmp_path, "new.json")
    save(tmp_path, "grading.json", section="grading", title="grading time")
    page = write_appendix.render(write_appendix.load(tmp_path))
    assert page.startswith("# Appendix: how fast, measured\n")
    assert page.index("## The core") < page.index("### 2026-12-01: training step") < page.index(
        "### 2026-11-01: the older run") < page.index("## Grading time")
    assert "- **Host:** a 2-core test host\n- **Command:** `make bench`\n- **Source:** a saved sample" in page
    assert "| step | 32.0 ms \\| fused |" in page and "Read the ratio." in page
    assert "## Building the book" not in page          # a section with no measurement is left out


@pytest.mark.parametrize("changes, message", [
    ({"section": "speed"}, "unknown section 'speed'"),
    ({"host": ""}, "'host' must be a non-empty string"),
    ({"date": None}, "'date' must be a non-empty string"),
    ({"tables": [{"columns": ["a", "b"], "rows": [["1"]]}]}, "a row of 1 cells under 2 columns"),
])
def test_a_bad_measurement_is_refused_by_file_and_field(tmp_path, changes, message):
    save(tmp_path, "bad.json", **changes)
    with pytest.raises(ValueError, match=message) as error:
        write_appendix.load(tmp_path)
    assert "bad.json" in str(error.value)


def test_make_bench_saves_a_run_the_writer_reads(tmp_path):
    bench_all = pytest.importorskip("bench_all")
    rows = [{"measure": "training step, fused vs explicit", "a": "fused 32 ms", "b": "explicit 36.6 ms",
             "ratio": 36.6 / 32, "goal": ""},
            {"measure": "full reference run, 2000 steps", "a": "62 s", "b": "val loss 1.43", "ratio": None,
             "goal": "ref. 1.46 @ 2000"}]
    serve = tmp_path / "bench_serve.json"
    serve.write_text(json.dumps({f"{mode}|{c}": {"tok_s": 10.0 * c, "ttft_p50": 0.1}
                                 for mode in ("batched", "one at a time") for c in (1, 16)}))
    args = argparse.Namespace(device=None, full=True, no_book=True, no_serve=False)
    (tmp_path / "results").mkdir()
    saved = bench_all.record(rows, "host: a CPU, 2 cores", args, serve, tmp_path / "no-report.xml")
    (tmp_path / "results" / "run.json").write_text(json.dumps(saved))
    page = write_appendix.render(write_appendix.load(tmp_path / "results"))
    assert '`make bench BENCH="--full --no-book"`' in page and "host: a CPU, 2 cores" in page
    assert "| training step, fused vs explicit | fused 32 ms | explicit 36.6 ms | x1.14 |  |" in page
    assert "| 16 | 160.0 | 160.0 | 0.10 | 0.10 |" in page


def test_the_book_page_is_what_the_saved_measurements_give():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "write_appendix.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
