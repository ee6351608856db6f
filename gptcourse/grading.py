"""Graded exercises: honest feedback for students, safe batch grading for instructors.

Students, in an exercise notebook:

    from gptcourse.grading import check
    check("sdpa", scaled_dot_product_attention)

    -> runs the function on fresh random inputs of several shapes and dtypes
       and on edge cases, compares with the reference, prints PASS/FAIL per
       test, the points, and a hint for each usual mistake it recognises.

Instructors, on a folder of submitted notebooks:

    python -m gptcourse.grading grade SUBMISSIONS/ --out grades.csv

    -> runs each notebook under bubblewrap (gptcourse/sandbox.py: user nobody,
       own PID/network/mount/IPC namespaces, read-only system, no course
       sources, seccomp, cgroup memory/task/CPU limits, a wall clock for the
       whole tree), grades every exercise, writes grades.csv (one row per student,
       one column per exercise, total, status, sandbox) and grades.json (the
       feedback of every test), both atomically. Without bubblewrap it refuses
       unless --unsafe-no-sandbox is given, which the reports record.

What the batch grade trusts, and what it does not (the trust boundary):
  * answers, not claims: every student gets inputs drawn from a secret seed
    that never enters the sandbox as a seed (only the inputs do); the
    worker sends back outputs only, which are loaded here with
    torch.load(weights_only=True), size-capped, and compared with the
    reference here. Nothing the worker reports about itself (a status, an
    operator list, a signature) decides a grade, so there is no secret in
    the sandbox to steal and no record in it worth rewriting;
  * the clean room: the graded function runs in a fresh process that never
    ran the notebook: gptcourse/cleanroom.py reads the notebook's text here
    and keeps only the statements the function needs (its definition, the
    helpers and constants it reads, their imports), and refuses, before
    anything runs, what a graded function never needs (eval/exec, getattr,
    dunders, frames, private attributes, torch._C, modules outside a short
    list). Everything else in the notebook never runs;
  * "write it yourself": a from-import or attribute of the ready-made version
    (F.scaled_dot_product_attention, ...) is refused by that static reading,
    and in the worker the forbidden ATen operators are replaced, for every
    dispatch key, by kernels that raise (torch.library) before any student
    code runs, so calling them by any Python path fails below Python;
  * the process: bubblewrap (gptcourse/sandbox.py) as user nobody, no
    network, a read-only root, sized tmpfs, a seccomp filter that refuses
    new processes (threads excepted), namespaces, ptrace and other
    processes' memory; a cgroup (gptcourse/cgroups.py, v2 or v1) for memory,
    tasks and CPU share, or per-process rlimits where no cgroup can be made;
    a wall clock that kills the whole tree.

check() in the student's own kernel is feedback, not a defence: it records the
operators a call executes (TorchFunctionMode, TorchDispatchMode) and calls of
the course's references (a profiler), and any cell can fool it; the batch
grade is what counts.
"""
import contextlib
import copy
import errno
import json
import math
import os
import random
import signal
import stat
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


_WARM = []


def _warm_monitor():
    """Run the monitor once (torch's lazy imports rebind a few of its names the
    first time a mode handles an operator), before any snapshot is taken."""
    if not _WARM:
        enter, leave = _make_monitor({"ops": [], "functions": []})
        x = torch.randn(2, 3, 4)
        for dtype in (torch.float32, torch.float64):
            enter()
            try:
                y = x.to(dtype)
                s = (y @ y.transpose(-2, -1) / 2.0).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), -1e9)
                torch.cat([torch.softmax(s, -1)] * 2, -1).sort(-1, descending=True)[0].cumsum(-1)
                torch.topk(y, 2).values.mean(-1, keepdim=True).var().sqrt().tolist()
            finally:
                leave()
        _WARM.append(True)


