"""The README's exact-grid table from speed run folders: one row per head dim, mode, mask and T, each impl's
median ms, then each baseline's time over ours (> 1: ours is faster), the ratios from the report's `speedups`.

    python3 -m attnbench.devtools.grid_table results/reference-h200/steps-dkdv/exact-d64 \\
        --baseline sdpa-cudnn --baseline sdpa-flash --baseline flex
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from attnbench.errors import USER_ERRORS, InputError
from attnbench.report.speed import seq_label, load_speed, speedups

KEYS = ["head_dim", "mode", "causal", "seq"]
MODE_LABELS = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}
MASK_LABELS = {"causal": "causal", "bidirectional": "bidir"}


def grid_rows(df: pd.DataFrame, ours: str, baselines: list[str]) -> list[str]:
    """Markdown rows (header first) of ``df`` (load_speed's frame, each case in one row): D, mode,
    mask, T, the median ms of ``ours`` and each baseline, then each baseline's median over ours; head dims
    largest first, then mode, mask and T. A case some impl lacks shows "-" there."""
    ok = df[df["status"] == "ok"]
    repeated = ok.duplicated(KEYS + ["impl"])
    if repeated.any():
        case = ok[repeated].iloc[0]
        raise InputError(f"a case in more than one row or run: D {case['head_dim']:g} {case['mode']} {case['causal']} "
                         f"T {case['seq']:g} {case['impl']} (give each head dim's run once)")
    ms = ok.pivot_table(index=KEYS, columns="impl", values="ms_median").reindex(columns=[ours, *baselines])
    ratios = {base: speedups(df, base) for base in baselines}
    ratio = pd.concat([r[r["impl"] == ours].set_index(KEYS)["speedup"].rename(base) for base, r in ratios.items()],
                      axis=1).reindex(ms.index)
    ms = ms.sort_index(level=KEYS, ascending=[False, True, True, True])
    header = ["D", "mode", "mask", "T", ours, *baselines, *(f"vs {b}" for b in baselines)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (head_dim, mode, mask, seq), times in ms.iterrows():
        cells = [f"{head_dim:g}", MODE_LABELS[mode], MASK_LABELS[mask], seq_label(seq)]
        cells += ["-" if pd.isna(t) else f"{t:.3g}" for t in times]
        cells += ["-" if pd.isna(r) else f"{r:.2f}" for r in ratio.loc[(head_dim, mode, mask, seq)]]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(
    runs: Annotated[list[Path], typer.Argument(help="speed run folders (each with its speed.csv)", exists=True, file_okay=False)],
    ours: Annotated[str, typer.Option("--impl", help="the impl the ratios are for")] = "triton",
    baseline: Annotated[list[str], typer.Option(help="a peer impl (repeat the option for several)")] = ["sdpa-cudnn"],  # noqa: B006
) -> None:
    """Print the exact-grid table of RUNS as markdown."""
    try:
        print("\n".join(grid_rows(load_speed(runs), ours, baseline)))
    except USER_ERRORS as err:  # one line, exit 2, as the attnbench commands do
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    typer.run(main)
