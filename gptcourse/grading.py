"""Graded exercises: honest feedback for students, safe batch grading for instructors.

Students, in an exercise notebook:

    from gptcourse.grading import check
    check("sdpa", scaled_dot_product_attention)

    -> runs the function on fresh random inputs of several shapes and dtypes
       and on edge cases, compares with the reference, prints PASS/FAIL per
       test, the points, and a hint for each usual mistake it recognises.

Instructors, on a folder of submitted notebooks:

    python -m gptcourse.grading grade SUBMISSIONS/ --out grades.csv

    -> runs each notebook in its own process (time and memory limits, its
       own empty folder), grades every exercise, writes grades.csv (one row
       per student, one column per exercise, total) and grades.json (the
       feedback of every test), both atomically.

How it stays honest:
  * inputs are drawn fresh at every check, so answers hard-coded for the
    notebook's examples fail;
  * the student's function runs under a profiler that sees every call: if
    it calls a reference implementation (gptcourse's or PyTorch's) it gets
    zero for that exercise, and so does code that touches the profiler;
  * in batch grading the student's code only computes outputs; the grades
    are computed by the grading process, which never runs student code, so
    printing "PASS" or patching the grader changes nothing.
"""
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading

import torch

TIME_LIMIT_S = 10.0           # per call of the student's function


# ----------------------------------------------------------------------------
# running the student's function: time limit and forbidden calls
# ----------------------------------------------------------------------------

class ForbiddenCall(Exception):
    pass


class TimeLimit(Exception):
    pass


def _guard(forbidden):
    """A profile function that raises ForbiddenCall when a forbidden function
    runs (compared by code object for Python functions, so an alias or an
    import under another name is caught too, and by identity for builtins),
    or when the code under test touches the profiler itself."""
    codes = {f.__code__: name for name, f in forbidden.items() if hasattr(f, "__code__")}
    builtins = {id(f): name for name, f in forbidden.items() if not hasattr(f, "__code__")}
    tamper = {id(sys.setprofile), id(sys.settrace), id(threading.setprofile), id(threading.settrace)}
    found = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            found.append(codes[frame.f_code])
        elif event == "c_call" and id(arg) in builtins:
            found.append(builtins[id(arg)])
        elif event == "c_call" and id(arg) in tamper and frame.f_code is not _call_profiled.__code__:
            found.append("sys.setprofile/settrace (the grader's call monitor)")
        else:
            return
        sys.setprofile(None)
        raise ForbiddenCall(found[-1])
    return profiler, found


