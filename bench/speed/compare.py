"""`attnbench compare BASE HEAD`: per-case latency ratio; a regression is a case slower than
``threshold`` percent, or a case that ran in BASE and no longer runs in HEAD (oom, error, ...)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench import console, store
from attnbench.errors import InputError


def _speed_csv(path: Path) -> Path:
    csv = path / store.SPEED_CSV if path.is_dir() else path
    if not csv.exists():
        raise InputError(f"no {store.SPEED_CSV} at {path}")
    return csv


def _load(path: Path) -> pd.DataFrame:
    rows = store.read_cases(_speed_csv(path))
    df = pd.DataFrame(rows, columns=store.SPEED_COLUMNS)
    try:
        df["ms_median"] = pd.to_numeric(df["ms_median"].replace("", float("nan")))
    except ValueError as err:
        raise InputError(f"corrupt {store.SPEED_CSV} at {path}: {err}") from None
    return df


def ratios(base: pd.DataFrame, head: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, int, int]:
    """Cases in both runs with base/head ms, ratio head/base and a verdict; and how many cases
    only BASE or only HEAD has. Verdicts: slower, faster, same, lost (ok in BASE, not in HEAD), -."""
    joined = base.merge(head, on=store.CASE_COLUMNS, suffixes=("_base", "_head"), how="outer", indicator=True)
    only_base = int((joined["_merge"] == "left_only").sum())
    only_head = int((joined["_merge"] == "right_only").sum())
    both = joined[joined["_merge"] == "both"].copy()
    both["ratio"] = both["ms_median_head"] / both["ms_median_base"]
    limit = 1 + threshold / 100

    def verdict(row) -> str:
        if row["status_base"] == "ok" and row["status_head"] != "ok":
            return f"lost ({row['status_head']})"
        if row["status_base"] != "ok" or row["status_head"] != "ok":
            return "-"
        if row["ratio"] > limit:
            return "slower"
        return "faster" if row["ratio"] < 1 / limit else "same"

    both["verdict"] = both.apply(verdict, axis=1) if len(both) else pd.Series(dtype=str)
    return both, only_base, only_head


def compare_runs(base: Path, head: Path, threshold: float) -> bool:
    """Print the per-case table; True when any case regressed."""
    if threshold < 0:
        raise InputError(f"--threshold must be >= 0, got {threshold}")
    table, only_base, only_head = ratios(_load(base), _load(head), threshold)
    if table.empty:
        raise InputError(f"{base} and {head} share no case; nothing to compare")
    shown = table[table["verdict"] != "-"].sort_values("ratio", ascending=False, na_position="first")
    shown = shown.rename(columns={"ms_median_base": "base ms", "ms_median_head": "head ms"})
    columns = [c for c in store.CASE_COLUMNS if c != "device"] + ["base ms", "head ms", "ratio", "verdict"]
    console.out.print(console.frame_table(shown[columns], f"{head} vs {base} (threshold {threshold:g}%)",
                                          keep=("impl", "seq", "base ms", "head ms", "ratio", "verdict")))
    regressed = shown["verdict"].str.startswith(("slower", "lost"))
    if only_base or only_head:
        console.out.print(f"[dim]{only_base} case(s) only in BASE, {only_head} only in HEAD (not compared)[/dim]")
    counts = shown["verdict"].value_counts()
    console.out.print(", ".join(f"{n} {v}" for v, n in counts.items()))
    if regressed.any():
        console.out.print(f"[bold red]{int(regressed.sum())} regression(s)[/bold red]")
    return bool(regressed.any())