def _make_monitor(sink):
    """(enter, leave): push and pop a TorchFunctionMode and a TorchDispatchMode that
    append every torch function and ATen operator run between the two to
    sink["functions"] and sink["ops"]. leave() returns None when the modes are
    where enter() put them, else what changed. (check() runs in the student's own
    process: this is feedback, not a defence; batch grading blocks the operators
    instead, gptcourse/grading_worker.py.)"""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class FunctionRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if type(func).__module__ == "torch._ops":           # torch.ops.aten.X(...)
                sink["functions"].append(f"torch.ops.{func}")
            else:
                sink["functions"].append(f"{getattr(func, '__module__', '') or ''}."
                                         f"{getattr(func, '__name__', None) or repr(func)}")
            return func(*args, **(kwargs or {}))

    class DispatchRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            sink["ops"].append(str(func))
            return func(*args, **(kwargs or {}))

    C, modes = torch._C, {}

    def enter():
        modes["f"], modes["d"] = FunctionRecorder(), DispatchRecorder()
        modes["nf"], modes["nd"] = C._len_torch_function_stack(), C._len_torch_dispatch_stack()
        C._push_on_torch_function_stack(modes["f"])
        C._push_on_torch_dispatch_stack(modes["d"])

    def leave():
        changed = None
        if C._len_torch_dispatch_stack() != modes["nd"] + 1 or \
                C._get_dispatch_stack_at(modes["nd"]) is not modes["d"]:
            changed = "the dispatch-mode stack"
        if C._len_torch_function_stack() != modes["nf"] + 1 or \
                C._get_function_stack_at(modes["nf"]) is not modes["f"]:
            changed = changed or "the torch-function-mode stack"
        while C._len_torch_dispatch_stack() > modes["nd"]:
            C._pop_torch_dispatch_stack(None)
        while C._len_torch_function_stack() > modes["nf"]:
            C._pop_torch_function_stack()
        return changed
    return enter, leave


def call_guarded(fn, args, forbidden, time_limit=TIME_LIMIT_S, forbidden_ops=()):
    """Call fn(*args) with forbidden calls, the grader's namespaces and a time
    limit watched.

    Returns ("ok", output) or (status, message) with status one of
    "not implemented", "error", "forbidden", "timeout".
    """
    _warm_monitor()
    snapshots = [dict(ns) for ns in _watched()]
    outcome = _call_profiled(fn, args, forbidden, time_limit, forbidden_ops)
    changed = _tampered(snapshots)
    if changed:
        return "forbidden", f"changes the grader or torch ({changed}), which earns no points"
    return outcome


def _call_profiled(fn, args, forbidden, time_limit, forbidden_ops=()):
    profiler, found = _guard(forbidden)
    record = {"ops": [], "functions": []}
    enter, leave = _make_monitor(record)
    try:
        with _time_limit(time_limit):
            enter()
            sys.setprofile(profiler)
            try:
                output = fn(*args)
            finally:
                sys.setprofile(None)
                changed = leave()
        if changed:
            return "forbidden", f"changes {changed} (the grader's monitor), which earns no points"
        for name in record["functions"] + record["ops"]:
            if any(pattern in name for pattern in forbidden_ops):
                return "forbidden", f"calls {name}, which this exercise asks you to write yourself"
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

    Tensors must match in shape, dtype and value (tolerances by dtype unless
    given; NaN never matches). Tuples, lists, ints and bools compare
    element-wise; a str must be equal, and the reason shows where it differs.
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
            # float64 allows the usual float32 scalar idioms (torch.sqrt(torch.tensor(d_k)) is
            # rounded to float32: ~3e-8 relative), which a student need not avoid
            rtol = rtol or {torch.float64: 1e-6, torch.float32: 1e-4}.get(got.dtype, 1e-2)
            atol = atol or {torch.float64: 1e-7, torch.float32: 1e-5}.get(got.dtype, 1e-3)
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
        # an integer answer of any integer-like type: a one-element tensor, a NumPy
        # integer, or a float holding a whole number
        if isinstance(got, torch.Tensor) and got.numel() == 1 and not got.is_complex():
            got = got.item()
        if not isinstance(got, (int, float)) and type(got).__module__ == "numpy" and hasattr(got, "item"):
            got = got.item()
        if isinstance(got, float) and math.isfinite(got) and got.is_integer():
            got = int(got)
        return None if isinstance(got, int) and got == expected else f"expected {expected}, got {got!r}"[:160]
    if isinstance(expected, str):
        if not isinstance(got, str):
            return f"expected a str, got {_describe(got)}"
        if got == expected:
            return None
        i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        start = max(0, i - 20)
        return (f"the texts differ from character {i} on: expected ...{expected[start:i + 30]!r}, "
                f"got ...{got[start:i + 30]!r}")[:300]
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
            try:                                   # an output of any form is a failed test, never a crash
                reason = compare(value, expected, case.rtol, case.atol)
            except Exception as e:
                reason = f"the output could not be compared with the expected one ({type(e).__name__})"
        else:
            reason = value
        passed = reason is None
        points += case.points if passed else 0
        tests.append(dict(name=case.name, points=case.points if passed else 0, possible=case.points,
                          passed=passed, message="" if passed else reason))
        if not passed and status == "ok":
            matched = []
            for mistake, wrong, hint in exercise.mistakes:
                try:
                    if compare(value, wrong(*args), case.rtol, case.atol) is None and hint not in matched:
                        matched.append(hint)
                except Exception:
                    pass
            # two different mistakes that give this very output (a KV cache without the factor 2 in
            # bfloat16 is also its number of elements): this case cannot tell which; others can
            if len(matched) == 1 and matched[0] not in hints:
                hints.append(matched[0])
    if any(c.fixed and not c.trivial and t["passed"] for c, t in zip(exercise.cases, tests)) and \
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
        args = copy.deepcopy(args)                           # fn may modify them, lists included
        outcomes.append(call_guarded(fn, args, exercise.forbidden(), time_limit, exercise.forbidden_ops))
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
    note = grader_note(EXERCISES[key])
    if note:
        print(note)


