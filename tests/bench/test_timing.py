"""attnbench.timing on the GPU: a long call still gets MIN_REPS timed repetitions."""

import pytest
import torch

from attnbench import timing


@pytest.mark.cuda
def test_a_long_call_is_timed_at_least_min_reps_times():
    calls = []

    def slow() -> None:
        calls.append(None)
        torch.cuda._sleep(20_000_000)  # ~10 ms of spinning at H100/H200 clocks

    result = timing.measure(slow, torch.device("cuda"))
    assert len(calls) >= timing.MIN_REPS and result.median_ms > 3
