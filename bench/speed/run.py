"""`attnbench speed`: a validated spec -> a locked run folder (new or resumed) -> the sweep -> rows.

Resuming continues the sweep recorded in the run's meta.json; rows already in speed.csv
(whatever their status) are not run again, and recorded OOMs keep their larger sizes skipped.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from attnbench import config, env, store
from attnbench.errors import InputError, Interrupted
from attnbench.speed.shard import run_sharded
from attnbench.speed.sweep import Case, Sweep, SweepSpec, expand, stops_in, validate

Progress = Callable[[int], ContextManager[Callable[[str, Case], None]]]  # total steps -> per-step callback


def run_folder(spec: SweepSpec, out: Path | None, resume: bool, gpus: int) -> Path:
    """The run folder to lock, found or named without creating anything.

    A new run's spec is validated here, before run_lock creates its folder; a resumed run's
    spec is in its meta.json, read under the lock (open_run).
    """
    if not resume:
        check_spec(spec, gpus)
        return out or store.new_run_dir("speed")
    if out is None:
        return store.latest_run(needs=(store.SPEED_CSV,))
    if not out.is_dir():
        raise InputError(f"nothing to resume at {out}: no such folder (drop --resume to start a run there)")
    return out


def open_run(run_dir: Path, spec: SweepSpec, resume: bool, spec_given: bool) -> tuple[SweepSpec, dict[str, Any]]:
    """The spec to run in ``run_dir`` (locked) and the meta.json to write.

    ``spec_given``: sweep options were given on the command line; resuming a run recorded
    with another spec is then an error rather than a silent choice between the two.
    """
    if resume and (run_dir / store.META_JSON).exists():
        return resumed_run(run_dir, spec, spec_given)
    if resume and not spec_given:
        raise InputError(
            f"{run_dir} has no {store.META_JSON}: its run stopped before it recorded its sweep, so there is nothing "
            "to resume; run its command again without --resume (same --out), or give the sweep options with --resume"
        )
    if not resume and (run_dir / store.SPEED_CSV).exists():
        raise InputError(f"{run_dir / store.SPEED_CSV} exists; pass --resume to continue it or choose another --out")
    meta = {
        "schema_version": store.SCHEMA_VERSION,
        "kind": "speed",
        "command": " ".join(["attnbench", *sys.argv[1:]]),
        "spec": asdict(spec),
        "started": store.now(),
        "finished": None,
    }
    return spec, meta


def resumed_run(run_dir: Path, spec: SweepSpec, spec_given: bool) -> tuple[SweepSpec, dict[str, Any]]:
    """The sweep recorded in ``run_dir``'s meta.json and that meta, marked resumed now."""
    meta = store.read_meta(run_dir)
    kind = meta.get("kind", "speed")
    if kind != "speed":
        raise InputError(f"{run_dir} is a {kind} run, not a speed run: continue it with `attnbench {kind} --resume --out {run_dir}`")
    try:
        recorded = SweepSpec(**meta["spec"])
    except (KeyError, TypeError):
        raise InputError(f"{run_dir / store.META_JSON} records no speed sweep (corrupt, or from another version)") from None
    if spec_given and spec != recorded:
        raise InputError(f"--resume continues the sweep recorded in {run_dir}; drop the sweep options or use a new --out")
    meta["resumed"] = [*meta.get("resumed", []), store.now()]
    meta["finished"] = None
    return recorded, meta


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
    run_dir = run_folder(spec, out, resume, gpus)
    with store.run_lock(run_dir):
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
    peaks = meta.get("peaks", {}).get("matmul_tflops", {})
    with store.RowLog(run_dir / store.SPEED_CSV, resume=resume) as log:
        prior_stops = list(stops_in(log.existing, spec.max_call_ms))
        sweep_args = (prior_stops, peaks, spec.larger, spec.max_call_ms)
        sweep = Sweep(expand(spec), log.append, store.recorded_keys(log.existing), *sweep_args)
        with progress(2 * len(sweep.pending)) as on_step:
            if gpus == 1:
                sweep.run(on_step)
            else:
                run_sharded(sweep.pending, gpus, log.append, on_step, (frozenset(), *sweep_args))