def grader_note(exercise, cells=None):
    """What the batch grader's clean room (gptcourse/cleanroom.py) would refuse in
    the code run so far, as a note for the student, or None. cells: the code run,
    in order (default: this IPython kernel's input history, In[1:]; outside
    IPython there is no history and no note)."""
    from .cleanroom import clean_room
    history = cells is None
    if history:
        try:
            from IPython import get_ipython
            shell = get_ipython()
            cells = list(shell.user_ns.get("In", []))[1:] if shell is not None else []
        except ImportError:
            cells = []
    if not cells:
        return None
    room = clean_room(cells, exercise.function, exercise.forbidden_ops)
    where = "the batch grader"
    if room.forbidden:
        why = f"uses {room.forbidden}, which this exercise asks you to write yourself"
    elif room.problem:
        why = room.problem
    else:
        return None
    if history:                                     # history entries are numbered as In [N]
        import re
        why = re.sub(r"code cell (\d+)", r"In [\1]", why)
    return f"Note: {where} would not run {exercise.function} as it stands: {why}."


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


WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grading_worker.py")
UNAVAILABLE = " is not available while grading"       # the worker's blocked kernels say this


def make_stub_dir(folder):
    """Fill `folder` with what the sandbox sees at /grader: the worker, nothing else."""
    import shutil
    shutil.copy(WORKER_FILE, os.path.join(folder, "grading_worker.py"))
    os.chmod(os.path.join(folder, "grading_worker.py"), 0o644)
    os.chmod(folder, 0o755)
    return folder


def make_job(rooms, exercises, inputs, cell_timeout_s, call_timeout_s, cpu_s=0):
    """The worker's stdin: a JSON line (limits) and, per exercise, the vetted program,
    the function's name, the operators to block and the inputs (torch.save)."""
    import io
    from .cleanroom import ALLOWED_MODULES, BLOCKED_NAMES
    header = {"result_fd": -1, "rlimit_mb": 0, "cell_timeout": float(cell_timeout_s),
              "call_timeout": float(call_timeout_s), "cpu_s": int(cpu_s)}
    body = io.BytesIO()
    torch.save({"blocked_names": sorted(BLOCKED_NAMES), "allowed_modules": list(ALLOWED_MODULES),
                "exercises": {k: {"source": rooms[k].source, "function": e.function,
                                  "block": list(e.forbidden_ops), "inputs": inputs[k]}
                              for k, e in exercises.items()}}, body)
    return json.dumps(header).encode() + b"\n" + body.getvalue()


def result_cap(exercises, inputs):
    """The most bytes this notebook's answers may take: 1 MB plus 4x the reference
    answers' size (torch.save), so reading them costs the grader little."""
    import io
    buffer = io.BytesIO()
    torch.save([[e.reference(*args) for args in inputs[k]] for k, e in exercises.items()], buffer)
    return (1 << 20) + 4 * len(buffer.getvalue())


