"""The decode rows in `attnbench report`:

- time per decode step against the context L (log-log), one panel per mechanism (a row of panels
  per batch size), one line per impl, and the bandwidth bound where the run measured its copy
  bandwidth (`--measure-peak`): the time the step's bytes take at that bandwidth, bytes / copy
  GB/s, read back from each row as ms_median * pct_bandwidth / 100 (so the bound needs nothing
  beyond speed.csv);
- capacity: cache or state memory per sequence against L, and tokens/s against the batch;
- the crossover table: per batch, the context from which each mechanism that carries a fixed-size
  state steps faster than each KV-cache mechanism (both at their fastest impl per L, each fitted
  as time = a + b L over the contexts measured, least squares; the cache's slope is its bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
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
    return _saved(fig, title, path)


def _saved(fig, title: str, path: Path) -> Path:
    """The figure titled, written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def _best_step(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (mechanism, batch, L): the fastest impl's ms per step."""
    best = rows.loc[rows.groupby(["mechanism", "batch", "seq"])["ms_median"].idxmin()]
    return best[["mechanism", "batch", "seq", "impl", "ms_median"]]


def _line(points: pd.DataFrame) -> tuple[float, float]:
    """(a, b) of ms = a + b L fitted over the points' (seq, ms_median); b = 0 from a single L."""
    if points["seq"].nunique() < 2:
        return float(points["ms_median"].mean()), 0.0
    slope, intercept = np.polyfit(points["seq"].astype(float), points["ms_median"].astype(float), 1)
    return float(intercept), float(slope)


def carries(mechanism: str) -> str | None:
    """A registered mechanism's decode form's "kv-cache" or "state"; None for one without a form
    or not registered here (a run from another version)."""
    from attnbench.models import registry

    form = registry.mechanisms().get(mechanism)
    return None if form is None or form.decode is None else form.decode.carries


CROSSOVER_NOTE = ("Per batch, from which context L a mechanism that carries a fixed-size state steps faster than a "
                  "KV-cache mechanism: both at their fastest impl at each L, each fitted as ms = a + b L over the "
                  "contexts measured (crossover_L, empty where the lines do not cross), and the first L measured at "
                  "which the state step was faster.")


def _crossing(state: tuple[float, float], cache: tuple[float, float], span: float, scale: float) -> int | str:
    """The L where the fitted lines (a, b) cross, the state's ahead from there on: an int, "every L"
    where they cross below L = 0, "" where the cache's line does not rise faster than the state's
    by more than rounding (1e-6 of ``scale`` ms over the ``span`` of contexts measured)."""
    (a_s, b_s), (a_c, b_c) = state, cache
    if (b_c - b_s) * span <= 1e-6 * scale:
        return ""
    at = (a_s - a_c) / (b_c - b_s)
    return round(at) if at > 0 else "every L"


def crossover_table(rows: pd.DataFrame, carries: Callable[[str], str | None] = carries) -> pd.DataFrame:
    """``rows``: ok decode rows of one setup; ``carries(mechanism)``: its decode form's "kv-cache" or
    "state" (None: not known). Per batch and (state, cache) pair: the fitted crossover L (empty
    where the lines do not cross ahead of the state), the first measured L at which the state
    mechanism is faster, and both times at the largest L."""
    best = _best_step(rows)
    kinds = {m: carries(m) for m in best["mechanism"].unique()}
    out = []
    for batch, at_batch in best.groupby("batch"):
        for state in [m for m, kind in kinds.items() if kind == "state"]:
            for cache in [m for m, kind in kinds.items() if kind == "kv-cache"]:
                s, c = at_batch[at_batch["mechanism"] == state], at_batch[at_batch["mechanism"] == cache]
                both = s.merge(c, on="seq", suffixes=("_state", "_cache"))
                if both.empty:
                    continue
                faster = both[both["ms_median_state"] < both["ms_median_cache"]]["seq"]
                last = both.loc[both["seq"].idxmax()]
                out.append({
                    "batch": int(batch), "state": state, "cache": cache,
                    "crossover_L": _crossing(_line(s), _line(c), float(both["seq"].max() - both["seq"].min()),
                                             float(both[["ms_median_state", "ms_median_cache"]].to_numpy().max())),
                    "first_L_state_faster": int(faster.min()) if not faster.empty else "none measured",
                    "L_max": int(last["seq"]), "state_ms": last["ms_median_state"], "cache_ms": last["ms_median_cache"],
                    "state_impl": last["impl_state"], "cache_impl": last["impl_cache"],
                })
    return pd.DataFrame(out)


def capacity_figure(rows: pd.DataFrame, *, path: Path, palette, title: str, seq_label: Callable[[float, object], str]) -> Path:
    """Two panels of the ok decode rows of one setup: memory per sequence (the cache or state) against
    L, log-log, one line per mechanism; tokens/s of each mechanism's fastest impl against the batch
    at the largest L measured, log-log."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter, NullFormatter

    mechanisms = list(dict.fromkeys(rows["mechanism"]))
    colours = dict(zip(mechanisms, sns.color_palette("tab10", len(mechanisms))))
    fig, (memory, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    per_seq = rows.groupby(["mechanism", "seq"])["mem_per_seq_mib"].median().dropna()
    for mechanism in mechanisms:
        if mechanism in per_seq.index.get_level_values(0):
            line = per_seq.loc[mechanism].sort_index()
            memory.plot(line.index, line.to_numpy(), marker="o", markersize=4, color=colours[mechanism], label=mechanism)
    memory.set_xscale("log", base=2)
    memory.set_yscale("log")
    memory.xaxis.set_major_formatter(FuncFormatter(seq_label))
    memory.xaxis.set_minor_formatter(NullFormatter())
    memory.set_xlabel("context L (cached tokens)")
    memory.set_ylabel("cache or state MiB per sequence")
    memory.set_title("memory per sequence", fontsize=9)
    largest = rows["seq"].max()
    best = rows[rows["seq"] == largest]
    best = best.loc[best.groupby(["mechanism", "batch"])["ms_median"].idxmin()]
    for mechanism, line in best.groupby("mechanism", sort=False):
        line = line.sort_values("batch")
        throughput.plot(line["batch"], line["tokens_per_s"], marker="o", markersize=4, color=colours[mechanism], label=mechanism)
    throughput.set_xscale("log", base=2)
    throughput.set_yscale("log")
    throughput.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos=None: f"{value:g}"))
    throughput.set_xlabel("batch (sequences per step)")
    throughput.set_ylabel("tokens/s (fastest impl)")
    throughput.set_title(f"tokens/s at L = {seq_label(largest, None)}", fontsize=9)
    for ax in (memory, throughput):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return _saved(fig, title, path)
