import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import colab_sim  # noqa: E402
import pinned_cpu  # noqa: E402

# The kernels nbval starts (the exercises) inherit this process's environment:
# pin it here too, so that a bare `pytest` compares under the same settings as
# `make test` and `make outputs` (scripts/pinned_cpu.py, the one place). This
# process's own torch is already loaded by then for its own tests; only the
# kernels it starts need the pins.
pinned_cpu.apply()

import torch  # noqa: E402

from chapter_runs import CHAPTERS, TEST_NAME, ChapterRuns  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny: threads gain nothing, and on a busy 2-core
    machine every multi-threaded op waits for a descheduled thread (30x slower
    seen here). The notebooks run in their own kernels, pinned to one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_host = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a notebook's stored output differs (nbval), say where it ran: CPU,
    torch, CPU capability and the pinned settings as a kernel here sees them,
    and where the outputs were recorded, next to nbval's diff."""
    outcome = yield
    report = outcome.get_result()
    path = str(getattr(item, "path", item.fspath))
    if report.when != "call" or not report.failed or not path.endswith(".ipynb"):
        return
    if "text" not in _host:
        try:
            _host["text"] = "this run's kernel:\n" + pinned_cpu.describe(pinned_cpu.probe())
        except Exception as e:              # never hide nbval's own report
            _host["text"] = f"this run's kernel: could not be probed ({e})"
    report.sections.append(("host", _host["text"] + "\n" + pinned_cpu.recorded_on(path)))


def pytest_collection_modifyitems(session, config, items):
    """The chapter tests last: their chapters run in the background meanwhile."""
    items.sort(key=lambda item: getattr(item, "originalname", None) == TEST_NAME)


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """The Colab simulation's preinstalled packages and gptcourse's wheel, made once."""
    return colab_sim.Simulation(tmp_path_factory.mktemp("colab"))


@pytest.fixture(scope="session", autouse=True)
def chapter_runs(request):
    """When the session has chapter tests, their chapters start running in the
    Colab simulation with the session's first test (tests/chapter_runs.py)."""
    wanted = [item.callspec.params["notebook"] for item in request.session.items
              if getattr(item, "originalname", None) == TEST_NAME]
    if not wanted:
        yield None
        return
    runs = ChapterRuns(request.getfixturevalue("sim"), [nb for nb in CHAPTERS if nb in wanted])
    yield runs
    runs.cancel()
