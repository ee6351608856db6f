"""Run a notebook's code cells in this Python process (no Jupyter needed) and
compare what each cell prints with the stdout stored in the notebook.

    PYTHONPATH=. python scripts/run_notebook_code.py chapters/03_scaled_dot_product_attention.ipynb

For machines without a Jupyter stack (a lent GPU, say): figures go to the Agg
backend; cells tagged nbval-ignore-output (widgets, timings) run but are not
compared (ipywidgets must be importable, or those cells fail).
Exit status 1 if a cell raises; printed differences are reported, not fatal,
since a GPU may legitimately differ in a last digit or in the device line.
"""
import contextlib
import io
import json
import sys
import time
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")


class _Anything:
    """Stands in for any widget: accepts every argument, has every attribute."""
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()


try:                                       # widgets need a browser anyway: stub them if absent
    import ipywidgets  # noqa: F401
except ImportError:
    stub = types.ModuleType("ipywidgets")
    def _attribute(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything
    stub.__getattr__ = _attribute
    sys.modules["ipywidgets"] = stub


class CellError(Exception):
    """A code cell raised; `cell` is its index in the notebook (the cause is chained)."""

    def __init__(self, path, cell):
        super().__init__(f"{path}: cell {cell} raised")
        self.cell = cell


def run_cells(path):
    """Run the notebook's code cells in order, in one namespace, printing nothing.

    Cells tagged nbval-skip are skipped; the others run. Yields, for each
    cell whose output nbval would compare (not nbval-ignore-output: widgets,
    timings), (index, stored stdout, stdout now). A cell that raises ends
    the run with CellError.
    """
    nb = json.loads(Path(path).read_text())
    namespace = {"__name__": "__main__", "display": print}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        if "nbval-skip" in tags:
            continue
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile("".join(cell["source"]), f"{path}:cell{i}", "exec"), namespace)
        except Exception as err:
            raise CellError(path, i) from err
        if "nbval-ignore-output" in tags:
            continue
        stored = "".join("".join(o["text"]) for o in cell.get("outputs", [])
                         if o.get("output_type") == "stream" and o.get("name") == "stdout")
        yield i, stored, buffer.getvalue()


def run(path):
    same = differ = 0
    start = time.perf_counter()
    for i, stored, now in run_cells(path):
        if now == stored:
            same += 1
        else:
            differ += 1
            print(f"--- cell {i} differs\n    stored: {stored!r}\n    now:    {now!r}")
    print(f"{path}: ran in {time.perf_counter() - start:.1f} s; "
          f"{same} cells print what is stored, {differ} differ")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        run(p)
