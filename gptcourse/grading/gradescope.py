"""The course's grader on Gradescope and in an LMS gradebook.

    gradescope_results(report) -> dict     one grade_one report as Gradescope's results.json
    gradebook_csv(reports, exercises) -> str   one row per student, one column per exercise
    build_bundle(out_zip, notebook)        a Gradescope autograder zip for one exercise notebook
                                           (gptcourse/grading/bundle.py)

From the command line:

    python -m gptcourse.grading.gradescope bundle --notebook 03_scaled_dot_product_attention --out autograder.zip
    python -m gptcourse.grading.gradescope results grades.json --out results_dir/
    python -m gptcourse.grading.gradescope gradebook grades.json --out gradebook.csv

(grades.json: the JSON report of `python -m gptcourse.grading grade`.) Bad input
exits with code 2 and one line saying what is wrong.

Gradescope's autograder specification, which the field names and the bundle's
layout follow: https://gradescope-autograders.readthedocs.io/en/latest/specs/
(source: github.com/gradescope/autograder_samples, docs/specs.md). There:
  * results.json has a top-level "score" (it overrides the sum of the tests'),
    "output" (shown to the student), "visibility" and "stdout_visibility"
    ("hidden", "after_due_date", "after_published" or "visible"), "extra_data",
    and "tests": each with "name", "score", "max_score", "status" ("passed" or
    "failed"), "output" and "visibility";
  * the zip holds setup.sh and run_autograder at its root; it is unpacked to
    /autograder/source, run_autograder is copied to /autograder/run_autograder
    and run with /autograder as the working folder, the student's files are in
    /autograder/submission/, and the results go to /autograder/results/results.json.

The bundle's setup.sh installs bubblewrap and a virtual environment with torch,
numpy, tqdm, pyseccomp and the course's own wheel (built into the bundle);
run_autograder grades the one notebook of the submission with
gptcourse.grading.grade_one, sandboxed as in batch grading, and always writes a
results.json (score 0 and the reason when there is no notebook, more than one,
or no usable sandbox).
"""
import csv
import io
import json
import os
import re
import sys
import time

from .batch import _write_atomically, csv_safe, display_name, grade_one, read_submission, ungraded
from .bundle import build_bundle
from .exercises import EXERCISES, selected_exercises
from .monitor import TIME_LIMIT_S
from .sandbox import SandboxUnavailable, check_bwrap

MESSAGE_CAP = 300              # characters of one test's message (student-visible)
OUTPUT_CAP = 1500              # characters of the submission's output
VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")
ROOT_ENV = "GPTCOURSE_AUTOGRADER_ROOT"        # the autograder root (default /autograder)
PYTHON_ENV = "GPTCOURSE_AUTOGRADER_PYTHON"    # the Python run_autograder uses (default: setup.sh's venv)
DEFAULT_ROOT = "/autograder"


# ----------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------

