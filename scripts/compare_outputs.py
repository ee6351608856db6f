"""Run a notebook's code cells in this Python process (no Jupyter needed) on
whatever device the chapter picks (the GPU on a GPU machine) and compare
what each cell prints with the stdout stored in the notebook, with
tolerances that make sense on a GPU.

    PYTHONPATH=. python scripts/compare_outputs.py chapters/11_gpt_from_scratch.ipynb
    PYTHONPATH=. python scripts/compare_outputs.py --rtol 0.05 --atol 0.02 NB.ipynb

The stored outputs come from a CPU in fp32 with one thread; a GPU trains
under bf16 autocast (8-bit mantissa: about 0.4% per rounding), sums in
another order, and its random generators differ from the CPU's. So, per
cell (cells tagged nbval-skip are skipped, nbval-ignore-output run but are
not compared, as under nbval):
  - device names are normalised (cpu, cuda, cuda:0, mps -> <device>;
    ", device='cuda:0'" in a printed tensor is dropped);
  - integers (no decimal point) must be equal: counts, shapes, steps;
  - decimals may differ by atol + rtol * |stored|: losses, accuracies;
  - the text between the numbers must be equal.
Verdict per notebook, one line: PASS (every cell the same or within
tolerance), CHECK (only text differs, e.g. text sampled from a model that
trained in bf16: look at the printed difference), FAIL (a cell raised or a
number is out of tolerance). Exit status 1 on FAIL, else 0.
"""
import argparse
import math
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# run_notebook_code: the Agg backend, a stand-in for ipywidgets if absent, the cell runner
from run_notebook_code import CellError, run_cells  # noqa: E402

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?\b(?:nan|inf)\b")
DEVICE = [(re.compile(r",\s*device='(?:cuda|mps)(?::\d+)?'"), ""),
          (re.compile(r"\b(?:cuda(?::\d+)?|mps|cpu)\b"), "<device>")]


def normalise(text):
    for pattern, repl in DEVICE:
        text = pattern.sub(repl, text)
    return text


def split_numbers(text):
    """(text pieces between numbers, the numbers as strings).

    >>> split_numbers("loss 1.25 at step 30")
    (['loss ', ' at step ', ''], ['1.25', '30'])
    """
    return NUMBER.split(text), NUMBER.findall(text)


def _is_integer(s):
    return not any(c in s.lower() for c in ".ena")


def compare(stored, now, rtol=0.05, atol=0.02):
    """'same', 'close' (numbers within tolerance), 'numbers' (same text, a
    number out of tolerance) or 'text' (the words differ).

    >>> compare("loss 1.46", "loss 1.47"), compare("loss 1.46", "loss 1.66")
    ('close', 'numbers')
    >>> compare("12 steps", "13 steps"), compare("True", "False")
    ('numbers', 'text')
    """
    stored, now = normalise(stored), normalise(now)
    if stored == now:
        return "same"
    (text_a, nums_a), (text_b, nums_b) = split_numbers(stored), split_numbers(now)
    if text_a != text_b or len(nums_a) != len(nums_b):
        return "text"
    for a, b in zip(nums_a, nums_b):
        if _is_integer(a) and _is_integer(b):
            if int(a) != int(b):
                return "numbers"
            continue
        x, y = float(a), float(b)
        if math.isnan(x) and math.isnan(y):
            continue
        if not abs(x - y) <= atol + rtol * abs(x):       # False for nan vs number
            return "numbers"
    return "close"


def run(path, rtol=0.05, atol=0.02, show=3):
    """Run one notebook; print its differences and a verdict line. Returns the verdict."""
    counts = {"same": 0, "close": 0, "numbers": 0, "text": 0}
    shown, start = 0, time.perf_counter()
    try:
        for i, stored, now in run_cells(path):
            verdict = compare(stored, now, rtol, atol)
            counts[verdict] += 1
            if verdict in ("numbers", "text") and shown < show:
                shown += 1
                print(f"--- cell {i}: {verdict} differ\n    stored: {stored[:600]!r}\n"
                      f"    now:    {now[:600]!r}")
    except CellError as err:
        traceback.print_exc()
        print(f"FAIL {path}: cell {err.cell} raised ({time.perf_counter() - start:.0f} s)")
        return "FAIL"
    verdict = "FAIL" if counts["numbers"] else "CHECK" if counts["text"] else "PASS"
    print(f"{verdict} {path}: {counts['same']} cells same, {counts['close']} within tolerance, "
          f"{counts['numbers']} numbers out of tolerance, {counts['text']} text differs "
          f"(rtol {rtol}, atol {atol}; {time.perf_counter() - start:.0f} s)", flush=True)
    return verdict


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--rtol", type=float, default=0.05, help="relative tolerance for decimals")
    parser.add_argument("--atol", type=float, default=0.02, help="absolute tolerance for decimals")
    args = parser.parse_args()
    verdicts = [run(nb, args.rtol, args.atol) for nb in args.notebooks]
    sys.exit(1 if "FAIL" in verdicts else 0)
