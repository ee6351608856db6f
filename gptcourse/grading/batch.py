"""Batch grading: a folder of submitted notebooks, each graded in its own sandboxed worker.

    python -m gptcourse.grading grade SUBMISSIONS/ --out grades.csv

    grade_folder(folder, out_csv)  every *.ipynb of folder -> grades.csv and grades.json
    grade_one(name, nb_text)       one notebook -> its report; never raises

For each notebook: the clean room (gptcourse.grading.cleanroom) reads the
notebook's text here and keeps, per exercise, only the statements the graded
function needs; make_job() packs those programs with inputs drawn from a secret
seed; the worker (gptcourse/grading/worker.py, copied alone into the sandbox)
runs them under bubblewrap (gptcourse.grading.sandbox); read_records() loads
the outputs it sends back (torch.load(weights_only=True), size-capped), and
the judge (gptcourse.grading.judge) compares them with the reference here.
Nothing the worker says about itself decides a grade.

Submissions are read before anything runs (links not followed, FIFOs not
waited on); the CSV (one row per student, formula-safe) and the JSON (every
test's feedback) are written atomically.
"""
import errno
import json
import math
import os
import stat
import sys

import torch

from .exercises import selected_exercises
from .judge import case_inputs, fresh_seed, score
from .monitor import TIME_LIMIT_S
from .sandbox import WORKER_NAME

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


WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
UNAVAILABLE = " is not available while grading"       # the worker's blocked kernels say this


def make_stub_dir(folder):
    """Fill `folder` with what the sandbox sees at /grader: the worker (WORKER_FILE, as
    sandbox.WORKER_NAME), nothing else."""
    import shutil
    shutil.copy(WORKER_FILE, os.path.join(folder, WORKER_NAME))
    os.chmod(os.path.join(folder, WORKER_NAME), 0o644)
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


def judge_record(exercise, record, n_cases):
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
            "exercises": {k: score(e, [("error", status)] * len(e.cases), [()] * len(e.cases))
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
    # what runs is decided here, on the notebook's text (gptcourse/grading/cleanroom.py)
    rooms = {k: clean_room(cells, e.function, e.forbidden_ops) for k, e in EXERCISES.items()}
    outcomes = _refused(rooms, inputs)
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
        report["status"] = _run_status(run, cap, missing, timeout_s, memory_mb)
        for key in runnable:
            n = len(inputs[key])
            outcomes[key] = judge_record(EXERCISES[key], records[key], n) if key in records else \
                [("error", report["status"])] * n
        report["limits"] = run["limits"]
    for key, exercise in EXERCISES.items():
        report["exercises"][key] = score(exercise, outcomes[key], inputs[key])
    return report


def _refused(rooms, inputs):
    """{key: outcomes} of the exercises the clean room refuses: none of their code runs."""
    outcomes = {}
    for key, room in rooms.items():
        refusal = room.refusal()
        if refusal is not None:
            status, why = refusal
            if status == "error" and not why.startswith("no function named"):
                why = f"not run: {why}"
            outcomes[key] = [(status, why)] * len(inputs[key])
    return outcomes


def _run_status(run, cap, missing, timeout_s, memory_mb):
    """The report's status after the worker's run: "graded", or why results are missing."""
    if run["result_bytes"] > cap:
        return (f"results too large ({run['result_bytes']:,} bytes; this notebook's answers "
                f"need at most {cap:,}): not read")
    if not missing:
        return "graded"
    last = run["stderr"].decode(errors="replace").strip().splitlines()[-1:] or [""]
    if run["timed_out"]:
        return f"stopped after the time limit of {timeout_s:g} s"
    if run["oom"]:
        return f"killed: the memory limit of {memory_mb} MB was reached"
    if run["returncode"] != 0:
        return f"the grading process failed (exit code {run['returncode']}): {last[0][:160]}"
    return "results missing"


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
    """Write text to path so that readers see the old file or the new one, never half."""
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    parser = argparse.ArgumentParser(prog="python -m gptcourse.grading",
                                     description=sys.modules[__package__].__doc__.split("\n")[0])
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
