"""Gradescope and LMS export (gptcourse/grading/gradescope.py).

(a) results.json of really graded notebooks (the solution and the stub of
exercise notebook 03), (b) the LMS gradebook CSV, (c) the autograder bundle:
built, unpacked into a Gradescope-like folder and its run_autograder run with
this venv's Python (setup.sh is not run: no network), sandboxed as on Gradescope.
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gptcourse.grading import gradescope
from gptcourse.grading.exercises import EXERCISES
from gptcourse.grading import grade_one, selected_exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "03_scaled_dot_product_attention"
SOLVED = ROOT / "exercises" / "solutions" / f"{NOTEBOOK}.ipynb"
STUB = ROOT / "exercises" / f"{NOTEBOOK}.ipynb"


@pytest.fixture(scope="module")
def reports():
    """The solved and the stub notebook, really graded (no sandbox: these are our own notebooks)."""
    return {name: grade_one(name, path.read_text(encoding="utf-8"), seed=1, notebook=NOTEBOOK, sandbox=False)
            for name, path in (("solved", SOLVED), ("stub", STUB))}


def check_results(results, score):
    assert set(results) >= {"score", "output", "visibility", "stdout_visibility", "tests"}
    assert results["visibility"] == "visible" and results["stdout_visibility"] in gradescope.VISIBILITIES
    cases = [(k, c) for k, e in selected_exercises(NOTEBOOK).items() for c in e.cases]
    assert len(results["tests"]) == len(cases) == 9
    for test, (key, case) in zip(results["tests"], cases):
        assert set(test) == {"name", "score", "max_score", "status", "output", "visibility"}
        assert test["name"] == f"{EXERCISES[key].title}: {case.name}"
        assert test["max_score"] == case.points and test["visibility"] == "visible"
        assert test["status"] == ("passed" if test["score"] == test["max_score"] else "failed")
        assert len(test["output"]) <= gradescope.MESSAGE_CAP
    assert results["score"] == score == sum(t["score"] for t in results["tests"])
    assert sum(t["max_score"] for t in results["tests"]) == 11
    assert len(results["output"]) <= gradescope.OUTPUT_CAP
    json.dumps(results)                                      # plain JSON


def test_results_of_the_solved_and_the_stub_notebook(reports):
    solved = gradescope.gradescope_results(reports["solved"])
    check_results(solved, 11)
    assert solved["tests"][0]["name"] == "Exercise 3.1: scaled dot-product attention: B=2, T=5, d_k=8, no mask"
    assert all(t["status"] == "passed" and t["output"] == "" for t in solved["tests"])
    assert solved["output"].startswith("Graded: 11/11 points.")
    assert "Exercise 3.2: the causal mask: 3/3" in solved["output"]
    assert solved["extra_data"] == {"student": "solved", "status": "graded",
                                    "sandbox": "NONE (--unsafe-no-sandbox)"}

    stub = gradescope.gradescope_results(reports["stub"], visibility="after_due_date")
    assert {stub["visibility"]} | {t["visibility"] for t in stub["tests"]} == {"after_due_date"}
    stub = gradescope.gradescope_results(reports["stub"])
    check_results(stub, 0)
    assert all(t["status"] == "failed" and "NotImplementedError" in t["output"] for t in stub["tests"])
    assert "Hints:" in stub["output"] and "Fill in the YOUR CODE block" in stub["output"]


def test_messages_are_capped_and_bad_reports_refused(reports):
    report = json.loads(json.dumps(reports["stub"]))
    report["status"] = "tampered with the grader (" + "x" * 5000 + ")"
    report["exercises"]["sdpa"]["tests"][0]["message"] = "y" * 5000
    report["exercises"]["sdpa"]["hints"] = ["z" * 5000] * 20
    results = gradescope.gradescope_results(report)
    assert len(results["tests"][0]["output"]) == gradescope.MESSAGE_CAP
    assert results["tests"][0]["output"].endswith("...")
    assert len(results["output"]) <= gradescope.OUTPUT_CAP and results["output"].startswith("Not graded (")
    with pytest.raises(ValueError, match="needs a 'exercises' field"):
        gradescope.gradescope_results({"student": "a", "status": "graded"})
    with pytest.raises(ValueError, match="visibility must be one of"):
        gradescope.gradescope_results(reports["solved"], visibility="public")


def test_gradebook_csv_parses_back_and_neutralises_formulas(reports):
    evil = dict(reports["stub"], student="=cmd()")
    text = gradescope.gradebook_csv([reports["solved"], reports["stub"], evil], selected_exercises(NOTEBOOK))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["student", "sdpa (8)", "causal_mask (3)", "total (11)"],
                    ["solved", "8", "3", "11"], ["stub", "0", "0", "0"], ["'=cmd()", "0", "0", "0"]]
    with pytest.raises(ValueError, match="has no exercise 'layer_norm'"):
        gradescope.gradebook_csv([reports["solved"]], selected_exercises("08_residuals_and_layer_norm"))


def test_command_line_results_and_gradebook(reports, tmp_path, capsys):
    grades = tmp_path / "grades.json"
    grades.write_text(json.dumps([reports["solved"], dict(reports["stub"], student="=../x")]))
    assert gradescope.main(["results", str(grades), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["_.._x.json", "solved.json"]                 # no way out of the folder
    assert json.loads((tmp_path / "out" / "solved.json").read_text())["score"] == 11
    assert gradescope.main(["gradebook", str(grades), "--out", str(tmp_path / "book.csv")]) == 0
    assert (tmp_path / "book.csv").read_text().splitlines()[2] == "'=../x,0,0,0"
    capsys.readouterr()
    # bad input: exit code 2 and one clear line
    (tmp_path / "bad.json").write_text("{not json")
    for argv, said in ((["gradebook", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.csv")],
                        "not a JSON file"),
                       (["results", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")], "cannot read"),
                       (["bundle", "--notebook", "99_nothing", "--out", str(tmp_path / "a.zip")],
                        "no exercises for notebook '99_nothing'")):
        assert gradescope.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "a.zip").exists()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "autograder.zip"
    assert gradescope.main(["bundle", "--notebook", NOTEBOOK, "--out", str(out)]) == 0
    return out


def test_bundle_layout(bundle):
    with zipfile.ZipFile(bundle) as z:
        names = z.namelist()
        assert names[:2] == ["setup.sh", "run_autograder"] and len(names) == 3
        assert names[2].startswith("gptcourse-") and names[2].endswith("-py3-none-any.whl")
        for name in names[:2]:
            assert (z.getinfo(name).external_attr >> 16) & 0o777 == 0o755      # executable
        setup = z.read("setup.sh").decode()
        run = z.read("run_autograder").decode()
        with zipfile.ZipFile(io.BytesIO(z.read(names[2]))) as wheel:
            assert "gptcourse/grading/__init__.py" in wheel.namelist() and \
                "gptcourse/grading/gradescope.py" in wheel.namelist()
    assert setup.startswith("#!/usr/bin/env bash") and run.startswith("#!/usr/bin/env bash")
    for word in ("apt-get install", "bubblewrap", "python3-venv", "torch", "numpy tqdm pyseccomp",
                 f"--no-deps \"$ROOT\"/source/{names[2]}"):
        assert word in setup
    assert f"--notebook {NOTEBOOK}" in run and "--unsafe-no-sandbox" not in run
    for script in (setup, run):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)      # valid bash


def run_autograder(bundle, tmp_path, notebooks, **env):
    """Lay out a Gradescope-like /autograder in tmp_path and run run_autograder there
    (with this venv's Python, or env's)."""
    root = tmp_path / "autograder"
    (root / "submission").mkdir(parents=True)
    with zipfile.ZipFile(bundle) as z:
        z.extractall(root / "source")
    shutil.copy(root / "source" / "run_autograder", root / "run_autograder")    # as Gradescope does
    os.chmod(root / "run_autograder", 0o755)
    for name, path in notebooks.items():
        shutil.copy(path, root / "submission" / name)
    env = {**os.environ, "GPTCOURSE_AUTOGRADER_ROOT": str(root), "GPTCOURSE_AUTOGRADER_PYTHON": sys.executable,
           **env}
    run = subprocess.run([str(root / "run_autograder")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    results = json.loads((root / "results" / "results.json").read_text())
    return run, results


def test_run_autograder_grades_the_solution_sandboxed(bundle, tmp_path):
    run, results = run_autograder(bundle, tmp_path, {"my_attention.ipynb": SOLVED})
    assert run.returncode == 0, run.stdout + run.stderr
    check_results(results, 11)
    assert results["extra_data"]["sandbox"] == "bubblewrap" and results["extra_data"]["student"] == "my_attention"
    assert "my_attention: graded; 11 points; sandbox bubblewrap" in run.stdout


def test_run_autograder_grades_the_stub_zero(bundle, tmp_path):
    run, results = run_autograder(bundle, tmp_path, {f"{NOTEBOOK}.ipynb": STUB})
    assert run.returncode == 0, run.stdout + run.stderr
    check_results(results, 0)
    assert results["extra_data"]["status"] == "graded"


@pytest.mark.parametrize("notebooks, said", [
    ({"a.ipynb": SOLVED, "b.ipynb": SOLVED}, "upload exactly one notebook (.ipynb), your completed "
                                             f"exercises/{NOTEBOOK}.ipynb; found 2: a.ipynb, b.ipynb"),
    ({"notes.txt": SOLVED}, "found none")])
def test_run_autograder_wants_exactly_one_notebook(bundle, tmp_path, notebooks, said):
    run, results = run_autograder(bundle, tmp_path, notebooks)
    assert run.returncode == 0, run.stdout + run.stderr
    check_results(results, 0)
    assert said in results["output"] and results["output"].startswith("Not graded (")
    assert all(said in t["output"] for t in results["tests"])


def test_run_autograder_always_writes_results(bundle, tmp_path):
    """No usable bubblewrap: score 0 and a clear reason; a grader that cannot start at all: the same."""
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    run, results = run_autograder(bundle, tmp_path / "a", {"x.ipynb": SOLVED},
                                  PATH=f"{fake.parent}:{os.environ['PATH']}")
    check_results(results, 0)
    assert "could not start its sandbox" in results["output"]
    assert "SANDBOX UNAVAILABLE" in run.stdout and "No permissions" in run.stdout      # the instructor's log
    run, results = run_autograder(bundle, tmp_path / "b", {"x.ipynb": SOLVED},
                                  GPTCOURSE_AUTOGRADER_PYTHON="/bin/false")
    assert run.returncode == 1 and results["score"] == 0
    assert results["output"].startswith("The autograder failed before grading your notebook (exit code 1)")
