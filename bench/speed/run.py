"""`attnbench speed`: a validated spec -> a locked run folder (new or resumed) -> the sweep -> rows.

Resuming continues the sweep recorded in the run's meta.json; rows already in speed.csv
(whatever their status) are not run again, and recorded OOMs keep their larger sizes skipped.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from attnbench import config, env, run_folder, store
from attnbench.errors import InputError, Interrupted
from attnbench.speed.shard import run_sharded
from attnbench.speed.sweep import Case, Sweep, SweepSpec, expand, stops_in, validate

Progress = Callable[[int], ContextManager[Callable[[str, Case], None]]]  # total steps -> per-step callback


def open_run(run_dir: Path, spec: SweepSpec, resume: bool, spec_given: bool) -> tuple[SweepSpec, dict[str, Any]]:
    """The sweep to run in ``run_dir`` (locked) and the meta.json to write. Resuming continues the
    recorded sweep; ``spec_given`` (sweep options on the command line) must then equal it, or, in
    a folder whose run died before its meta.json, starts that sweep there."""
    fresh = resume and spec_given and not (run_dir / store.META_JSON).exists()
    rule = run_folder.agreeing() if spec_given else run_folder.as_recorded
    meta, spec = run_folder.begin("speed", run_dir, spec, resume and not fresh, rule)
    return spec, meta


def check_spec(spec: SweepSpec, gpus: int) -> None:
    """Every input error of a sweep and its --gpus, before anything is created or run."""
    validate(spec)
    check_workers(spec.device, gpus)


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
    progress: Progress,
    gpus: int = 1,
    options: dict[str, Any] | None = None,
) -> tuple[Path, list[dict[str, str]]]:
    """Run (or resume) a sweep; returns the run folder and every row of its speed.csv.

    ``progress(total)`` is a context yielding the per-step callback (attnbench.console.sweep_progress);
    ``gpus`` > 1 spreads the cases over that many worker processes (attnbench.speed.shard);
    ``options``: the command's options (attnbench.config.of_invocation), kept as the run's config.toml.
    """
    if not resume:
        check_spec(spec, gpus)  # before run_lock creates the folder: bad input leaves nothing
    run_dir = run_folder.locate("speed", out, resume)
    with store.run_lock(run_dir):  # a resumed run's sweep is read under the lock
        spec, meta = open_run(run_dir, spec, resume, spec_given)
        if resume:
            check_spec(spec, gpus)
        else:
            config.keep(run_dir, meta, options)
        record_setup(run_dir, meta, spec, measure_peak)
        store.write_meta(run_dir, meta)
        try:
            sweep_rows(run_dir, spec, meta, resume, progress, gpus)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: every row recorded is kept in {run_dir / store.SPEED_CSV}; continue with\n"
                              f"  {shlex.join(['attnbench', 'speed', '--resume', '--out', str(run_dir)])}") from None
        meta["finished"] = store.now()
        store.write_meta(run_dir, meta)
        return run_dir, store.read_rows(run_dir / store.SPEED_CSV)


def record_setup(run_dir: Path, meta: dict[str, Any], spec: SweepSpec, measure_peak: bool) -> None:
    """Put this machine's env (and peaks with ``measure_peak``) in ``meta``; a resume on another
    timing setup than the one recorded is refused (its timings would mix in one table)."""
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


def sweep_rows(run_dir: Path, spec: SweepSpec, meta: dict[str, Any], resume: bool, progress: Progress, gpus: int) -> None:
    """The sweep's pending cases, each row appended to speed.csv as it is measured."""
    peaks = meta.get("peaks", {})
    with store.RowLog(run_dir / store.SPEED_CSV, resume=resume) as log:
        prior_stops = list(stops_in(log.existing, spec.max_call_ms))
        sweep_args = (prior_stops, peaks.get("matmul_tflops", {}), spec.larger, spec.max_call_ms, spec.check, peaks.get("copy_gbps"))
        sweep = Sweep(expand(spec), log.append, store.recorded_keys(log.existing), *sweep_args)
        with progress(2 * len(sweep.pending)) as on_step:
            if gpus == 1:
                sweep.run(on_step)
            else:
                run_sharded(sweep.pending, gpus, log.append, on_step, (frozenset(), *sweep_args))
