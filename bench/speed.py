"""`attnbench speed`: a validated spec -> a run folder (new or resumed) -> the sweep -> rows.

Resuming continues the sweep recorded in the run's meta.json; rows already in speed.csv
(whatever their status) are not run again, and recorded OOMs keep their larger sizes skipped.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from attnbench import env, store
from attnbench.errors import InputError
from attnbench.shard import run_sharded
from attnbench.sweep import Case, Sweep, SweepSpec, expand, stops_in, validate


def open_run(spec: SweepSpec, out: Path | None, resume: bool, spec_given: bool) -> tuple[Path, SweepSpec, dict[str, Any]]:
    """The run folder, the spec to run and the meta.json to write.

    ``spec_given``: sweep options were given on the command line; resuming a run recorded
    with another spec is then an error rather than a silent choice between the two.
    """
    if resume:
        run_dir = out or store.latest_run(needs=(store.SPEED_CSV,))
        if (run_dir / store.META_JSON).exists():
            meta = store.read_meta(run_dir)
            recorded = SweepSpec(**meta["spec"])
            if spec_given and spec != recorded:
                raise InputError(f"--resume continues the sweep recorded in {run_dir}; drop the sweep options or use a new --out")
            meta["resumed"] = [*meta.get("resumed", []), store.now()]
            meta["finished"] = None
            return run_dir, recorded, meta
    else:
        run_dir = out or store.new_run_dir("speed")
        if (run_dir / store.SPEED_CSV).exists():
            raise InputError(f"{run_dir / store.SPEED_CSV} exists; pass --resume to continue it or choose another --out")
    meta = {
        "schema_version": store.SCHEMA_VERSION,
        "kind": "speed",
        "command": " ".join(["attnbench", *sys.argv[1:]]),
        "spec": asdict(spec),
        "started": store.now(),
        "finished": None,
    }
    return run_dir, spec, meta


def check_workers(device: str, gpus: int) -> None:
    """--gpus: at least 1, and no more than the GPUs here (on CPU, N processes: for tests)."""
    if gpus < 1:
        raise InputError(f"--gpus must be positive, got {gpus}")
    if gpus > 1 and device.startswith("cuda"):
        if ":" in device:
            raise InputError("--gpus N uses GPUs 0..N-1: give --device cuda, not one GPU")
        if gpus > torch.cuda.device_count():
            raise InputError(f"--gpus {gpus}, but this machine has {torch.cuda.device_count()} GPU(s)")


def run_speed(
    spec: SweepSpec,
    out: Path | None,
    resume: bool,
    spec_given: bool,
    measure_peak: bool,
    progress: Callable[[int], ContextManager[Callable[[str, Case], None]]],
    gpus: int = 1,
) -> tuple[Path, list[dict[str, str]]]:
    """Run (or resume) a sweep; returns the run folder and every row of its speed.csv.

    ``progress(total)`` is a context yielding the per-step callback (attnbench.console.sweep_progress);
    ``gpus`` > 1 spreads the cases over that many worker processes (attnbench.shard).
    """
    run_dir, spec, meta = open_run(spec, out, resume, spec_given)
    validate(spec)
    store.ensure_writable(run_dir)
    here = env.collect()
    if "env" in meta:
        recorded, current = env.timing_setup(meta["env"]), env.timing_setup(here)
        if recorded != current:
            raise InputError(
                f"{run_dir} was measured with {recorded}, this machine has {current}: "
                "--resume here would mix their timings in one table; resume there, or sweep into a new --out"
            )
    meta["env"] = here
    if measure_peak:
        meta["peaks"] = env.measure_peaks(spec.device, spec.dtypes)
    peaks = meta.get("peaks", {}).get("matmul_tflops", {})
    store.write_meta(run_dir, meta)
    check_workers(spec.device, gpus)
    with store.RowLog(run_dir / store.SPEED_CSV, resume=resume) as log:
        prior_stops = list(stops_in(log.existing, spec.max_call_ms))
        sweep_args = (prior_stops, peaks, spec.larger, spec.max_call_ms)
        sweep = Sweep(expand(spec), log.append, store.recorded_keys(log.existing), *sweep_args)
        with progress(2 * len(sweep.pending)) as on_step:
            if gpus == 1:
                sweep.run(on_step)
            else:
                run_sharded(sweep.pending, gpus, log.append, on_step, (frozenset(), *sweep_args))
    meta["finished"] = store.now()
    store.write_meta(run_dir, meta)
    return run_dir, store.read_rows(run_dir / store.SPEED_CSV)
