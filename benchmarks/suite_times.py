"""How long the test suite takes: the total and every notebook, slowest first.

    python benchmarks/suite_times.py [_build/test-report.xml]

Read from the JUnit XML report that `make test` writes (pytest --junitxml),
so the 10-minute suite need not run again. A chapter's time is its run in
tests/test_colab.py (the Colab simulation, where `make test` executes the
chapters, two side by side: environment, install, nbval), recorded by the test; an exercise notebook's is the sum of
its nbval cells (the first one includes the kernel start).
"""
import argparse
import datetime
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "_build" / "test-report.xml"
COLAB_TEST = re.compile(r"test_chapter_runs_in_a_fresh_colab_runtime\[(.+)\]")


def read(report=REPORT):
    """{"total": s, "tests": n, "failed": n, "when": str, "notebooks": [(name, s)],
    "files": [(test file, s)]}, each list slowest first."""
    suite = ET.parse(report).getroot()
    if suite.tag == "testsuites":
        suite = suite.find("testsuite")
    notebooks, files = defaultdict(float), defaultdict(float)
    for case in suite.iter("testcase"):
        seconds = float(case.get("time", 0))
        classname, name = case.get("classname", ""), case.get("name", "")
        colab = COLAB_TEST.fullmatch(name)
        if colab:       # the chapter's own time: chapters run side by side, a test waits its turn
            own = [p.get("value") for p in case.iter("property") if p.get("name") == "chapter_seconds"]
            notebooks[f"chapters/{colab.group(1)}.ipynb (Colab simulation)"] += float(own[0]) if own else seconds
        elif classname.endswith(".ipynb"):                 # nbval cells: dir.stem.ipynb
            folder, _, stem = classname[:-len(".ipynb")].partition(".")
            notebooks[f"{folder}/{stem}.ipynb"] += seconds
        else:       # tests.test_x[.TestClass] or a doctest's module gptcourse.attention
            parts = classname.split(".")
            while len(parts) > 1 and parts[-1][:1].isupper():
                parts.pop()
            files["/".join(parts) + ".py"] += seconds
    n = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"total": float(suite.get("time", 0)), "tests": n, "failed": failed,
            "when": suite.get("timestamp", "?"),
            "notebooks": sorted(notebooks.items(), key=lambda kv: -kv[1]),
            "files": sorted(files.items(), key=lambda kv: -kv[1])}


def minutes(seconds):
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def run(report=REPORT):
    """Prints the report's times; returns summary rows (none without a report)."""
    report = Path(report)
    if not report.is_file():
        print(f"test suite: no report at {report}. `make test` writes it "
              f"(pytest --junitxml={report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}); "
              "run it, then this again.")
        return []
    r = read(report)
    age = datetime.datetime.fromtimestamp(report.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    nb_total = sum(s for _, s in r["notebooks"])
    print(f"test suite, from {report} (written {age}): {r['tests']} tests, {r['failed']} failed, "
          f"{minutes(r['total'])} in all; notebooks {minutes(nb_total)} of it")
    print("  per notebook, slowest first:")
    for name, s in r["notebooks"]:
        print(f"    {s:7.1f} s  {name}")
    print("  the rest, per test file, slowest first:")
    for name, s in r["files"]:
        print(f"    {s:7.1f} s  {name}")
    slowest = r["notebooks"][0] if r["notebooks"] else ("-", 0.0)
    failed = f" ({r['failed']} FAILED)" if r["failed"] else ""
    return [{"measure": "test suite (make test), total", "a": minutes(r["total"]) + failed,
             "b": f"notebooks {minutes(nb_total)}", "ratio": None,
             "goal": f"< 20 min: {'met' if r['total'] < 1200 else 'MISSED'}"},
            {"measure": "slowest notebook in the test suite", "a": f"{slowest[1]:.1f} s",
             "b": slowest[0].split(" ")[0], "ratio": None, "goal": "< 90 s"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", nargs="?", default=REPORT)
    args = parser.parse_args()
    run(args.report)
