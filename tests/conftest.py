import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny: threads gain nothing, and on a busy 2-core
    machine every multi-threaded op waits for a descheduled thread (30x slower
    seen here). The notebooks run in their own kernels and keep their threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
