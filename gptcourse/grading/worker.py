"""The untrusted side of batch grading: runs INSIDE the sandbox, one process per
submitted notebook. Standalone on purpose (only the standard library and
torch): the sandbox holds this file and nothing of the course's references.

    python grading_worker.py  < job   (job: one JSON line, then torch.save bytes)

(gptcourse.grading.batch.make_stub_dir copies this file, gptcourse/grading/worker.py,
alone into the sandbox as /grader/grading_worker.py.)

The JSON line holds the number of the file descriptor that receives the
results and the limits. The bytes that follow hold, per exercise, the
program the grader accepted (gptcourse/grading/cleanroom.py: the graded function and
the definitions it uses, read from the notebook's text and vetted; never the
notebook's other cells), the function's name, the ATen operators the
exercise asks the student to write themselves, and the inputs the grader
drew from a secret seed.

For each exercise, in a namespace of its own:
  1. the forbidden operators are made unavailable below Python: every ATen
     operator whose name contains one of the exercise's patterns gets a kernel
     (torch.library, for every dispatch key it has a kernel for) that raises
     "... is not available while grading", so no route to PyTorch's ready-made
     version (a function, a module, torch.ops, a thread) reaches its code;
  2. the program runs with builtins that have no eval, exec, getattr, open or
     __import__ beyond the allowed modules (a second line behind the vetting),
     and every attribute it reads goes through guarded_getattr (cleanroom
     rewrites `obj.name` into a call of it), which refuses to read from, or
     hand out, any module but the allowed ones;
  3. the function is called on a deep copy of each input, each call under a
     CPU-time clock (SIGALRM; the sandbox's wall clock ends what never yields);
  4. the outputs, as plain data, go to the result descriptor as one record per
     exercise (8-byte length, then torch.save bytes), so an exercise that hangs
     costs only itself and those after it.

It holds no secret and decides nothing. The grader trusts only the outputs,
compared outside with its own reference; a submission that managed to write
records of its own could only send answers it computed, which is the job.
"""
import builtins
import copy
import io
import json
import os
import signal
import struct
import sys


class CallTimeout(BaseException):
    """A graded call ran out of time (BaseException: `except Exception` in the student's code does not hide it)."""


