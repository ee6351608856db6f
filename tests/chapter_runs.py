"""The chapters, run in the Colab simulation in the background of the test session.

`make test` executes every chapter once, in the Colab simulation under nbval
(tests/test_colab.py). Each kernel is pinned to one thread, so on a 2-core
machine two things fit side by side: one lane runs chapters from the start
of the session while the other tests use the other core; when the session
reaches the chapter tests (collected last, see conftest.py) the main process
only waits, and a second lane joins. The outputs do not depend on this: one
thread each, fixed kernels (scripts/pinned_cpu.py).

GPTCOURSE_NOTEBOOK_JOBS sets the number of lanes (default min(2, CPUs));
1 runs the chapters one after another, beside the other tests.
"""
import datetime
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
TEST_NAME = "test_chapter_runs_in_a_fresh_colab_runtime"
JOBS = max(1, int(os.environ.get("GPTCOURSE_NOTEBOOK_JOBS", min(2, os.cpu_count() or 1))))


def recorded_seconds(notebook):
    """How long the stored run of `notebook` took, from its cells' execution
    timestamps (0 when it has none): to start the longest chapters first."""
    total = 0.0
    for cell in json.loads(Path(notebook).read_text()).get("cells", []):
        timing = cell.get("metadata", {}).get("execution", {})
        try:
            start = datetime.datetime.fromisoformat(timing["iopub.execute_input"].rstrip("Z"))
            end = datetime.datetime.fromisoformat(timing["shell.execute_reply"].rstrip("Z"))
        except (KeyError, ValueError):
            continue
        total += max(0.0, (end - start).total_seconds())
    return total


class ChapterRuns:
    """Runs `notebooks` through `sim.run` in background lanes, longest first.
    `result(nb)` adds the remaining lanes (the caller will only wait now) and
    returns nb's result dict, or raises what its run raised."""

    def __init__(self, sim, notebooks, jobs=JOBS, timeout=900):
        self.sim, self.jobs, self.timeout = sim, jobs, timeout
        self.todo = sorted(notebooks, key=recorded_seconds, reverse=True)
        self.futures = {nb: Future() for nb in notebooks}
        self.lock = threading.Lock()
        self.lanes = []
        self._add_lane()

    def _add_lane(self):
        lane = threading.Thread(target=self._work, daemon=True, name=f"chapter-lane-{len(self.lanes)}")
        self.lanes.append(lane)
        lane.start()

    def _work(self):
        while True:
            with self.lock:
                if not self.todo:
                    return
                notebook = self.todo.pop(0)
            future = self.futures[notebook]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.sim.run(notebook, timeout=self.timeout))
            except BaseException as e:          # the test that waits for it reports it
                future.set_exception(e)

    def result(self, notebook):
        with self.lock:
            while len(self.lanes) < self.jobs:
                self._add_lane()
        return self.futures[notebook].result()

    def cancel(self):
        """Drop what has not started (a session that ends early)."""
        with self.lock:
            for notebook in self.todo:
                self.futures[notebook].cancel()
            self.todo.clear()
