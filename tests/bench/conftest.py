"""Harness tests run tiny cases: CPU timing gets a short minimum run time."""

import pytest

from attnbench import timing


@pytest.fixture(autouse=True)
def quick_cpu_timing(monkeypatch):
    monkeypatch.setattr(timing, "CPU_MIN_RUN_TIME_S", 0.005)
