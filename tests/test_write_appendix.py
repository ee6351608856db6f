"""The appendix "How fast, measured" (benchmarks/write_appendix.py): written from
saved measurements, each with its date, host, command and source, newest first;
`make bench`'s saved run (bench_all.record) is one of them; the page in the
book is what the saved measurements give."""
import argparse
import datetime
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
    serve.write_text(json.dumps({f"{mode}|{c}": {"tok_s": 10.0 * c, "ttft_p50": 0.1, "ttft_p95": 0.2,
                                                 "lat_p50": 1.0, "lat_p95": 2.0}
                                 for mode in ("batched", "one at a time") for c in (1, 16)}))
    args = argparse.Namespace(device=None, full=True, no_book=True, no_serve=False)
    saved = bench_all.record(rows, "host: a CPU, 2 cores", args, serve, tmp_path / "no-report.xml")
    path = write_appendix.save(saved, tmp_path / "results")
    assert path.name.startswith(f"{datetime.date.today().isoformat()}-bench-")
    page = write_appendix.render(write_appendix.load(tmp_path / "results"))
    assert '`make bench BENCH="--full --no-book"`' in page and "host: a CPU, 2 cores" in page
    assert "| training step, fused vs explicit | fused 32 ms | explicit 36.6 ms | x1.14 |  |" in page
    assert "| 16 | 160.0 | 160.0 | 1.00 / 2.00 | 1.00 / 2.00 | 0.10 / 0.20 | 0.10 / 0.20 |" in page


def test_each_bench_target_saves_its_table(tmp_path, monkeypatch):
    """bench-grading, bench-llama and bench-pinning with --save, their measuring faked."""
    bench_grading = pytest.importorskip("bench_grading")
    monkeypatch.setattr(bench_grading, "time_one", lambda path, sandbox: 1.0 if sandbox else 0.5)
    monkeypatch.setattr(sys, "argv", ["bench_grading.py", "--repeat", "1", "--save", str(tmp_path)])
    bench_grading.main()

    import bench_llama
    fake = {"load_s": 4.0, "tok_per_s": 15.0, "prefill_tok_per_s": 200.0, "peak_mb": 1000.0, "tokens": [1, 2],
            "read_bytes": 500e6, "flops_per_token": 250e6}
    host = {"read_gb_s": 20.0, "gflop_s": 100.0, "mv_mkl_gb_s": 12.0, "mv_openblas_gb_s": 15.0,
            "mv_openblas_huge_gb_s": 16.0}

    def fake_run(command, **kwargs):
        return argparse.Namespace(returncode=0, stdout=json.dumps(host if "--host" in command else fake))
    monkeypatch.setattr(bench_llama.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_llama.py", "--repeats", "1", "--save", str(tmp_path)])
    bench_llama.main()

    import bench_pinning

    class Simulation:
        def __init__(self, work):
            pass

        def run(self, nb, timeout, pinned):
            return {"setup_s": 1.0, "nbval_s": 9.0 if pinned else 10.0, "returncode": 0}
    monkeypatch.setattr(bench_pinning.colab_sim, "Simulation", Simulation)
    bench_pinning.main(["chapters/03_scaled_dot_product_attention.ipynb", "--save", str(tmp_path)])

    page = write_appendix.render(write_appendix.load(tmp_path))
    assert "| 03_scaled_dot_product_attention | 1.00 | 0.50 | 2.00 |" in page and "| total | " in page
    # decode bound 20 GB/s / 500 MB = 40 tokens/s; prefill bound 100 GFLOP/s / 250 MFLOP = 400 tokens/s
    assert "| 2 | transformers | 4.0 s | 15.0 | 38% of 40 | 200 | 50% of 400 | 1000 MB |" in page
    assert "2 thread(s): 15.0 GB/s with OpenBLAS (numpy's, which gptcourse.cpu_decode uses), 16.0 with OpenBLAS in 2 MiB pages " \
        "(as load_gguf keeps the weights), 12.0 with oneMKL" in page
    assert "| 1 | gptcourse / transformers |  | 1.00x |  | 1.00x |  |  |" in page and "the same 64 tokens: yes" in page
    assert "| 03 | 11.0 s | 10.0 s | 0.91 | match |" in page and "`make bench-pinning`" in page


def test_the_book_page_is_what_the_saved_measurements_give():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "write_appendix.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