def block_operators(patterns, message_tail="this exercise asks you to write it yourself"):
    """Make every ATen operator whose name contains one of `patterns` raise; returns
    the torch.library.Library holding the raising kernels (destroy it to restore)."""
    import warnings
    import torch
    if not patterns:
        return None
    library = torch.library.Library("aten", "IMPL")
    keys = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional",
            "CPU", "CUDA", "Meta", "AutogradCPU", "AutogradCUDA", "QuantizedCPU", "SparseCPU", "NestedTensorCPU")
    names = [n for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::") and any(p in n for p in patterns)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # "overriding a previously registered kernel"
        for name in names:
            for key in keys:
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                    library.impl(name[len("aten::"):], _raiser(name, message_tail), key)
    return library


def _raiser(name, tail):
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{name} is not available while grading: {tail}")
    return unavailable


def safe_builtins(blocked, allowed_modules):
    """The builtins a graded program sees: without the blocked names and the special
    ones, and with an __import__ that knows only the allowed modules."""
    real_import = builtins.__import__

    def restricted_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0 or name not in allowed_modules:
            raise ImportError(f"graded code may not import {name}")
        module = real_import(name, globals, locals, fromlist, level)
        for item in fromlist or ():                 # `from torch import serialization`: a module not allowed
            foreign = _foreign_module(getattr(module, item, None), allowed_modules)
            if foreign:
                raise ImportError(f"graded code may not import the module {foreign}")
        return module
    table = {k: v for k, v in builtins.__dict__.items() if k not in blocked and not k.startswith("_")}
    table.update(__build_class__=builtins.__build_class__, __import__=restricted_import, __name__="builtins",
                 _grader_attr=guarded_getattr(allowed_modules))
    return table


def guarded_getattr(allowed_modules):
    """The attribute read of graded code (cleanroom rewrites `obj.name` into a call
    of this): it refuses to read from a module outside the allowed ones, or to hand
    one out, so torch.os, fractions.sys and the like stay out of reach."""
    real_getattr = getattr

    def attr(obj, name):
        foreign = _foreign_module(obj, allowed_modules)
        if not foreign:
            obj = real_getattr(obj, name)
            foreign = _foreign_module(obj, allowed_modules)
        if foreign:
            raise AttributeError(f"graded code may not use the module {foreign}")
        return obj
    return attr


def _foreign_module(value, allowed_modules):
    """The name of `value` when it is a module outside the allowed ones, else None."""
    if not isinstance(value, type(sys)):
        return None
    name = getattr(value, "__name__", None)
    return None if name in allowed_modules else str(name)


def plain(value):
    """Outputs as data the grader can load with torch.load(weights_only=True)."""
    import torch
    if type(value) is torch.Tensor or type(value) is torch.nn.Parameter:
        value = value.detach()
        if value.layout != torch.strided:
            value = value.to_dense()
        return value.cpu().clone()
    if type(value) in (tuple, list):
        items = [plain(v) for v in value]
        return tuple(items) if type(value) is tuple else items
    if type(value) in (bool, int, float, str, type(None)):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return plain(value.item())
    raise TypeError(f"returned a {type(value).__module__}.{type(value).__name__}")


def _describe_error(e):
    if isinstance(e, NotImplementedError):
        return "not implemented", "not implemented yet (the stub still raises NotImplementedError)"
    if isinstance(e, RecursionError):
        return "error", "raised RecursionError"
    return "error", f"raised {type(e).__name__}: {str(e)[:200]}"


def _clocked(seconds, describe, error):
    """describe(error) under a clock: str(error) may run the submission's __str__."""
    try:
        return timed(seconds, lambda: describe(error))
    except BaseException:
        return None


def timed(seconds, work):
    """work() under a clock of `seconds` (SIGALRM in this, the main, thread)."""
    def on_alarm(signum, frame):
        raise CallTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return work()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def grade_exercise(task, settings, table):
    """Run one exercise's program and calls; returns {"defined": str, "cases": [[status, value], ...]}."""
    namespace = {"__builtins__": table, "__name__": "__main__"}
    library = block_operators(task["block"])
    try:
        try:
            timed(settings["cell_timeout"], lambda: exec(compile(task["source"], "<notebook>", "exec"), namespace))
        except CallTimeout:
            return {"defined": f"the definitions did not finish within {settings['cell_timeout']:g} s", "cases": []}
        except BaseException as e:
            text = _clocked(settings["cell_timeout"], lambda e: f"{type(e).__name__}: {str(e)[:160]}", e)
            return {"defined": f"the definitions raised {text or 'an exception that could not be described'}",
                    "cases": []}
        fn = namespace.get(task["function"])
        if not callable(fn):
            return {"defined": f"{task['function']} is not a function", "cases": []}
        cases = []
        for args in task["inputs"]:
            try:
                args = copy.deepcopy(args)
                value = timed(settings["call_timeout"], lambda: fn(*args))
            except CallTimeout:
                cases.append(["timeout", f"did not return within {settings['call_timeout']:g} s (an endless loop?)"])
                break
            except BaseException as e:                    # SystemExit and KeyboardInterrupt are errors too
                cases.append(list(_clocked(settings["call_timeout"], _describe_error, e)
                                  or ("error", "raised an exception that could not be described")))
                continue
            try:
                cases.append(["ok", plain(value)])
            except Exception as e:
                cases.append(["error", str(e)[:200]])
        return {"defined": "ok", "cases": cases}
    finally:
        if library is not None:
            library._destroy()


def main():
    raw = sys.stdin.buffer.read()
    os.close(0)
    header, _, body = raw.partition(b"\n")
    settings = json.loads(header)
    result_fd = settings["result_fd"]
    import resource
    if settings.get("rlimit_mb"):                   # a per-process address-space limit
        limit = settings["rlimit_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if settings.get("cpu_s"):                       # CPU seconds for the whole run
        resource.setrlimit(resource.RLIMIT_CPU, (settings["cpu_s"], settings["cpu_s"] + 5))
    import torch
    torch.set_num_threads(1)
    job = torch.load(io.BytesIO(body), weights_only=True)
    del raw, body
    table = safe_builtins(set(job["blocked_names"]), set(job["allowed_modules"]))
    sys.stdout = sys.stderr = open(os.devnull, "w")  # a program's prints go nowhere
    for key, task in job["exercises"].items():
        result = grade_exercise(task, settings, table)
        buffer = io.BytesIO()
        torch.save({"exercise": key, **result}, buffer)
        record = buffer.getvalue()
        data = memoryview(struct.pack("<Q", len(record)) + record)
        while data:
            data = data[os.write(result_fd, data):]
    os.close(result_fd)
    os._exit(0)


if __name__ == "__main__":
    main()