@contextlib.contextmanager
def _time_limit(seconds):
    """SIGALRM-based limit (main thread, POSIX); elsewhere no limit."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable or not seconds:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeLimit()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _watched():
    """The namespaces whose contents decide a grade: the grader's own and the
    torch functions it compares with. Student code must leave them alone."""
    from . import exercises
    return [sys.modules[__name__].__dict__, exercises.__dict__, torch.__dict__,
            torch.nn.functional.__dict__, torch.Tensor.__dict__]


def _tampered(snapshots):
    """Restore every watched name the call changed; return the first one."""
    changed = None
    for namespace, before in zip(_watched(), snapshots):
        for name, obj in before.items():
            if namespace.get(name, None) is not obj:
                changed = changed or name
                if isinstance(namespace, dict):
                    namespace[name] = obj
                else:                                   # a class __dict__ (mappingproxy)
                    setattr(torch.Tensor, name, obj)
    return changed


def call_guarded(fn, args, forbidden, time_limit=TIME_LIMIT_S):
    """Call fn(*args) with forbidden calls, the grader's namespaces and a time
    limit watched.

    Returns ("ok", output) or (status, message) with status one of
    "not implemented", "error", "forbidden", "timeout".
    """
    snapshots = [dict(ns) for ns in _watched()]
    outcome = _call_profiled(fn, args, forbidden, time_limit)
    changed = _tampered(snapshots)
    if changed:
        return "forbidden", f"changes the grader or torch ({changed}), which earns no points"
    return outcome


def _call_profiled(fn, args, forbidden, time_limit):
    profiler, found = _guard(forbidden)
    try:
        with _time_limit(time_limit):
            sys.setprofile(profiler)
            try:
                output = fn(*args)
            finally:
                sys.setprofile(None)
    except ForbiddenCall as e:
        return "forbidden", f"calls {e.args[0]}, which this exercise asks you to write yourself"
    except TimeLimit:
        return "timeout", f"did not return within {time_limit:g} s (an endless loop?)"
    except NotImplementedError:
        return "not implemented", "not implemented yet (the stub still raises NotImplementedError)"
    except Exception as e:                                    # the student's bug, reported
        return "error", f"raised {type(e).__name__}: {str(e)[:200]}"
    if found:                                                 # the profiler was removed but saw it
        return "forbidden", f"calls {found[0]}, which this exercise asks you to write yourself"
    return "ok", output


# ----------------------------------------------------------------------------
# comparing outputs
# ----------------------------------------------------------------------------

def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:120]


def compare(got, expected, rtol=None, atol=None):
    """None when got matches expected; otherwise a readable reason.

    Tensors must match in shape, dtype and value (tolerances by dtype; NaN
    never matches). Tuples, lists, ints and bools compare element-wise.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected {_describe(expected)}, got {_describe(got)}"
        if got.shape != expected.shape:
            return f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
        if got.dtype != expected.dtype:
            return f"expected dtype {expected.dtype}, got {got.dtype}"
        if got.is_floating_point():
            if torch.isnan(got).any() and not torch.isnan(expected).any():
                return "the output contains NaN"
            # float32 sums in another order differ by ~1e-7 relative: allow 1e-4 / 1e-5
            rtol = rtol or {torch.float64: 1e-9, torch.float32: 1e-4}.get(got.dtype, 1e-2)
            atol = atol or {torch.float64: 1e-9, torch.float32: 1e-5}.get(got.dtype, 1e-3)
            ok = torch.isclose(got.cpu(), expected.cpu(), rtol=rtol, atol=atol, equal_nan=True)
            if not ok.all():
                diff = (got.cpu() - expected.cpu()).abs()[~ok].nan_to_num(nan=math.inf, posinf=math.inf)
                return f"values differ (largest difference {diff.max().item():.3g})"
            return None
        return None if torch.equal(got.cpu(), expected.cpu()) else "values differ"
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a {type(expected).__name__} of {len(expected)} items, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            reason = compare(g, e, rtol, atol)
            if reason:
                return f"item {i}: {reason}"
        return None
    if isinstance(expected, bool) or isinstance(got, bool):
        return None if got is expected else f"expected {expected!r}, got {got!r}"
    if isinstance(expected, int):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        return None if isinstance(got, int) and got == expected else f"expected {expected}, got {got!r}"[:160]
    return None if got == expected else f"expected {expected!r}, got {got!r}"[:160]


# ----------------------------------------------------------------------------
# grading one exercise
# ----------------------------------------------------------------------------

def fresh_seed():
    """A seed nobody can predict: inputs differ at every check."""
    return random.SystemRandom().randrange(2 ** 31)


def case_inputs(exercise, seed):
    """The inputs of every test case of an exercise, from one seed."""
    return [case.make(torch.Generator().manual_seed(seed + i)) for i, case in enumerate(exercise.cases)]