def read_records(data):
    """The worker's records: {exercise: {"defined", "cases"}}; a malformed record ends the reading."""
    import io
    import struct
    records, at = {}, 0
    while at + 8 <= len(data):
        (size,) = struct.unpack_from("<Q", data, at)
        if size > len(data) - at - 8:
            break
        try:
            record = torch.load(io.BytesIO(data[at + 8:at + 8 + size]), weights_only=True)
        except Exception:
            break
        at += 8 + size
        if isinstance(record, dict) and isinstance(record.get("exercise"), str) and \
                isinstance(record.get("cases"), list) and isinstance(record.get("defined"), str):
            records[record["exercise"]] = record
    return records


def judge(exercise, record, n_cases):
    """One exercise's record from the worker -> one (status, value) per case."""
    if record["defined"] != "ok":
        return [("error", f"not run: {record['defined']}")] * n_cases
    outcomes = []
    for item in record["cases"][:n_cases]:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            outcomes.append(("error", "unreadable result"))
            continue
        status, value = str(item[0]), item[1]
        if status == "ok":
            outcomes.append(("ok", value))
        elif UNAVAILABLE in str(value):                    # PyTorch's ready-made version, blocked below Python
            op = str(value).split(UNAVAILABLE)[0].split()[-1]
            outcomes.append(("forbidden", f"calls {op}, which this exercise asks you to write yourself"))
        else:
            outcomes.append((status, str(value)))
    outcomes += [("error", "not run: an earlier test did not return")] * (n_cases - len(outcomes))
    return outcomes


def selected_exercises(notebook=None):
    """All exercises, or those of one exercise notebook (e.g. "03_scaled_dot_product_attention")."""
    from .exercises import EXERCISES
    chosen = {k: e for k, e in EXERCISES.items() if notebook in (None, e.notebook)}
    if not chosen:
        names = sorted({e.notebook for e in EXERCISES.values()})
        raise ValueError(f"no exercises for notebook {notebook!r}; known: {', '.join(names)}")
    return chosen


def grade_one(name, nb_text, seed=None, timeout_s=300, memory_mb=3072, notebook=None, cell_timeout_s=60,
              call_timeout_s=TIME_LIMIT_S, sandbox=True, max_tasks=16):
    """Grade one submission in its own sandboxed process; never raises.

    seed: None draws a secret one (the default; tests pass one).
    Returns {"student", "status", "sandbox", "exercises": {key: result}}."""
    try:
        return _grade_one(name, nb_text, seed, timeout_s, memory_mb, notebook, cell_timeout_s, call_timeout_s,
                          sandbox, max_tasks)
    except Exception as e:                       # a bug of the grader's must not cost the others
        return ungraded(name, f"grading error: {type(e).__name__}: {str(e)[:160]}", sandbox, notebook)


def ungraded(name, status, sandbox=True, notebook=None):
    """The report of a submission that earns nothing, with the reason as its status."""
    EXERCISES = selected_exercises(notebook)
    return {"student": name, "status": status, "sandbox": _sandbox_label(sandbox),
            "exercises": {k: evaluate(e, [("error", status)] * len(e.cases), [()] * len(e.cases))
                          for k, e in EXERCISES.items()}}


def _sandbox_label(sandbox):
    return "bubblewrap" if sandbox else "NONE (--unsafe-no-sandbox)"


