"""`attnbench speed --profile`: where each case's time goes, kernel by kernel (torch.profiler).

A case's timed call is warmed up, then run ``steps`` times under the profiler. On CUDA the
rows are GPU kernels; on CPU they are torch ops (self CPU time). Per case the summary gives
the wall time of one call and the GPU-busy time (the kernels' sum): a large gap means the
call is bound by the CPU (launch overhead, Python), not by its kernels.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from attnbench import timing
from attnbench.speed.sweep import Case, expand, timed_call, workload
from attnbench.store import case_key

PROFILE_CSV = "profile.csv"
WARMUP_CALLS = 3


@dataclass(frozen=True)
class CaseProfile:
    """One case: wall ms per call, busy ms per call (GPU kernels, or CPU ops on CPU), and the
    rows [kernel, calls_per_call, ms_per_call, pct_of_busy], most expensive first."""

    case: Case
    wall_ms: float
    busy_ms: float
    kernels: pd.DataFrame


def profile_case(case: Case, steps: int = 5) -> CaseProfile:
    device = torch.device(case.device)
    work = workload(case)
    call = timed_call(work, case.mode)
    for _ in range(WARMUP_CALLS):
        call()
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    timing.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            call()
        timing.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    rows = []
    for event in prof.key_averages():
        if on_cuda and event.device_type == DeviceType.CUDA:
            us = event.self_device_time_total
        elif not on_cuda and event.device_type == DeviceType.CPU:
            us = event.self_cpu_time_total
        else:
            continue
        if us > 0:
            rows.append({"kernel": event.key, "calls_per_call": event.count / steps, "ms_per_call": us / 1e3 / steps})
    kernels = pd.DataFrame(rows, columns=["kernel", "calls_per_call", "ms_per_call"])
    kernels = kernels.sort_values("ms_per_call", ascending=False, ignore_index=True)
    busy_ms = float(kernels["ms_per_call"].sum())
    kernels["pct_of_busy"] = 100.0 * kernels["ms_per_call"] / busy_ms if busy_ms else 0.0
    return CaseProfile(case, wall_ms, busy_ms, kernels)


def write_profiles(profiles: list[CaseProfile], run_dir: Path) -> Path:
    """profile.csv in ``run_dir``: the case columns, wall_ms, busy_ms, then one row per kernel."""
    frames = []
    for p in profiles:
        summary = {**asdict(p.case), "wall_ms": p.wall_ms, "busy_ms": p.busy_ms}
        frames.append(p.kernels.assign(**summary)[[*summary, *p.kernels.columns]])
    path = run_dir / PROFILE_CSV
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


def profile_ok_cases(spec, rows: list[dict[str, str]], run_dir: Path, steps: int) -> list[CaseProfile]:
    """Profile every case of ``spec`` whose row is ok; writes profile.csv in ``run_dir``."""
    ok = {case_key(row) for row in rows if row["status"] == "ok"}
    profiles = []
    for case in expand(spec):
        if case_key(asdict(case)) in ok:
            profiles.append(profile_case(case, steps))
    if profiles:
        write_profiles(profiles, run_dir)
    return profiles