def evaluate(exercise, outcomes, inputs):
    """Turn the student's outcomes (one (status, value) per case) into a result.

    Runs only the reference and the known mistakes: never student code.
    """
    tests, hints, points = [], [], 0
    statuses = {status for status, _ in outcomes}
    if "forbidden" in statuses:                 # the whole exercise earns zero
        message = next(v for s, v in outcomes if s == "forbidden")
        tests = [dict(name=c.name, points=0, possible=c.points, passed=False, message=message)
                 for c in exercise.cases]
        return dict(exercise=exercise.key, points=0, possible=exercise.possible, tests=tests,
                    hints=["Write the computation yourself with basic tensor operations: calling a "
                           "reference implementation, or changing the grader, earns no points."])
    for case, args, (status, value) in zip(exercise.cases, inputs, outcomes):
        if status == "ok":
            expected = exercise.reference(*args)
            reason = compare(value, expected)
        else:
            reason = value
        passed = reason is None
        points += case.points if passed else 0
        tests.append(dict(name=case.name, points=case.points if passed else 0, possible=case.points,
                          passed=passed, message="" if passed else reason))
        if not passed and status == "ok":
            for mistake, wrong, hint in exercise.mistakes:
                try:
                    if compare(value, wrong(*args)) is None and hint not in hints:
                        hints.append(hint)
                except Exception:
                    pass
    if any(c.fixed and t["passed"] for c, t in zip(exercise.cases, tests)) and \
            not any(t["passed"] for c, t in zip(exercise.cases, tests) if not c.fixed):
        # right only on the worked examples, wrong on every fresh input: hard-coded answers?
        for case, t in zip(exercise.cases, tests):
            if case.fixed and t["passed"]:
                t.update(points=0, passed=False,
                         message="counts only when a test with fresh random inputs passes too")
        points = 0
        hints.append("Your function is right only on the fixed examples: it must compute the "
                     "answer for any input.")
    if "not implemented" in statuses and points == 0:
        hints = ["Fill in the YOUR CODE block, run the cell, then run this check again."]
    return dict(exercise=exercise.key, points=points, possible=exercise.possible, tests=tests, hints=hints)


def run_cases(exercise, fn, inputs, time_limit=TIME_LIMIT_S):
    """Call fn on each case's inputs (guarded); returns one (status, value) per case."""
    outcomes = []
    for args in inputs:
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]   # fn may modify them
        outcomes.append(call_guarded(fn, args, exercise.forbidden(), time_limit))
        if outcomes[-1][0] in ("forbidden", "timeout"):
            break
    outcomes += [("error", "not run: an earlier test did not return")] * (len(inputs) - len(outcomes))
    return outcomes


def format_result(exercise, result):
    lines = [f"{exercise.title}: {result['points']}/{result['possible']} points"]
    width = max(len(t["name"]) for t in result["tests"])
    for t in result["tests"]:
        mark = "PASS" if t["passed"] else "FAIL"
        tail = f"  {t['message']}" if t["message"] else ""
        lines.append(f"  {mark}  {t['name']:<{width}}  {t['points']}/{t['possible']}{tail}")
    for hint in result["hints"]:
        lines.append(f"  Hint: {hint}")
    return "\n".join(lines)


def grade(key, fn, seed=None):
    """Grade fn as exercise `key`; returns the result dict (points, possible,
    tests, hints) without printing. Used by check and by the tests."""
    from .exercises import EXERCISES
    if key not in EXERCISES:
        raise ValueError(f"unknown exercise {key!r}; known: {', '.join(EXERCISES)}")
    exercise = EXERCISES[key]
    inputs = case_inputs(exercise, fresh_seed() if seed is None else seed)
    if not callable(fn):
        outcomes = [("error", f"{fn!r} is not a function")] * len(inputs)
    else:
        outcomes = run_cases(exercise, fn, inputs)
    return evaluate(exercise, outcomes, inputs)


def check(key, fn):
    """Check one of your functions now: check("sdpa", scaled_dot_product_attention).

    Prints PASS/FAIL per test, your points and hints for the usual mistakes.
    """
    from .exercises import EXERCISES
    result = grade(key, fn)
    print(format_result(EXERCISES[key], result))


# ----------------------------------------------------------------------------
# batch grading: one untrusted worker process per notebook
# ----------------------------------------------------------------------------

def _notebook_code(nb_text):
    """The code cells of a notebook, IPython magics and shell lines removed."""
    nb = json.loads(nb_text)
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a Jupyter notebook (no list of cells)")
    cells = []
    for cell in nb["cells"]:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else str(source)
            cells.append("\n".join(line for line in source.splitlines()
                                   if not line.lstrip().startswith(("%", "!"))))
    return cells


