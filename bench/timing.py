"""Timing one callable: median, p20 and p80 latency in milliseconds.

CUDA: triton.testing.do_bench with quantiles, which flushes the L2 cache before every
repetition and resets the given gradients to None outside the timed region; at least
MIN_REPS repetitions.
CPU: torch.utils.benchmark's blocked_autorange; quantiles over its blocks.
Never called on the Triton interpreter (the sweep marks triton on CPU unsupported).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

QUANTILES = [0.5, 0.2, 0.8]
MIN_REPS = 25  # CUDA: at least this many timed calls ...
MAX_REP_MS = 3000.0  # ... unless they would take longer than this (a 2 s call is timed once)
CPU_MIN_RUN_TIME_S = 0.2


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def within_spread(p20_a, p80_a, p20_b, p80_b):
    """Whether two timings' p20-p80 ranges overlap, so their medians' order is inside the timing's own spread
    (floats or pandas Series alike; False where a range is missing)."""
    return (p20_a <= p80_b) & (p20_b <= p80_a)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, synchronised: what compilation, autotuning and caching cost."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Latency quantiles of ``fn``; ``grad_to_none`` get .grad = None before every repetition."""
    if device.type == "cuda":
        return _measure_cuda(fn, grad_to_none)
    return _measure_cpu(fn, grad_to_none)


def _measure_cuda(fn, grad_to_none) -> Timing:
    """do_bench times as many calls as fit in ``rep`` ms (100 by default): five of a 20 ms
    training step, whose median then moves by 10% run to run. So ``rep`` grows to MIN_REPS
    calls of the length two warm calls take, up to MAX_REP_MS."""
    from triton.testing import do_bench

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(2):
        fn()
    end.record()
    torch.cuda.synchronize()
    rep_ms = min(max(100.0, MIN_REPS * start.elapsed_time(end) / 2), MAX_REP_MS)
    median, p20, p80 = do_bench(fn, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=QUANTILES)
    return Timing(median, p20, p80)


def _measure_cpu(fn, grad_to_none) -> Timing:
    from torch.utils import benchmark

    def rep() -> None:
        # setting .grad to None costs nanoseconds next to any attention call
        for tensor in grad_to_none:
            tensor.grad = None
        fn()

    timer = benchmark.Timer(stmt="rep()", globals={"rep": rep}, num_threads=torch.get_num_threads())
    times_ms = [t * 1e3 for t in timer.blocked_autorange(min_run_time=CPU_MIN_RUN_TIME_S).times]
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0])
    # statistics.quantiles with n=10 gives the 10th..90th percentile cut points
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(statistics.median(times_ms), deciles[1], deciles[7])


def peak_memory_mib(call: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it (inputs excluded);
    None on CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
