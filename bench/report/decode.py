"""The decode rows' figure in `attnbench report`: time per decode step against the context L
(log-log), one panel per mechanism (a row of panels per batch size), one line per impl, and the
bandwidth bound where the run measured its copy bandwidth (`--measure-peak`): the time the
step's bytes take at that bandwidth, bytes / copy GB/s, read back from each row as
ms_median * pct_bandwidth / 100 (so the bound needs nothing beyond speed.csv).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

BOUND_STYLE = {"color": "0.2", "linestyle": ":", "linewidth": 1.4}


def bound_ms(rows: pd.DataFrame) -> pd.Series:
    """Per (mechanism, batch, L): the bandwidth-bound time of the step, ms (NaN where no bandwidth
    was measured); the bytes of a step are the cost model's, the same for every impl."""
    bound = rows["ms_median"] * rows["pct_bandwidth"] / 100.0
    return bound.groupby([rows["mechanism"], rows["batch"], rows["seq"]]).median().dropna()


def decode_figure(rows: pd.DataFrame, *, path: Path, palette, title: str, seq_label: Callable[[float, object], str]) -> Path:
    """``rows``: the ok decode rows of one setup (speed.csv's frame, bench/report/speed.py);
    ``seq_label``: the axis label of a length (the other speed figures' own)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    mechanisms = list(dict.fromkeys(rows["mechanism"]))
    batches = sorted(rows["batch"].unique())
    fig, axes = plt.subplots(len(batches), len(mechanisms), figsize=(3.6 * len(mechanisms), 3.0 * len(batches)),
                             squeeze=False, sharex=True)
    bounds = bound_ms(rows)
    for i, batch in enumerate(batches):
        for j, mechanism in enumerate(mechanisms):
            ax = axes[i][j]
            panel = rows[(rows["batch"] == batch) & (rows["mechanism"] == mechanism)]
            for impl, line in panel.groupby("impl"):
                line = line.sort_values("seq")
                ax.plot(line["seq"], line["ms_median"], marker="o", markersize=4, color=palette.get(impl), label=impl)
            if (mechanism, batch) in bounds.index.droplevel(2):
                bound = bounds.loc[(mechanism, batch)].sort_index()
                ax.plot(bound.index, bound.to_numpy(), label="bandwidth bound", **BOUND_STYLE)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(seq_label))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{mechanism}, B={batch:g}", fontsize=9)
            ax.set_xlabel("context L (cached tokens)")
            ax.set_ylabel("ms per step")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