def worker(nb_path, seed, out_path, cell_time_limit=60.0, call_time_limit=TIME_LIMIT_S):
    """Runs INSIDE the sandboxed worker process: execute the notebook's code
    cells, then run every exercise's function it defines on the inputs drawn
    from `seed`, and save the raw outcomes (no grades) to out_path."""
    from .exercises import EXERCISES
    with open(nb_path, encoding="utf-8") as f:
        cells = _notebook_code(f.read())
    namespace = {"__name__": "__main__"}
    devnull = open(os.devnull, "w")
    for source in cells:
        try:
            with _time_limit(cell_time_limit), contextlib.redirect_stdout(devnull):
                exec(compile(source, "<cell>", "exec"), namespace)
        except (Exception, TimeLimit):
            pass                                  # like a notebook run with errors allowed
    outcomes = {}
    for key, exercise in EXERCISES.items():
        fn = namespace.get(exercise.function)
        if callable(fn):
            with contextlib.redirect_stdout(devnull):
                outcomes[key] = run_cases(exercise, fn, case_inputs(exercise, seed), call_time_limit)
    _save_outcomes(outcomes, out_path)


def _sanitize(outcomes):
    """Keep only well-formed outcome lists (the worker is untrusted)."""
    clean = {}
    if isinstance(outcomes, dict):
        for key, items in outcomes.items():
            if isinstance(items, list) and all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
                clean[key] = [(str(s), v) for s, v in items]
    return clean


_ALLOWED = (torch.Tensor, int, float, bool, str, type(None))


