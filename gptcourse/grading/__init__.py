"""Graded exercises: honest feedback for students, safe batch grading for instructors.

Students, in an exercise notebook:

    from gptcourse.grading import check
    check("sdpa", scaled_dot_product_attention)

    -> runs the function on fresh random inputs of several shapes and dtypes
       and on edge cases, compares with the reference, prints PASS/FAIL per
       test, the points, and a hint for each usual mistake it recognises.

Instructors, on a folder of submitted notebooks:

    python -m gptcourse.grading grade SUBMISSIONS/ --out grades.csv

    -> runs each notebook under bubblewrap (gptcourse/grading/sandbox.py: user nobody,
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
    ran the notebook: gptcourse/grading/cleanroom.py reads the notebook's text here
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
  * the process: bubblewrap (gptcourse/grading/sandbox.py) as user nobody, no
    network, a read-only root, sized tmpfs, a seccomp filter that refuses
    new processes (threads excepted), namespaces, ptrace and other
    processes' memory; a cgroup (gptcourse/grading/cgroups.py, v2 or v1) for memory,
    tasks and CPU share, or per-process rlimits where no cgroup can be made;
    a wall clock that kills the whole tree.

check() in the student's own kernel is feedback, not a defence: it records the
operators a call executes (TorchFunctionMode, TorchDispatchMode) and calls of
the course's references (a profiler), and any cell can fool it; the batch
grade is what counts.

The package, module by module, in the order a submission meets them:

    exercises/   the graded functions: references, test cases, usual mistakes and
                 their hints, what the student may not call (one module per part
                 of the book; EXERCISES is all of them)
    judge        compare outputs, score them into points and hints; check() and
                 grade() for students
    monitor      check()'s call monitor in the student's kernel (time limit,
                 forbidden calls, the grader's namespaces watched)
    batch        grade_one, grade_folder, the CSV and JSON reports, the command line
    cleanroom    the statements of a notebook a graded function needs, vetted
    worker       the process that runs them, inside the sandbox (standalone:
                 standard library and torch only, copied alone into the sandbox)
    sandbox      bubblewrap and seccomp around that process
    cgroups      its memory, task and CPU limits (cgroup v2 or v1)
    gradescope   Gradescope's results.json, an LMS gradebook CSV, the autograder
                 (python -m gptcourse.grading.gradescope); bundle: its zip
"""
from .batch import (FORMULA_START, UNAVAILABLE, WORKER_FILE, csv_safe, display_name, grade_folder, grade_one,
                    judge_record, main, make_job, make_stub_dir, read_records, read_submission, result_cap, ungraded)
from .batch import _write_atomically  # noqa: F401  (gptcourse.grading._write_atomically, as before the split)
from .exercises import EXERCISES, selected_exercises
from .judge import case_inputs, check, compare, format_result, fresh_seed, grade, grader_note, run_cases, score
from .monitor import TIME_LIMIT_S, ForbiddenCall, TimeLimit, call_guarded

__all__ = ["FORMULA_START", "UNAVAILABLE", "WORKER_FILE", "csv_safe", "display_name",
           "grade_folder", "grade_one", "judge_record", "main", "make_job", "make_stub_dir", "read_records",
           "read_submission", "result_cap", "ungraded", "EXERCISES", "selected_exercises", "case_inputs",
           "check", "compare", "score", "format_result", "fresh_seed", "grade", "grader_note", "run_cases",
           "TIME_LIMIT_S", "ForbiddenCall", "TimeLimit", "call_guarded"]
