"""The judge: a student's outputs against the reference, turned into points, messages and hints.

    compare(got, expected) -> None or a reason     what "the same answer" means
    score(exercise, outcomes, inputs) -> dict      points, one message per test, hints
    grade(key, fn) -> dict; check(key, fn)         the student's own check, in the notebook

score() runs only the reference and the known mistakes, never student code:
batch grading (gptcourse.grading.batch) hands it the outputs its sandboxed
worker sent back, check() the outputs of calls made here under the call monitor
(gptcourse.grading.monitor). Every student gets fresh inputs from a seed nobody
can predict (fresh_seed); the tests pass one.
"""
import copy
import math
import random

import torch

from .monitor import TIME_LIMIT_S, call_guarded

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


def score(exercise, outcomes, inputs):
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
    return score(exercise, outcomes, inputs)


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
    """What the batch grader's clean room (gptcourse/grading/cleanroom.py) would refuse in
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
    refusal = clean_room(cells, exercise.function, exercise.forbidden_ops).refusal()
    if refusal is None:
        return None
    why = refusal[1]
    if history:                                     # history entries are numbered as In [N]
        import re
        why = re.sub(r"code cell (\d+)", r"In [\1]", why)
    return f"Note: the batch grader would not run {exercise.function} as it stands: {why}."