def _grade_one(name, nb_text, seed, timeout_s, memory_mb, notebook, cell_timeout_s, call_timeout_s, sandbox,
               max_tasks):
    import tempfile
    from . import sandbox as sb
    from .cleanroom import clean_room
    EXERCISES = selected_exercises(notebook)
    seed = fresh_seed() if seed is None else seed
    inputs = {k: case_inputs(e, seed) for k, e in EXERCISES.items()}
    report = {"student": name, "status": "graded", "sandbox": _sandbox_label(sandbox), "exercises": {}}
    try:
        cells = _notebook_code(nb_text)
    except Exception as e:
        return ungraded(name, f"not a valid notebook: {type(e).__name__}: {str(e)[:120]}", sandbox, notebook)
    # what runs is decided here, on the notebook's text (gptcourse/cleanroom.py)
    rooms = {k: clean_room(cells, e.function, e.forbidden_ops) for k, e in EXERCISES.items()}
    outcomes = {}
    for key, room in rooms.items():
        n = len(inputs[key])
        if room.forbidden:
            outcomes[key] = [("forbidden", f"uses {room.forbidden}, which this exercise asks you to write "
                                           "yourself")] * n
        elif room.problem:
            outcomes[key] = [("error", room.problem if room.problem.startswith("no function named")
                              else f"not run: {room.problem}")] * n
    runnable = {k: e for k, e in EXERCISES.items() if k not in outcomes}
    if runnable:
        with tempfile.TemporaryDirectory(prefix="grading-stub-") as folder:
            make_stub_dir(folder)
            job = make_job(rooms, runnable, inputs, cell_timeout_s, call_timeout_s, cpu_s=math.ceil(timeout_s) + 5)
            cap = result_cap(runnable, inputs)
            run = sb.run_worker(folder, job, timeout_s, memory_mb, max_tasks=max_tasks, sandbox=sandbox,
                                result_cap=cap)
        records = read_records(run["result"]) if run["result_bytes"] <= cap else {}
        missing = [k for k in runnable if k not in records]
        if run["result_bytes"] > cap:
            report["status"] = (f"results too large ({run['result_bytes']:,} bytes; this notebook's answers "
                                f"need at most {cap:,}): not read")
        elif missing:
            last = run["stderr"].decode(errors="replace").strip().splitlines()[-1:] or [""]
            if run["timed_out"]:
                report["status"] = f"stopped after the time limit of {timeout_s:g} s"
            elif run["oom"]:
                report["status"] = f"killed: the memory limit of {memory_mb} MB was reached"
            elif run["returncode"] != 0:
                report["status"] = f"the grading process failed (exit code {run['returncode']}): {last[0][:160]}"
            else:
                report["status"] = "results missing"
        for key in runnable:
            n = len(inputs[key])
            outcomes[key] = judge(EXERCISES[key], records[key], n) if key in records else \
                [("error", report["status"])] * n
        report["limits"] = run["limits"]
    for key, exercise in EXERCISES.items():
        report["exercises"][key] = evaluate(exercise, outcomes[key], inputs[key])
    return report


def display_name(raw):
    """A submission's file name (bytes, any) as text: valid UTF-8 as it is, other
    bytes as \\xNN escapes, so that the CSV and the JSON can always be written.

        >>> display_name(b"ana\\xe9.ipynb"), display_name("ana\u00e9".encode())
        ('ana\\\\xe9.ipynb', 'ana\u00e9')
    """
    return raw.decode("utf-8", errors="backslashreplace")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """A spreadsheet reads a text cell that starts with = + - @ (or a tab or a
    carriage return) as a formula: such cells get a leading apostrophe (OWASP's
    advice on CSV injection). Numbers are left alone.

        >>> csv_safe("=HYPERLINK(1)"), csv_safe("ana"), csv_safe(-1)
        ("'=HYPERLINK(1)", 'ana', -1)
    """
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def read_submission(folder, raw_name, limit=50 * 1024 * 1024):
    """(text, None) for a regular file of folder; (None, why) for anything else.

    Links are not followed (O_NOFOLLOW: a link to the solution or to a
    classmate's notebook is not graded), a folder or a FIFO named *.ipynb is
    not opened for reading (O_NONBLOCK: a FIFO cannot hang the grader), and at
    most `limit` bytes are read."""
    path = os.path.join(os.fsencode(folder), raw_name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "not a regular file (a symbolic link): not graded"
        return None, f"unreadable: {e.strerror}"
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a plain file"
            return None, f"not a regular file ({kind}): not graded"
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace"), None
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    finally:
        os.close(fd)


def _write_atomically(path, text):
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)                  # readers see the old file or the new one, never half


