"""The Gradescope autograder bundle: one zip per exercise notebook.

    build_bundle(out_zip, notebook)   setup.sh, run_autograder and the course's wheel

    python -m gptcourse.grading.gradescope bundle --notebook 03_scaled_dot_product_attention --out autograder.zip

setup.sh (run once by Gradescope, as root) installs bubblewrap and a virtual
environment with torch's CPU build, numpy, tqdm, pyseccomp and the course's own
wheel, built here from this checkout; run_autograder (run once per submission)
calls `python -m gptcourse.grading.gradescope autograde` with the limits baked in
and always leaves a results.json. The layout follows Gradescope's specification
(see gptcourse.grading.gradescope).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SETUP_SH = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image
# (written by `python -m gptcourse.grading.gradescope bundle`).
set -euo pipefail
ROOT="${GPTCOURSE_AUTOGRADER_ROOT:-/autograder}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# bubblewrap: the sandbox every submission runs in (gptcourse/grading/sandbox.py)
apt-get install -y -q bubblewrap python3 python3-venv
python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/python" -m pip install -q --upgrade pip
# torch's CPU build (Gradescope's machines have no GPU; the default wheel pulls CUDA)
"$ROOT/venv/bin/python" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
"$ROOT/venv/bin/python" -m pip install -q numpy tqdm pyseccomp
# the course itself, without its other dependencies (plots, chat model, server)
"$ROOT/venv/bin/python" -m pip install -q --no-deps "$ROOT"/source/{wheel}
"$ROOT/venv/bin/python" -c "import gptcourse.grading, torch; print('autograder ready; torch', torch.__version__)"
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope's autograder for exercises/{notebook}.ipynb, written by
# `python -m gptcourse.grading.gradescope bundle`. Gradescope copies it to
# /autograder/run_autograder and runs it once per submission; it writes
# /autograder/results/results.json whatever happens.
ROOT="${GPTCOURSE_AUTOGRADER_ROOT:-/autograder}"
PYTHON="${GPTCOURSE_AUTOGRADER_PYTHON:-$ROOT/venv/bin/python}"
mkdir -p "$ROOT/results"
rm -f "$ROOT/results/results.json"
cd "$ROOT" || exit 1
"$PYTHON" -E -s -m gptcourse.grading.gradescope autograde --root "$ROOT" {args}
code=$?
if [ ! -s "$ROOT/results/results.json" ]; then
    # the grader itself failed (not the student's notebook): say so, with score 0
    message="The autograder failed before grading your notebook (exit code $code); your instructor's log says why."
    printf '{"score": 0, "output": "%s", "visibility": "visible", "stdout_visibility": "hidden"}\\n' \\
        "$message" > "$ROOT/results/results.json"
fi
exit $code
"""


def _project_root():
    """The checkout gptcourse is imported from (where pyproject.toml is), or raise ValueError."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "gptcourse"' not in pyproject.read_text(encoding="utf-8"):
        raise ValueError(f"the bundle is built from a checkout of the course (no pyproject.toml of gptcourse "
                         f"in {root})")
    return root


def build_wheel(dest):
    """gptcourse's wheel, built from this checkout (pyproject.toml, README.md and
    gptcourse/**/*.py copied to a scratch folder) with `pip wheel --no-deps
    --no-build-isolation` (offline: setuptools must be installed). Returns its path
    in folder dest. Raises ValueError outside a checkout, RuntimeError if pip fails."""
    root = _project_root()
    src = os.path.join(dest, "src")
    os.makedirs(os.path.join(src, "gptcourse"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, os.path.join(src, name))
    for path in sorted((root / "gptcourse").rglob("*.py")):          # the package and its subpackages
        target = os.path.join(src, path.relative_to(root))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(path, target)
    out = os.path.join(dest, "wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", out, src], capture_output=True, text=True, cwd=dest)
    wheels = [f for f in os.listdir(out) if f.startswith("gptcourse-") and f.endswith(".whl")] \
        if os.path.isdir(out) else []
    if run.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"building gptcourse's wheel failed (pip exit code {run.returncode}): "
                           f"{(run.stderr or run.stdout).strip()[-500:]}")
    return os.path.join(out, wheels[0])


def _zip_add(archive, name, data, executable=False):
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
    info.external_attr = ((0o100755 if executable else 0o100644) & 0xFFFF) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def build_bundle(out_zip, notebook, sandbox=True, timeout_s=300, memory_mb=3072, cell_timeout_s=60,
                 call_timeout_s=10):
    """Write a Gradescope autograder zip for one exercise notebook to out_zip.

    notebook: an exercise notebook's name, e.g. "03_scaled_dot_product_attention".
    The zip holds, at its root: setup.sh (installs bubblewrap, python3-venv, and a
    virtual environment in /autograder/venv with torch, numpy, tqdm, pyseccomp and
    the course's wheel), run_autograder (grades the submission's notebook with
    grade_one and these limits and writes results.json) and the wheel. sandbox=False
    (only where Gradescope's machines refuse bubblewrap's namespaces) bakes
    --unsafe-no-sandbox in; the results record it. Returns out_zip.
    Raises ValueError for an unknown notebook or a limit that is not positive.
    """
    from .exercises import selected_exercises
    selected_exercises(notebook)                       # ValueError for an unknown notebook
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("cell_timeout_s", cell_timeout_s),
                        ("call_timeout_s", call_timeout_s)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    args = (f"--notebook {notebook} --timeout {timeout_s:g} --memory-mb {int(memory_mb)} "
            f"--cell-timeout {cell_timeout_s:g} --call-timeout {call_timeout_s:g}"
            + ("" if sandbox else " --unsafe-no-sandbox"))
    with tempfile.TemporaryDirectory(prefix="gptcourse-bundle-") as scratch:
        wheel = build_wheel(scratch)
        folder = os.path.dirname(os.path.abspath(out_zip))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".zip")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w") as archive:
                _zip_add(archive, "setup.sh", SETUP_SH.replace("{wheel}", os.path.basename(wheel)), True)
                _zip_add(archive, "run_autograder",
                         RUN_AUTOGRADER.replace("{notebook}", notebook).replace("{args}", args), True)
                with open(wheel, "rb") as f:
                    _zip_add(archive, os.path.basename(wheel), f.read())
            os.replace(tmp, out_zip)
        except BaseException:
            os.unlink(tmp)
            raise
    return out_zip
