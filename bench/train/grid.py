"""The figures of a grid of attention forms x position schemes (`train --positions`), and the
attention entropy of every model.

    heatmaps(train, path)         final eval loss, median train tokens/s and peak memory (CUDA),
                                  one heatmap each: forms as rows, schemes as columns; a cell
                                  that has no meaning (status unsupported) is grey, marked "n/a"
    entropy_figure(entropy, path) mean attention entropy per layer at the last evaluation: a
                                  panel per position scheme, a line per form

Both take report.py's frames (train.csv / entropy.csv rows with their ``line`` labels; train's
``crossed`` marks the rows of runs that crossed position schemes).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from attnbench.models import positions, registry

NOT_APPLICABLE = "n/a"


def _scheme_order(scheme: str) -> int:
    """Position schemes in models/positions.py's order (learned, sinusoidal, rope, alibi, none, others)."""
    return positions.SCHEMES.index(scheme) if scheme in positions.SCHEMES else len(positions.SCHEMES)


def is_grid(train: pd.DataFrame) -> bool:
    """The rows of runs that crossed position schemes (``crossed``) hold more than one form and
    more than one scheme."""
    cells = train[train["crossed"]]
    return cells["attn"].nunique() > 1 and cells["positions"].nunique() > 1


def grid_tables(train: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{title: [form x scheme] values}: final eval loss, median train tokens/s, peak MiB; NaN
    where the cell did not train (unsupported or failed before an evaluation)."""
    rows = train[train["crossed"]]
    forms = sorted(set(rows["attn"]), key=list(registry.mechanisms()).index)  # the registry's order
    schemes = sorted(set(rows["positions"]), key=_scheme_order)
    ok = rows[rows["status"] == "ok"]
    valid = ok[ok["split"] == "valid"].sort_values("step").groupby(["attn", "positions"])["loss"].last()
    trained = ok[ok["split"] == "train"].groupby(["attn", "positions"])
    tables = {
        "final eval loss": valid,
        "train tokens/s (median step)": trained["tokens_per_s"].median(),
        "peak memory (MiB)": trained["peak_mem_mib"].max(),
    }
    return {title: values.unstack().reindex(index=forms, columns=schemes) for title, values in tables.items()}


def heatmaps(train: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    tables = {title: table for title, table in grid_tables(train).items() if table.notna().any().any()}  # CPU: no memory
    forms, schemes = next(iter(tables.values())).shape
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables) + 1, 0.55 * forms + 2.2), squeeze=False)
    axes = axes[0]
    colormaps = {"final eval loss": "viridis_r", "train tokens/s (median step)": "viridis", "peak memory (MiB)": "magma_r"}
    for ax, (title, table) in zip(axes, tables.items()):
        ax.set_facecolor("#d9d9d9")  # unsupported cells stay grey
        text = table.map(lambda v: "" if pd.isna(v) else _short(v))
        sns.heatmap(table.astype(float), ax=ax, annot=text, fmt="", cmap=colormaps[title], cbar=True,
                    linewidths=0.5, linecolor="white", annot_kws={"fontsize": 9})
        ax.set_title(title + (" (lower is better)" if title != "train tokens/s (median step)" else " (higher is better)"), fontsize=10)
        ax.set_xlabel("position scheme")
        ax.set_ylabel("attention form" if ax is axes[0] else "")
        ax.tick_params(axis="y", rotation=0)
    _mark_missing(axes, tables)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(value: float) -> str:
    """4 significant digits, thousands as k: 6.405, 2.89e4 -> 28.9k."""
    return f"{value / 1e3:.3g}k" if abs(value) >= 1e4 else f"{value:.4g}"


def _mark_missing(axes, tables: dict[str, pd.DataFrame]) -> None:
    """n/a on every cell with no value (seaborn leaves masked cells blank)."""
    for ax, table in zip(axes, tables.values()):
        for i, form in enumerate(table.index):
            for j, scheme in enumerate(table.columns):
                if pd.isna(table.loc[form, scheme]):
                    ax.text(j + 0.5, i + 0.5, NOT_APPLICABLE, ha="center", va="center", fontsize=9, color="#555555")


def entropy_figure(entropy: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    last = entropy.sort_values("step").groupby("line").tail(entropy["layer"].nunique())  # each line's last evaluation
    last = last[last.groupby("line")["step"].transform("max") == last["step"]]
    schemes = sorted({s for s in entropy["positions"] if s}, key=_scheme_order) or [""]
    crossed = len(schemes) > 1
    forms = list(dict.fromkeys(last["attn"] if crossed else last["line"]))
    colours = dict(zip(forms, sns.color_palette("husl", len(forms))))  # one colour per form in every panel
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.8 * len(schemes) + 1.5, 4.2), sharey=True, squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        panel = last[last["positions"] == scheme] if crossed else last
        for line, rows in panel[panel["status"] == "ok"].groupby("line", sort=False):
            label = rows["attn"].iloc[0] if crossed else line
            ax.plot(rows["layer"], rows["entropy"], marker="o", label=label, color=colours[label])
        missing = sorted(set(panel[panel["status"] != "ok"]["line"]))
        title = f"positions: {scheme}" if crossed else "attention entropy at the last evaluation"
        if missing:
            title += "\n" + textwrap.fill(f"(no distribution over keys: {', '.join(missing)})", 60)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(set(last["layer"].dropna().astype(int))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    axes[0][0].set_ylabel("mean entropy over queries (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