def grade_folder(folder, out_csv, out_json=None, timeout_s=300, memory_mb=3072, jobs=2, progress=True,
                 notebook=None, cell_timeout_s=60, call_timeout_s=TIME_LIMIT_S, sandbox=True, max_tasks=16):
    """Grade every *.ipynb file in folder; write the CSV and JSON reports. Returns the reports.

    notebook: grade only that exercise notebook's exercises (default: all).
    sandbox: False only for the instructor's explicit --unsafe-no-sandbox; the
    reports then say so. With sandbox=True and no bubblewrap, raises
    SandboxUnavailable before grading anything.
    """
    import csv
    import io
    from concurrent.futures import ThreadPoolExecutor
    from tqdm.auto import tqdm
    from . import sandbox as sb
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("jobs", jobs),
                        ("cell_timeout_s", cell_timeout_s), ("call_timeout_s", call_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"not a folder of submissions: {folder!r}")
    EXERCISES = selected_exercises(notebook)
    if sandbox:
        sb.check_bwrap()
    if progress:                                   # say which limits this host gives, and how to get more
        from .cgroups import probe
        kind, why = probe()
        print(f"limits per notebook: {why}" if kind else
              f"limits per notebook: one process (seccomp) under RLIMIT_AS and RLIMIT_CPU, sized tmpfs; {why}",
              file=sys.stderr)
    # names are bytes (any bytes: old zip tools write names that are not UTF-8);
    # read everything first: a submission that deletes files cannot reach the others
    raw_names = sorted(p for p in os.listdir(os.fsencode(folder)) if p.endswith(b".ipynb"))
    submissions = [(display_name(p[:-len(b".ipynb")]), *read_submission(folder, p)) for p in raw_names]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(grade_one, name, text, None, timeout_s, memory_mb, notebook, cell_timeout_s,
                               call_timeout_s, sandbox, max_tasks)
                   for name, text, why in submissions if why is None]
        graded = iter([f.result() for f in tqdm(futures, desc="grading", unit="notebook",
                                                disable=not progress)])
        reports = [next(graded) if why is None else ungraded(name, why, sandbox, notebook)
                   for name, text, why in submissions]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", *EXERCISES, "total", "possible", "status", "sandbox"])
    possible = sum(e.possible for e in EXERCISES.values())
    for r in reports:
        points = [r["exercises"][k]["points"] for k in EXERCISES]
        writer.writerow([csv_safe(r["student"]), *points, sum(points), possible, csv_safe(r["status"]),
                         r["sandbox"]])
    _write_atomically(out_csv, buffer.getvalue())
    _write_atomically(out_json or os.path.splitext(out_csv)[0] + ".json", json.dumps(reports, indent=1))
    return reports


def main(argv=None):
    import argparse
    from .sandbox import SandboxUnavailable
    parser = argparse.ArgumentParser(prog="python -m gptcourse.grading", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks")
    g.add_argument("folder")
    g.add_argument("--out", default="grades.csv", help="CSV: one row per student (default grades.csv)")
    g.add_argument("--json", default=None, help="JSON report with all feedback (default: next to the CSV)")
    g.add_argument("--timeout", type=float, default=300, help="seconds per notebook, whole tree (default 300)")
    g.add_argument("--memory-mb", type=int, default=3072, help="memory per notebook, whole tree (default 3072)")
    g.add_argument("--jobs", type=int, default=2, help="notebooks graded at once (default 2)")
    g.add_argument("--notebook", default=None,
                   help="grade only this exercise notebook's exercises, e.g. 03_scaled_dot_product_attention")
    g.add_argument("--cell-timeout", type=float, default=60, help="seconds per notebook cell (default 60)")
    g.add_argument("--call-timeout", type=float, default=TIME_LIMIT_S,
                   help=f"seconds per call of a graded function (default {TIME_LIMIT_S:g})")
    g.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run submissions WITHOUT bubblewrap (only for code you trust); recorded in the output")
    args = parser.parse_args(argv)
    try:
        reports = grade_folder(args.folder, args.out, args.json, args.timeout, args.memory_mb, args.jobs,
                               notebook=args.notebook, cell_timeout_s=args.cell_timeout,
                               call_timeout_s=args.call_timeout, sandbox=not args.unsafe_no_sandbox)
    except (SandboxUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"graded {len(reports)} notebooks -> {args.out}"
          + ("  (NO SANDBOX: --unsafe-no-sandbox)" if args.unsafe_no_sandbox else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
