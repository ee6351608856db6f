"""Execute notebooks top to bottom and save them with their outputs.

    make outputs NB=chapters/03_scaled_dot_product_attention.ipynb
    (= python scripts/pinned_cpu.py -- python scripts/execute_notebooks.py NB...)

Runs each in its own folder with the `python3` kernel, keeps the widget state
(so widgets render in the static book), and prints the wall time of each.
The stored outputs are what nbval (strict) later compares against, so they
are recorded only under the pinned CPU settings (scripts/pinned_cpu.py): the
script refuses to run without them, checks them inside the kernel, and notes
the host in the notebook's metadata (shown when a comparison fails).
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pinned_cpu  # noqa: E402


def check_pinned():
    """The pinned settings, as a kernel started from here sees them; exits if not in force."""
    missing = pinned_cpu.missing()
    if missing:
        sys.exit("execute_notebooks: the pinned CPU settings are not set (" + ", ".join(missing) +
                 "); record outputs with `make outputs` (scripts/pinned_cpu.py -- ...)")
    seen = pinned_cpu.probe()
    problems = pinned_cpu.in_force(seen)
    if problems:
        sys.exit("execute_notebooks: pinned settings not in force: " + "; ".join(problems))
    return seen


def execute(path, host):
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata.setdefault("gptcourse", {})["outputs_recorded_on"] = host
    nbformat.write(nb, path)
    print(f"{path}: executed in {seconds:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    host = pinned_cpu.summary(check_pinned())
    print(f"recording under the pinned settings on {host}")
    for p in sys.argv[1:]:
        execute(p, host)
