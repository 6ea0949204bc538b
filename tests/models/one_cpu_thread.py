"""A fixture for tests of forms built from many tiny batched ops (triangular solves, gathers):
on a busy 2-core CPU, torch's thread pool makes them ~100x slower than one thread does.

Use: ``from one_cpu_thread import one_cpu_thread  # noqa: F401`` and
``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``.
"""

import pytest
import torch


@pytest.fixture
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
