"""One run folder's life, the same for speed, train and distill: where it is, its meta.json, --resume.

    new run    --out, or results/<YYYYmmdd-HHMMSS>-<kind>; refused when <kind>.csv is there already;
               meta.json: schema_version, kind, command, spec, started, finished (None until the end)
    --resume   --out, or the latest run holding <kind>.csv; its meta.json must be of <kind> (else the
               command that continues it is named), its recorded spec must agree with the one given
               by the command's rule (Rule), and the meta gains a "resumed" time

Nothing here creates the folder (store.run_lock does), so each command keeps its own order of
checks, lock and creation: speed validates its sweep before the lock, distill proves the folder
writable. Rows are appended with store.RowLog, whole files written with store.replacing.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

from attnbench import config, store
from attnbench.errors import InputError

Spec = TypeVar("Spec")
CSV = {"speed": store.SPEED_CSV, "train": store.TRAIN_CSV, "distill": store.DISTILL_CSV}  # kind -> the CSV its run appends to
Rule = Callable[[Path, Any, Any], Any]  # (run_dir, recorded spec, given spec) -> the spec to run; InputError when they disagree


def agreeing(*names: str) -> Rule:
    """The rule that the given spec's fields ``names`` (none named: every field) equal the recorded
    ones, naming those that differ; the given spec runs (its other fields may change: distill's --steps)."""

    def rule(run_dir: Path, recorded: Any, given: Any) -> Any:
        checked = [f.name for f in fields(given) if not names or f.name in names]
        changed = [name for name in checked if getattr(given, name) != getattr(recorded, name)]
        if changed:
            raise InputError(f"--resume continues {run_dir} as recorded; these options differ: {', '.join(changed)} "
                             "(give them as recorded, or use a new --out)")
        return given

    return rule


def as_recorded(run_dir: Path, recorded: Any, given: Any) -> Any:
    """The rule that the recorded spec runs, whatever was given (speed without sweep options)."""
    return recorded


def locate(kind: str, out: Path | None, resume: bool) -> Path:
    """The run folder, found or named, without creating anything."""
    if not resume:
        return out or store.new_run_dir(kind)
    if out is None:
        return store.latest_run(needs=(CSV[kind],))
    if not out.is_dir():
        raise InputError(f"nothing to resume at {out}: no such folder (drop --resume to start a run there)")
    return out


def begin(kind: str, run_dir: Path, spec: Spec, resume: bool, rule: Rule) -> tuple[dict[str, Any], Spec]:
    """The meta.json to write (not written yet) and the spec to run in ``run_dir``."""
    if resume:
        return resumed(kind, run_dir, spec, rule)
    results = run_dir / CSV[kind]
    if results.exists():
        raise InputError(f"{results} exists; pass --resume to continue it or choose another --out")
    meta = {
        "schema_version": store.SCHEMA_VERSION,
        "kind": kind,
        "command": " ".join(["attnbench", *sys.argv[1:]]),
        "spec": asdict(spec),
        "started": store.now(),
        "finished": None,
    }
    return meta, spec


def open_run(kind: str, spec: Spec, out: Path | None, resume: bool, rule: Rule) -> tuple[Path, dict[str, Any], Spec]:
    """locate, then begin: the run folder, its meta.json (not written) and the spec to run."""
    run_dir = locate(kind, out, resume)
    return (run_dir, *begin(kind, run_dir, spec, resume, rule))


def resumed(kind: str, run_dir: Path, spec: Spec, rule: Rule) -> tuple[dict[str, Any], Spec]:
    """``run_dir``'s meta.json marked resumed now, and the spec ``rule`` picks of the recorded and ``spec``."""
    if not (run_dir / store.META_JSON).exists():
        raise InputError(
            f"{run_dir} has no {store.META_JSON}: its run stopped before it recorded its spec, so there is nothing "
            "to resume; run its command again without --resume (same --out)"
        )
    meta = store.read_meta(run_dir)
    recorded_kind = meta.get("kind", kind)  # a meta without a kind is judged by its spec
    if recorded_kind != kind:
        raise InputError(f"{run_dir} is a {recorded_kind} run, not a {kind} run: continue it with `{continue_command(recorded_kind, run_dir)}`")
    try:
        recorded = type(spec)(**meta["spec"])
    except (KeyError, TypeError) as err:
        raise InputError(f"{run_dir / store.META_JSON} records no {kind} spec this version can read ({err})") from None
    to_run = rule(run_dir, recorded, spec)
    meta["spec"] = asdict(to_run)
    meta["resumed"] = [*meta.get("resumed", []), store.now()]
    meta["finished"] = None
    return meta, to_run


def continue_command(kind: str, run_dir: Path) -> str:
    """The command that continues the ``kind`` run in ``run_dir`` (with its config.toml, when it has one)."""
    args = ["attnbench", kind, "--resume", "--out", str(run_dir)]
    if (run_dir / config.CONFIG_TOML).exists():
        args += ["--config", str(run_dir / config.CONFIG_TOML)]
    return shlex.join(args)
