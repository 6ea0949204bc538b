"""`attnbench speed --gpus N`: one sweep's cases spread over N GPUs of one host.

One worker process per GPU runs its share of the cases through the ordinary Sweep (warm-up
of all its cases, then timing) with its GPU as the current device, so rows say `cuda` as a
one-GPU run's do and resume/compare match them. Workers send rows back over a queue and
the parent alone appends them to speed.csv, flushed per row: a kill loses nothing and
`--resume` (with any number of GPUs) skips what is recorded. Each series of sizes stays on
one worker, so an OOM still skips the larger sizes of its case.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from attnbench.speed.sweep import Case, Sweep


def split_by_series(cases: Iterable[Case], workers: int) -> list[list[Case]]:
    """``cases`` in ``workers`` shares of about equal size, each series (a case at every size)
    whole in one share, sizes in their original order."""
    series: dict[tuple, list[Case]] = defaultdict(list)
    for case in cases:
        series[case.series()].append(case)
    shares: list[list[Case]] = [[] for _ in range(workers)]
    for group in sorted(series.values(), key=len, reverse=True):  # largest first: balanced greedily
        min(shares, key=len).extend(group)
    return shares


def _worker(index: int, cases: list[Case], sweep_args: tuple, messages) -> None:
    if cases and torch.device(cases[0].device).type == "cuda":
        torch.cuda.set_device(index)
    sweep = Sweep(cases, lambda row: messages.put(("row", row)), *sweep_args)
    sweep.run(lambda phase, case: messages.put(("step", phase, case)))
    messages.put(("done", index))


def run_sharded(
    cases: list[Case],
    workers: int,
    write: Callable[[dict[str, Any]], None],
    on_step: Callable[[str, Case], None],
    sweep_args: tuple = (),
) -> None:
    """Run ``cases`` on ``workers`` processes (GPU i for worker i); every row goes to ``write``
    in the parent as it arrives. ``sweep_args``: Sweep's arguments after ``write``."""
    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    messages = context.Queue()
    processes = [
        context.Process(target=_worker, args=(i, share, sweep_args, messages), daemon=True)
        for i, share in enumerate(split_by_series(cases, workers))
    ]
    for process in processes:
        process.start()
    running = len(processes)
    while running:
        try:
            message = messages.get(timeout=1.0)
        except queue_module.Empty:
            dead = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"speed worker {dead[0]} died (exit code {processes[dead[0]].exitcode}); "
                                   "the rows written so far are kept: rerun with --resume")
            continue
        if message[0] == "row":
            write(message[1])
        elif message[0] == "step":
            on_step(message[1], message[2])
        else:
            running -= 1
    for process in processes:
        process.join()