def _cap(text, limit=MESSAGE_CAP):
    """text (any object, as str) cut to at most `limit` characters, marked with '...'."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _title(key):
    exercise = EXERCISES.get(key)
    return exercise.title if exercise is not None else str(key)


def _check_report(report):
    """Raise ValueError unless report has the form grade_one returns."""
    if not isinstance(report, dict):
        raise ValueError(f"a report must be a dict, got {type(report).__name__}")
    for field in ("student", "status", "exercises"):
        if field not in report:
            raise ValueError(f"a report needs a {field!r} field (the form of grading.grade_one's reports)")
    if not isinstance(report["exercises"], dict):
        raise ValueError(f"report of {report['student']!r}: 'exercises' must be a dict of exercise results")
    for key, result in report["exercises"].items():
        numbers = isinstance(result, dict) and all(isinstance(result.get(f), (int, float))
                                                   for f in ("points", "possible"))
        if not (numbers and isinstance(result.get("tests"), list)):
            raise ValueError(f"report of {report['student']!r}: exercise {key!r} needs 'points', 'possible' "
                             "and a list of 'tests'")
        for test in result["tests"]:
            if not (isinstance(test, dict) and {"name", "points", "possible", "passed"} <= set(test)):
                raise ValueError(f"report of {report['student']!r}: a test of exercise {key!r} needs "
                                 "'name', 'points', 'possible' and 'passed'")


def gradescope_results(report, visibility="visible", stdout_visibility="hidden"):
    """One report of gptcourse.grading.grade_one -> Gradescope's results.json (a dict).

    report: {"student", "status", "sandbox", "exercises": {key: {"points", "possible",
    "tests": [{"name", "points", "possible", "passed", "message"}], "hints"}}}.
    visibility: when the student sees the tests ("visible" by default);
    stdout_visibility: when the student sees run_autograder's log ("hidden": it is
    the instructor's).

    Returns {"score", "output", "visibility", "stdout_visibility", "extra_data",
    "tests": [{"name", "score", "max_score", "status", "output", "visibility"}]},
    one test per test case, named "<exercise title>: <case name>". The top-level
    score is the sum of the exercises' points (equal to the sum of the tests'
    scores). Every message is cut to MESSAGE_CAP characters, the output to
    OUTPUT_CAP. Raises ValueError for a report of another form or an unknown
    visibility.
    """
    for name, value in (("visibility", visibility), ("stdout_visibility", stdout_visibility)):
        if value not in VISIBILITIES:
            raise ValueError(f"{name} must be one of {', '.join(VISIBILITIES)}; got {value!r}")
    _check_report(report)
    tests, lines, hints = [], [], []
    score = possible = 0
    for key, result in report["exercises"].items():
        title = _title(key)
        score += result["points"]
        possible += result["possible"]
        lines.append(f"{title}: {result['points']}/{result['possible']}")
        for hint in result.get("hints") or []:
            hints.append(f"- {title}: {_cap(hint)}")
        for test in result["tests"]:
            tests.append({"name": _cap(f"{title}: {test['name']}"),
                          "score": test["points"],
                          "max_score": test["possible"],
                          "status": "passed" if test["passed"] else "failed",
                          "output": _cap(test.get("message") or ""),
                          "visibility": visibility})
    status = str(report["status"])
    head = f"Graded: {score}/{possible} points." if status == "graded" else \
        f"Not graded ({_cap(status)}): {score}/{possible} points."
    output = "\n".join([head, *lines] + (["Hints:", *hints] if hints else []))
    return {"score": score,
            "output": _cap(output, OUTPUT_CAP),
            "visibility": visibility,
            "stdout_visibility": stdout_visibility,
            "extra_data": {"student": str(report["student"]), "status": _cap(status),
                           "sandbox": str(report.get("sandbox", ""))},
            "tests": tests}


# ----------------------------------------------------------------------------
# the LMS gradebook
# ----------------------------------------------------------------------------

def gradebook_csv(reports, exercises):
    """Reports (a list of grade_one reports) -> a CSV text for an LMS gradebook import.

    exercises: {key: Exercise} (e.g. gptcourse.grading.selected_exercises(notebook)),
    or {key: points possible}: the columns, in that order.
    Returns "student,<key> (<possible>),...,total (<possible>)" and one row per
    report, in order: the student's name, the points of each exercise, the total.
    Text cells a spreadsheet would read as a formula get a leading apostrophe
    (gptcourse.grading.csv_safe). Raises ValueError when a report lacks one of
    the exercises or has another number of points possible for it.
    """
    if not exercises:
        raise ValueError("no exercises: give at least one column")
    possible = {}
    for key, exercise in exercises.items():
        value = exercise if isinstance(exercise, (int, float)) else getattr(exercise, "possible", None)
        if not isinstance(value, (int, float)):
            raise ValueError(f"exercise {key!r}: expected an Exercise or its points possible, got {exercise!r}")
        possible[key] = value
    if not isinstance(reports, (list, tuple)):
        raise ValueError(f"reports must be a list of reports, got {type(reports).__name__}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", *(f"{k} ({p})" for k, p in possible.items()), f"total ({sum(possible.values())})"])
    for report in reports:
        _check_report(report)
        points = []
        for key, p in possible.items():
            result = report["exercises"].get(key)
            if result is None:
                raise ValueError(f"report of {report['student']!r} has no exercise {key!r}")
            if result["possible"] != p:
                raise ValueError(f"report of {report['student']!r}: exercise {key!r} is out of "
                                 f"{result['possible']} points, not {p} (graded with another version?)")
            points.append(result["points"])
        writer.writerow([csv_safe(str(report["student"])), *points, sum(points)])
    return buffer.getvalue()


# ----------------------------------------------------------------------------
# what run_autograder does on Gradescope
# ----------------------------------------------------------------------------

def _write_json(path, data):
    _write_atomically(path, json.dumps(data, indent=1) + "\n")


def autograde(root, notebook, sandbox=True, timeout_s=300, memory_mb=3072, cell_timeout_s=60, call_timeout_s=10):
    """Grade the one *.ipynb in root/submission/ and write root/results/results.json.

    None or several notebooks, one that is not a regular file, or (with sandbox)
    no usable bubblewrap: every test scores 0 and the output says why. Prints a
    line for the instructor's log (Gradescope keeps stdout). Returns the results dict.
    """

    started = time.monotonic()
    folder = os.path.join(root, "submission")
    label = f"exercises/{notebook}.ipynb"
    try:
        names = sorted(p for p in os.listdir(os.fsencode(folder)) if p.lower().endswith(b".ipynb"))
    except OSError as e:
        names, why = [], f"no submission folder ({e.strerror})"
    else:
        why = None
    if len(names) != 1:
        if why is None:
            found = ", ".join(display_name(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
            why = (f"upload exactly one notebook (.ipynb), your completed {label}; found "
                   + (f"{len(names)}: {found}" if names else "none"))
        report = ungraded("submission", why, sandbox, notebook)
    else:
        student = display_name(names[0][:-len(b".ipynb")])
        text, why = read_submission(folder, names[0])
        if why is None and sandbox:
            try:
                check_bwrap()
            except SandboxUnavailable as e:
                print(f"SANDBOX UNAVAILABLE: {e}")
                why = ("not graded: the autograder could not start its sandbox on this machine; "
                       "your instructor has been told (autograder log)")
        if why is None:
            report = grade_one(student, text, timeout_s=timeout_s, memory_mb=memory_mb, notebook=notebook,
                               cell_timeout_s=cell_timeout_s, call_timeout_s=call_timeout_s, sandbox=sandbox)
        else:
            report = ungraded(student, why, sandbox, notebook)
            if why.startswith("not graded: the autograder could not start its sandbox"):
                report["sandbox"] = "bubblewrap unavailable (not graded)"
    results = gradescope_results(report)
    results["execution_time"] = round(time.monotonic() - started, 1)
    _write_json(os.path.join(root, "results", "results.json"), results)
    print(f"{report['student']}: {report['status']}; {results['score']} points; sandbox {report['sandbox']}")
    return results


# ----------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------

def load_reports(path):
    """The list of reports in a grades.json (grading.grade_folder's JSON), checked.
    Raises ValueError (unreadable, not JSON, not a list of reports)."""
    try:
        with open(path, encoding="utf-8") as f:
            reports = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from e
    if not isinstance(reports, list):
        raise ValueError(f"{path}: expected a list of reports (the JSON of `python -m gptcourse.grading grade`)")
    for report in reports:
        try:
            _check_report(report)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return reports


def file_name(student, taken):
    """A safe, unique file name (no folders, no leading dot) for a student's name;
    taken: the names given so far (updated)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(student)).lstrip(".")[:100] or "student"
    name, n = base, 1
    while name.lower() in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name.lower())
    return name