def _safe(value):
    """Outputs the grading process may load back: tensors, numbers, strings,
    and tuples/lists of them (torch.load(weights_only=True) refuses the rest)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        items = [_safe(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, _ALLOWED):
        return value
    raise TypeError(f"returned a {type(value).__module__}.{type(value).__name__}")


def _save_outcomes(outcomes, out_path):
    clean = {}
    for key, items in outcomes.items():
        clean[key] = []
        for status, value in items:
            try:
                clean[key].append((status, _safe(value)))
            except TypeError as e:
                clean[key].append(("error", str(e)))
    torch.save(clean, out_path)


def _limit_memory(megabytes):
    def set_limit():
        import resource
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.setsid()                        # its own process group, killed as one
    return set_limit


def selected_exercises(notebook=None):
    """All exercises, or those of one exercise notebook (e.g. "03_scaled_dot_product_attention")."""
    from .exercises import EXERCISES
    chosen = {k: e for k, e in EXERCISES.items() if notebook in (None, e.notebook)}
    if not chosen:
        names = sorted({e.notebook for e in EXERCISES.values()})
        raise ValueError(f"no exercises for notebook {notebook!r}; known: {', '.join(names)}")
    return chosen


def grade_one(name, nb_text, seed, timeout_s=300, memory_mb=3072, notebook=None, cell_timeout_s=60,
              call_timeout_s=TIME_LIMIT_S):
    """Grade one submission in its own process and folder; never raises."""
    import subprocess
    import tempfile
    EXERCISES = selected_exercises(notebook)
    report = {"student": name, "status": "graded", "exercises": {}}
    with tempfile.TemporaryDirectory(prefix="grading-") as folder:
        nb_path, out_path = os.path.join(folder, "submission.ipynb"), os.path.join(folder, "outcomes.pt")
        with open(nb_path, "w", encoding="utf-8") as f:
            f.write(nb_text)
        try:
            _notebook_code(nb_text)
        except Exception as e:
            report["status"] = f"not a valid notebook: {type(e).__name__}: {str(e)[:120]}"
        else:
            cmd = [sys.executable, "-m", "gptcourse.grading", "_worker", nb_path, str(seed), out_path,
                   "--cell-timeout", str(cell_timeout_s), "--call-timeout", str(call_timeout_s)]
            env = {**os.environ, "MPLBACKEND": "Agg", "GPTCOURSE_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, preexec_fn=_limit_memory(memory_mb))
            try:
                _, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                report["status"] = f"stopped after the time limit of {timeout_s} s"
            else:
                if proc.returncode != 0:
                    last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                    report["status"] = f"the notebook's process failed (exit code {proc.returncode}): {last[0][:160]}"
        outcomes = {}
        if os.path.exists(out_path):
            try:
                outcomes = _sanitize(torch.load(out_path, weights_only=True))
            except Exception as e:
                report["status"] = f"unreadable results: {type(e).__name__}"
    for key, exercise in EXERCISES.items():
        inputs = case_inputs(exercise, seed)
        items = outcomes.get(key)
        if items is None or len(items) != len(inputs):
            message = f"no function named {exercise.function} was found" if report["status"] == "graded" \
                else report["status"]
            items = [("error", message)] * len(inputs)
        report["exercises"][key] = evaluate(exercise, items, inputs)
    return report


def _write_atomically(path, text):
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)                  # readers see the old file or the new one, never half


def grade_folder(folder, out_csv, out_json=None, timeout_s=300, memory_mb=3072, jobs=2, progress=True,
                 notebook=None, cell_timeout_s=60, call_timeout_s=TIME_LIMIT_S):
    """Grade every *.ipynb in folder; write the CSV and JSON reports. Returns the reports.

    notebook: grade only that exercise notebook's exercises (default: all).
    """
    import csv
    import io
    from concurrent.futures import ThreadPoolExecutor
    from tqdm.auto import tqdm
    EXERCISES = selected_exercises(notebook)
    paths = sorted(p for p in os.listdir(folder) if p.endswith(".ipynb"))
    # read everything first: a submission that deletes files cannot reach the others
    texts = {}
    for p in paths:
        with open(os.path.join(folder, p), "rb") as f:
            texts[os.path.splitext(p)[0]] = f.read().decode("utf-8", errors="replace")
    seed = fresh_seed()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(grade_one, name, text, seed, timeout_s, memory_mb, notebook, cell_timeout_s,
                               call_timeout_s)
                   for name, text in texts.items()]
        reports = [f.result() for f in tqdm(futures, desc="grading", unit="notebook", disable=not progress)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", *EXERCISES, "total", "possible", "status"])
    possible = sum(e.possible for e in EXERCISES.values())
    for r in reports:
        points = [r["exercises"][k]["points"] for k in EXERCISES]
        writer.writerow([r["student"], *points, sum(points), possible, r["status"]])
    _write_atomically(out_csv, buffer.getvalue())
    _write_atomically(out_json or os.path.splitext(out_csv)[0] + ".json", json.dumps(reports, indent=1))
    return reports


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m gptcourse.grading", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks")
    g.add_argument("folder")
    g.add_argument("--out", default="grades.csv", help="CSV: one row per student (default grades.csv)")
    g.add_argument("--json", default=None, help="JSON report with all feedback (default: next to the CSV)")
    g.add_argument("--timeout", type=float, default=300, help="seconds per notebook (default 300)")
    g.add_argument("--memory-mb", type=int, default=3072, help="memory per notebook (default 3072)")
    g.add_argument("--jobs", type=int, default=2, help="notebooks graded at once (default 2)")
    g.add_argument("--notebook", default=None,
                   help="grade only this exercise notebook's exercises, e.g. 03_scaled_dot_product_attention")
    g.add_argument("--cell-timeout", type=float, default=60, help="seconds per notebook cell (default 60)")
    g.add_argument("--call-timeout", type=float, default=TIME_LIMIT_S,
                   help=f"seconds per call of a graded function (default {TIME_LIMIT_S:g})")
    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    w.add_argument("notebook")
    w.add_argument("seed", type=int)
    w.add_argument("out")
    w.add_argument("--cell-timeout", type=float, default=60)
    w.add_argument("--call-timeout", type=float, default=TIME_LIMIT_S)
    args = parser.parse_args(argv)
    if args.command == "_worker":
        worker(args.notebook, args.seed, args.out, args.cell_timeout, args.call_timeout)
        return 0
    reports = grade_folder(args.folder, args.out, args.json, args.timeout, args.memory_mb, args.jobs,
                           notebook=args.notebook, cell_timeout_s=args.cell_timeout,
                           call_timeout_s=args.call_timeout)
    print(f"graded {len(reports)} notebooks -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
