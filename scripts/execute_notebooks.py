"""Execute notebooks top to bottom and save them with their outputs.

    python scripts/execute_notebooks.py chapters/03_scaled_dot_product_attention.ipynb

Runs each in its own folder with the `python3` kernel, keeps the widget state
(so widgets render in the static book), and prints the wall time of each.
The stored outputs are what nbval (strict) later compares against.
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path):
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    print(f"{path}: executed in {seconds:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        execute(p)