def write_results(reports, out_dir, visibility="visible"):
    """One results.json per report, as out_dir/<student>.json. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    taken, paths = set(), []
    for report in reports:
        path = os.path.join(out_dir, file_name(report["student"], taken) + ".json")
        _write_json(path, gradescope_results(report, visibility))
        paths.append(path)
    return paths


def _columns(reports, notebook):
    """The gradebook's exercises: one notebook's, or those the reports hold, in the course's order."""
    if notebook is not None:
        return selected_exercises(notebook)
    keys = {k for r in reports for k in r["exercises"]}
    if not keys:
        raise ValueError("the reports hold no exercises")
    order = list(EXERCISES)
    return {k: (EXERCISES[k] if k in EXERCISES else next(r["exercises"][k]["possible"]
                                                         for r in reports if k in r["exercises"]))
            for k in sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))}


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m gptcourse.grading.gradescope", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="write a Gradescope autograder zip for one exercise notebook")
    b.add_argument("--notebook", required=True, help="e.g. 03_scaled_dot_product_attention")
    b.add_argument("--out", default="autograder.zip", help="the zip to write (default autograder.zip)")
    b.add_argument("--timeout", type=float, default=300, help="seconds per notebook, whole tree (default 300)")
    b.add_argument("--memory-mb", type=int, default=3072, help="memory per notebook, whole tree (default 3072)")
    b.add_argument("--cell-timeout", type=float, default=60, help="seconds per notebook cell (default 60)")
    b.add_argument("--call-timeout", type=float, default=TIME_LIMIT_S,
                   help=f"seconds per call of a graded function (default {TIME_LIMIT_S:g})")
    b.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="grade WITHOUT bubblewrap (only where Gradescope refuses its namespaces); recorded")
    r = sub.add_parser("results", help="one Gradescope results.json per student of a grades.json")
    r.add_argument("reports", help="grades.json written by `python -m gptcourse.grading grade`")
    r.add_argument("--out", required=True, help="folder for <student>.json files")
    r.add_argument("--visibility", default="visible", choices=VISIBILITIES)
    g = sub.add_parser("gradebook", help="an LMS gradebook CSV of a grades.json")
    g.add_argument("reports", help="grades.json written by `python -m gptcourse.grading grade`")
    g.add_argument("--out", required=True, help="the CSV to write")
    g.add_argument("--notebook", default=None,
                   help="only this exercise notebook's exercises (default: all in the reports)")
    a = sub.add_parser("autograde", help="(run by run_autograder on Gradescope) grade ROOT/submission")
    a.add_argument("--root", default=os.environ.get(ROOT_ENV, DEFAULT_ROOT))
    a.add_argument("--notebook", required=True)
    a.add_argument("--timeout", type=float, default=300)
    a.add_argument("--memory-mb", type=int, default=3072)
    a.add_argument("--cell-timeout", type=float, default=60)
    a.add_argument("--call-timeout", type=float, default=TIME_LIMIT_S)
    a.add_argument("--unsafe-no-sandbox", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "bundle":
            build_bundle(args.out, args.notebook, not args.unsafe_no_sandbox, args.timeout, args.memory_mb,
                         args.cell_timeout, args.call_timeout)
            print(f"wrote {args.out} (exercises/{args.notebook}.ipynb"
                  + (", NO SANDBOX: --unsafe-no-sandbox)" if args.unsafe_no_sandbox else ")"))
        elif args.command == "results":
            paths = write_results(load_reports(args.reports), args.out, args.visibility)
            print(f"wrote {len(paths)} results files to {args.out}")
        elif args.command == "gradebook":
            reports = load_reports(args.reports)
            _write_atomically(args.out, gradebook_csv(reports, _columns(reports, args.notebook)))
            print(f"wrote {args.out} ({len(reports)} students)")
        else:
            selected_exercises(args.notebook)
            autograde(args.root, args.notebook, not args.unsafe_no_sandbox, args.timeout, args.memory_mb,
                      args.cell_timeout, args.call_timeout)
    except (ValueError, RuntimeError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
