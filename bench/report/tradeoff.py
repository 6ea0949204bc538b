"""Quality against speed, for a report given both speed sweeps and training runs: each trained
mechanism's final eval loss beside its fastest impl's causal time per sequence at every swept
length, so the mechanisms worth their cost sit at the lower left.

    tradeoff_rows(speed, train_runs) -> DataFrame [mechanism, family, eval_loss, steps, train_run, seq, impl, ms_per_seq]
    tradeoff_table(rows)              -> one row per mechanism: eval loss, then ms per sequence at each T
    tradeoff_figure(rows, path)       -> path of the scatter (one panel per T, log time, labelled points)

Speed rows: status ok, causal (the trained models are GPT-style), of the level and mode that
cover the most trained mechanisms (on a tie: fwdbwd, then fwd, then bwd). A mechanism
trained in several runs takes the run that trained it longest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.report.speed import best_per_sequence
from attnbench.train.report import train_rows

MODE_PREFERENCE = ["fwdbwd", "fwd", "bwd"]
FAMILY_COLOURS = {"exact": "#1f77b4", "sparse": "#ff7f0e", "linear": "#2ca02c", "recurrent": "#9467bd"}


def final_eval_losses(train_runs: list[Path]) -> pd.DataFrame:
    """[mechanism, eval_loss, steps, train_run]: each mechanism's last evaluation, from the run
    that trained it the most steps."""
    finals = []
    for run in train_runs:
        rows = train_rows(run)
        valid = rows[(rows["split"] == "valid") & (rows["loss"] != "")]
        for attn, evals in valid.groupby("attn"):
            last = evals.assign(step=pd.to_numeric(evals["step"])).sort_values("step").iloc[-1]
            finals.append({"mechanism": attn, "eval_loss": float(last["loss"]), "steps": int(last["step"]), "train_run": run.name})
    if not finals:
        return pd.DataFrame(columns=["mechanism", "eval_loss", "steps", "train_run"])
    frame = pd.DataFrame(finals).sort_values("steps", kind="stable")
    return frame.drop_duplicates("mechanism", keep="last").reset_index(drop=True)


def tradeoff_rows(speed: pd.DataFrame, train_runs: list[Path]) -> pd.DataFrame:
    """Final eval loss and fastest causal time per sequence, per trained mechanism and length
    (speed as report.speed.load_speed returns it). Empty when no trained mechanism was timed."""
    from attnbench.models.registry import mechanisms

    finals = final_eval_losses(train_runs)
    timed = speed[(speed["status"] == "ok") & (speed["causal"] == "causal") & speed["mechanism"].isin(finals["mechanism"])]
    if timed.empty:
        return pd.DataFrame()
    coverage = timed.groupby(["level", "mode"])["mechanism"].nunique().rename("covered").reset_index()
    coverage["preferred"] = coverage["mode"].map(MODE_PREFERENCE.index)  # a tie goes to the mode closest to training
    level, mode = coverage.sort_values(["covered", "preferred"], ascending=[False, True]).iloc[0][["level", "mode"]]
    best = best_per_sequence(timed[(timed["level"] == level) & (timed["mode"] == mode)])
    families = {name: m.family for name, m in mechanisms().items()}
    rows = best.drop(columns="causal").merge(finals, on="mechanism")
    return rows.assign(family=rows["mechanism"].map(families).fillna("exact"), level=level, mode=mode)


def tradeoff_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per mechanism (best eval loss first): eval loss, steps, then '<ms> (<impl>)' at each T."""
    cells = rows.assign(cell=rows["ms_per_seq"].map("{:.3g}".format) + " (" + rows["impl"] + ")")
    times = cells.pivot(index="mechanism", columns="seq", values="cell").rename(columns=lambda t: f"ms/seq at {t}")
    losses = rows.drop_duplicates("mechanism").set_index("mechanism")[["eval_loss", "steps"]]
    return losses.join(times).sort_values("eval_loss").reset_index().fillna("")


def tradeoff_figure(rows: pd.DataFrame, path: Path) -> Path:
    """One panel per sequence length: eval loss against ms per sequence (log), a labelled point
    per mechanism, coloured by family."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    seqs = sorted(rows["seq"].unique())
    fig, axes = plt.subplots(1, len(seqs), figsize=(4.2 * len(seqs), 4.2), sharey=True, squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        at = rows[rows["seq"] == seq]
        ax.scatter(at["ms_per_seq"], at["eval_loss"], c=at["family"].map(FAMILY_COLOURS).fillna("grey"), s=30, zorder=3)
        for point in at.itertuples():
            ax.annotate(f" {point.mechanism}", (point.ms_per_seq, point.eval_loss), fontsize=7, va="center")
        ax.set_xscale("log")
        ax.set_title(f"T = {seq:,}", fontsize=10)
        ax.set_xlabel("ms per sequence (fastest impl)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("final eval loss (lower is better)")
    legend = [Line2D([], [], marker="o", linestyle="", color=colour, label=family)
              for family, colour in FAMILY_COLOURS.items() if family in set(rows["family"])]
    axes[0][-1].legend(handles=legend, fontsize=8, frameon=False, loc="upper right")
    level, mode = rows["level"].iloc[0], rows["mode"].iloc[0]
    fig.suptitle(f"Quality against speed: causal {level} {mode}, each mechanism's fastest impl", y=1.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
