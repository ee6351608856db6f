"""check()'s call monitor: a student's function called in the student's own kernel,
with a time limit, forbidden calls and the grader's namespaces watched.

    call_guarded(fn, args, forbidden, time_limit, forbidden_ops) -> (status, value)

status is "ok" (value: the output) or one of "not implemented", "error",
"forbidden", "timeout" (value: the message the student reads). Three watchers:

  * a profile function (sys.setprofile) that raises ForbiddenCall when a
    forbidden function runs (by code object, so an alias is caught too) or when
    the code under test touches the profiler itself;
  * a TorchFunctionMode and a TorchDispatchMode that record every torch function
    and ATen operator the call runs, matched against the exercise's operators;
  * snapshots of the grader's own namespaces and torch's, restored after the
    call: a function that patches compare() or torch.isclose earns nothing.

This is feedback, not a defence: any cell of the student's notebook can fool
it. The batch grade (gptcourse.grading.batch) is what counts; it blocks the
operators below Python instead (gptcourse/grading/worker.py).
"""
import contextlib
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
    """The namespaces whose contents decide a grade: the grader's own (this
    package, the monitor, the judge, the exercises) and the torch functions it
    compares with. Student code must leave them alone. Always the same list, in
    the same order (snapshots are matched to it by position)."""
    from . import exercises, judge
    grader = [sys.modules[__package__], sys.modules[__name__], judge, exercises, exercises.base, *exercises.PARTS]
    return [m.__dict__ for m in grader] + [torch.__dict__, torch.nn.functional.__dict__, torch.Tensor.__dict__]


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
    instead, gptcourse/grading/worker.py.)"""
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
