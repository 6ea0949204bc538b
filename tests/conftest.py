"""Test setup: on a machine without CUDA, Triton kernels run under its interpreter.

TRITON_INTERPRET must be set before triton.jit decorates any kernel, so it is set here,
before any test module imports attnbench.kernels.
"""

import os
import random
import sys
from pathlib import Path

import pytest
import torch

# `python3 -m pytest` puts the repository's root first on sys.path, where our kernels/ folder would
# be imported as the top-level package `kernels` in place of Hugging Face's (transformers >= 5.25
# imports it); attnbench is installed, so the tests need no root on the path.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_generators():
    """Every test starts from the same generator state, whatever ran before it: a test that sets
    no seed of its own still passes or fails alone as in the whole suite."""
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ATTNBENCH_FAILURES_NOW=1, a failure's traceback is printed as it happens, not in the
    summary at the end: a GPU run cut by its time limit still says why its tests failed."""
    if report.failed and os.environ.get("ATTNBENCH_FAILURES_NOW") == "1":
        print(f"\n{report.nodeid}\n{report.longreprtext}", flush=True)
