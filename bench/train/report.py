"""The report of training runs: learning curves side by side, length extrapolation, a table.

    render_train_report([run_dir, ...], out_dir) -> [PNG paths]
        out_dir/plots/train_curves.png    train loss, eval loss, eval perplexity, learning rate
        out_dir/plots/extrapolation.png   perplexity against evaluation length (clm runs)
        out_dir/train_report.md           final metrics, steps to a target loss, tokens/s, parameters
    report_sections([run_dir, ...])    -> the eval-loss table and its notes, for report.md/.html

One line per mechanism, named "<run>/<attn>" where several runs have that mechanism.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from attnbench import store
from attnbench.errors import InputError
from attnbench.train import grid
from attnbench.train.columns import (
    ADDED_COLUMNS, ENTROPY_COLUMNS, ENTROPY_CSV, EXTRAPOLATION_COLUMNS, EXTRAPOLATION_CSV, INFERENCE_COLUMNS, INFERENCE_CSV,
    TRAIN_COLUMNS,
)


def train_rows(run_dir: Path) -> pd.DataFrame:
    """A run's train.csv, every TRAIN_COLUMNS column, values as written (strings)."""
    return _rows(run_dir / store.TRAIN_CSV, TRAIN_COLUMNS)


def _rows(path: Path, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(store.read_rows(path, columns, ADDED_COLUMNS), columns=columns)


def _crosses_schemes(run_dir: Path) -> bool:
    """The run was asked for position schemes (--positions): its models are named attn+scheme."""
    return isinstance(store.read_meta(run_dir).get("spec", {}).get("positions"), list)


class Loaded(NamedTuple):
    """The rows of training runs, each with a ``line`` label (the model's name, its run's before
    it where several runs have it), and each line's model description (meta.json's models)."""

    train: pd.DataFrame
    extrapolation: pd.DataFrame
    entropy: pd.DataFrame
    inference: pd.DataFrame
    models: dict[str, dict]


def _load(run_dirs: list[Path]) -> Loaded:
    """Loaded of ``run_dirs`` (folders of `attnbench train`); numeric columns parsed."""
    runs = [(run_dir, train_rows(run_dir)) for run_dir in run_dirs]
    for run_dir, rows in runs:  # the model's name in its run (train's Cell.name)
        rows["cell"] = rows["attn"] + "+" + rows["positions"] if _crosses_schemes(run_dir) else rows["attn"]
    seen_in = Counter(cell for _, rows in runs for cell in rows["cell"].unique())  # runs per model name
    curves, extrapolation, entropy, inference, models = [], [], [], [], {}
    for run_dir, rows in runs:
        crossed = _crosses_schemes(run_dir)

        def line(row) -> str:  # the model's name, and its run where several runs have it
            cell = f"{row['attn']}+{row['positions']}" if crossed else row["attn"]
            return f"{run_dir.name}/{cell}" if seen_in[cell] > 1 else cell

        rows["line"] = rows.apply(line, axis=1) if len(rows) else pd.Series(dtype=str)
        rows["task"] = store.read_meta(run_dir).get("spec", {}).get("task", "")
        rows["crossed"] = crossed  # a cell of a grid of position schemes (train --positions)
        curves.append(rows.rename(columns={"cell": "model"}))
        optional = ((EXTRAPOLATION_CSV, EXTRAPOLATION_COLUMNS, extrapolation), (ENTROPY_CSV, ENTROPY_COLUMNS, entropy),
                    (INFERENCE_CSV, INFERENCE_COLUMNS, inference))
        for name, columns, found in optional:
            if (run_dir / name).exists():
                extra = _rows(run_dir / name, columns)
                if len(extra):
                    extra["line"] = extra.apply(line, axis=1)
                    found.append(extra)
        for cell, described in store.read_meta(run_dir).get("models", {}).items():
            models[f"{run_dir.name}/{cell}" if seen_in[cell] > 1 else cell] = described
    train = pd.concat(curves, ignore_index=True)
    for column in ("step", "loss", "ppl", "accuracy", "lr", "tokens_per_s", "peak_mem_mib"):
        train[column] = pd.to_numeric(train[column], errors="coerce")
    extra = pd.concat(extrapolation, ignore_index=True) if extrapolation else pd.DataFrame(columns=[*EXTRAPOLATION_COLUMNS, "line"])
    for column in ("seq", "ppl", "loss"):
        extra[column] = pd.to_numeric(extra[column], errors="coerce")
    entropy = pd.concat(entropy, ignore_index=True) if entropy else pd.DataFrame(columns=[*ENTROPY_COLUMNS, "line"])
    for column in ("step", "layer", "entropy"):
        entropy[column] = pd.to_numeric(entropy[column], errors="coerce")
    inference = pd.concat(inference, ignore_index=True) if inference else pd.DataFrame(columns=[*INFERENCE_COLUMNS, "line"])
    for column in ("seq", "tokens_per_s"):
        inference[column] = pd.to_numeric(inference[column], errors="coerce")
    return Loaded(train, extra, entropy, inference, models)


def _line_styles(lines) -> dict[str, dict]:
    """A distinct colour per line (husl, so 15 mechanisms stay apart), dashes cycling in threes."""
    import seaborn as sns

    lines = list(dict.fromkeys(lines))
    colors = sns.color_palette("husl", max(len(lines), 1))
    return {line: {"color": colors[i], "linestyle": ("-", "--", ":")[i % 3]} for i, line in enumerate(lines)}


def _plain_log_ticks(ax, axis: str = "y") -> None:
    """Log axis with plain numbers (5.2, 300) instead of 5.2 x 10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    target = ax.yaxis if axis == "y" else ax.xaxis

    def minor(value, _pos) -> str:  # minor labels only where the axis spans under a decade (few majors)
        lo, hi = sorted(target.get_view_interval())
        return f"{value:.3g}" if lo > 0 and hi / lo <= 10 else ""

    target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    target.set_minor_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    target.set_minor_formatter(FuncFormatter(minor))


def _curves_figure(train: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = _draw_curves(train)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panels(ok: pd.DataFrame, axes) -> list[tuple]:
    """(axis, rows, column, title, log y) of the 2 x 2 figure. Causal-LM runs: train loss, eval
    loss, eval perplexity, learning rate. Masked-LM runs (the seeds' BERT figure): training MLM
    loss, evaluation MLM loss, training LM loss (that of the clm runs of the same models in the
    report; masked-token accuracy where it holds none, said in the title), learning rate."""
    mlm, clm = ok[ok["task"] == "mlm"], ok[ok["task"] != "mlm"]
    if mlm.empty:
        return [
            (axes[0, 0], ok[ok["split"] == "train"], "loss", "train loss", True),
            (axes[0, 1], ok[ok["split"] == "valid"], "loss", "eval loss", True),
            (axes[1, 0], ok[ok["split"] == "valid"], "ppl", "eval perplexity", True),
            (axes[1, 1], ok[ok["split"] == "train"], "lr", "learning rate", False),
        ]
    lm = clm[(clm["split"] == "train") & clm["model"].isin(set(mlm["model"]))]
    third = (
        (axes[1, 0], lm, "loss", "training LM loss (the clm runs of the same models)", True) if not lm.empty
        else (axes[1, 0], mlm[mlm["split"] == "valid"], "accuracy", "evaluation masked-token accuracy (no clm run of these models)", False)
    )
    return [
        (axes[0, 0], mlm[mlm["split"] == "train"], "loss", "training MLM loss", True),
        (axes[0, 1], mlm[mlm["split"] == "valid"], "loss", "evaluation MLM loss", True),
        third,
        (axes[1, 1], mlm[mlm["split"] == "train"], "lr", "learning rate", False),
    ]


def _draw_curves(train: pd.DataFrame):
    """The 2 x 2 figure of _panels against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ok = train[train["status"] == "ok"]
    styles = _line_styles(ok["line"])
    for ax, panel, column, title, log_y in _panels(ok, axes):
        for line, rows in panel.groupby("line", sort=False):
            values = rows[column]
            if rows["split"].iloc[0] == "train" and column == "loss" and len(values) > 50:
                values = values.rolling(max(1, len(values) // 50), min_periods=1).mean()  # smoothed: per-step noise hides the trend
            marker = "o" if rows["split"].iloc[0] == "valid" or len(rows) == 1 else None
            ax.plot(rows["step"], values, label=line, marker=marker, markersize=3 if len(rows) > 1 else 7, **styles[line])
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        if panel["step"].nunique() == 1:
            _frame_one_step(ax, ok["step"], panel[column])
        ax.grid(alpha=0.3)
    handles, labels = {}, {}
    for ax in axes.flat:  # every line once, also those of the third panel's clm runs
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    return fig


def _frame_one_step(ax, steps: pd.Series, values: pd.Series) -> None:
    """Limits for a panel whose points all sit at one step (a run evaluated once): x spans the
    run's steps and y 10% around the values, where matplotlib would draw 5% around the step
    (48 to 52) and a decade around the value."""
    ax.set_xlim(0, max(float(steps.max()), 1.0) * 1.05)
    finite = values[values.map(math.isfinite)]
    if len(finite) and finite.min() > 0:
        ax.set_ylim(finite.min() / 1.1, finite.max() * 1.1)


def _extrapolation_figure(extra: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    styles = _line_styles(extra["line"])
    for ax, method in zip(axes, ("blocks", "sliding")):
        rows = extra[(extra["method"] == method) & (extra["status"] == "ok")]
        for line, per_line in rows.groupby("line", sort=False):
            ax.plot(per_line["seq"], per_line["ppl"], marker="o", label=line, **styles[line])
        unsupported = sorted(set(extra[(extra["method"] == method) & (extra["status"] == "unsupported")]["line"]))
        title = f"{'non-overlapping blocks' if method == 'blocks' else 'sliding window'}"
        if unsupported:  # wrapped: with many mechanisms the list is longer than the panel
            title += "\n" + textwrap.fill(f"(cannot run past training length: {', '.join(unsupported)})", 70)
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(rows["seq"].dropna().astype(int))) or [1])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v)}"))
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("evaluation length (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test perplexity")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def steps_to_loss(rows: pd.DataFrame, target: float) -> int | None:
    """The first evaluation step whose loss is <= target, or None."""
    hit = rows[rows["loss"] <= target]
    return None if hit.empty else int(hit["step"].iloc[0])


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


EVAL_COLUMNS = ["mechanism", "steps", "eval loss", "eval ppl", "eval acc", "best eval loss @ step", "steps to target",
                "tokens/s", "peak MiB", "params", "attention params"]


INFERENCE_HEADERS = {1: "infer tok/s @L", 4: "infer tok/s @4L"}  # shown when the runs measured inference.csv


def eval_summary(loaded: Loaded, target_loss: float | None = None) -> tuple[list[str], pd.DataFrame, list[str]]:
    """The eval-loss table that train_report.md and report.md/.html show: the notes above it, one
    row per line (its final evaluation; cells as text, EVAL_COLUMNS, then INFERENCE_HEADERS where
    measured) and a line per failure. ``target_loss``: the loss "steps to target" counts to
    (default: the worst final eval loss, which every line reaches)."""
    train, models, inference = loaded.train, loaded.models, loaded.inference
    valid = train[(train["split"] == "valid") & (train["status"] == "ok")]
    finals = valid.groupby("line", sort=False).last()
    worst = target_loss is None
    target = (float(finals["loss"].max()) if len(finals) else float("nan")) if worst else target_loss
    notes = [
        f"Steps to eval loss {target:.4g}: the first evaluation at or below "
        + ("the worst final eval loss." if worst else "the --target-loss given (-: never reached)."),
        "Best: the lowest eval loss and its step (below the final one when the model overfits).",
    ]
    ran = inference[inference["status"] == "ok"]
    columns = EVAL_COLUMNS + (list(INFERENCE_HEADERS.values()) if len(ran) else [])
    rows = []
    for line, final in finals.iterrows():
        trained = train[(train["line"] == line) & (train["split"] == "train") & (train["status"] == "ok")]
        params = models.get(line, {}).get("params", {})
        evals = valid[valid["line"] == line]
        best = evals.sort_values("loss").iloc[0]
        row = [
            line, str(int(final["step"])), _fmt(final["loss"]), _fmt(final["ppl"]), _fmt(final["accuracy"], 3),
            f"{_fmt(best['loss'])} @ {int(best['step'])}", _fmt(steps_to_loss(evals, target)),
            _fmt(float(trained["tokens_per_s"].median()), 3), _fmt(float(trained["peak_mem_mib"].max()), 4),
            _fmt(params.get("total")), _fmt(params.get("attention")),
        ]
        if len(ran):
            mine = inference[inference["line"] == line]
            row += [_inference_cell(mine, factor * mine["seq"].min()) for factor in INFERENCE_HEADERS]
        rows.append(row)
    failures = [f"{row['line']}: unsupported: {row['message']}" if row["status"] == "unsupported"
                else f"{row['line']}: {row['status']} at step {int(row['step'])}: {row['message']}"
                for _, row in train[train["status"] != "ok"].iterrows()]
    return notes, pd.DataFrame(rows, columns=columns), failures


def _inference_cell(rows: pd.DataFrame, seq: float) -> str:
    """tokens/s of the inference row at ``seq``, else its status (unsupported past learned positions), else -."""
    at = rows[rows["seq"] == seq]
    if at.empty:
        return "-"
    return _fmt(float(at["tokens_per_s"].iloc[0]), 3) if at["status"].iloc[0] == "ok" else at["status"].iloc[0]


def _table(loaded: Loaded, target_loss: float | None) -> list[str]:
    """eval_summary as the lines of train_report.md."""
    notes, table, failures = eval_summary(loaded, target_loss)
    lines = [notes[0], "", notes[1], "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
    return lines + [f"\n{failure}" for failure in failures]


def report_sections(run_dirs: list[Path], target_loss: float | None = None) -> list[tuple[str, object]]:
    """What report.md/.html show of these runs beside their figures: train_report.md's eval-loss
    table with its notes, as (kind, content) sections ("p" text, "table" frame)."""
    notes, table, failures = eval_summary(_load([Path(d) for d in run_dirs]), target_loss)
    return [*(("p", note) for note in notes), ("table", table), *(("p", failure) for failure in failures)]


def _efficiency_figure(train: pd.DataFrame, models: dict[str, dict], path: Path) -> bool:
    """Final eval loss against non-embedding parameters, a point per line (the seeds' parameter
    efficiency); False (nothing drawn) with fewer than two lines that have both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = train[(train["split"] == "valid") & (train["status"] == "ok")].groupby("line", sort=False)["loss"].last()
    points = {line: (p["total"] - p["embeddings"], loss) for line, loss in finals.items()
              if (p := models.get(line, {}).get("params", {})).get("total") is not None and "embeddings" in p}
    if len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line, (params, loss) in points.items():
        ax.scatter(params / 1e6, loss, s=30)
        ax.annotate(line, (params / 1e6, loss), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("non-embedding parameters (millions)")
    ax.set_ylabel("final eval loss")
    ax.set_title("parameter efficiency (lower left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render_train_report(run_dirs: list[Path], out_dir: Path, target_loss: float | None = None) -> list[Path]:
    """Figures and train_report.md for the runs in ``run_dirs`` (folders holding train.csv); returns
    the PNGs. ``target_loss``: what "steps to target" counts to (eval_summary)."""
    if not run_dirs:
        raise InputError("no training runs to report")
    loaded = _load([Path(d) for d in run_dirs])
    train, extra, entropy, models = loaded.train, loaded.extrapolation, loaded.entropy, loaded.models
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    pngs = [plots / "train_curves.png"]
    _curves_figure(train, pngs[0])
    if not extra.empty:
        pngs.append(plots / "extrapolation.png")
        _extrapolation_figure(extra, pngs[-1])
    if grid.is_grid(train):
        pngs.append(plots / "grid.png")
        grid.heatmaps(train, pngs[-1])
    if not entropy.empty:
        pngs.append(plots / "entropy.png")
        grid.entropy_figure(entropy, pngs[-1])
    if _efficiency_figure(train, models, plots / "efficiency.png"):
        pngs.append(plots / "efficiency.png")
    md = ["# Training report", "", f"Runs: {', '.join(str(d) for d in run_dirs)}", "", *_table(loaded, target_loss), ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in pngs]
    if not extra.empty:
        md += ["", "## Length extrapolation (test perplexity)", "", "| mechanism | method | length | ppl | status |", "|---|---|---|---|---|"]
        for _, row in extra.iterrows():
            md.append(f"| {row['line']} | {row['method']} | {int(row['seq'])} | {_fmt(row['ppl'])} | {row['status']} {row['message']} |")
    md += ["", "## Models", "", "```json", json.dumps(models, indent=1, default=str), "```", ""]
    (out_dir / "train_report.md").write_text("\n".join(md))
    return pngs
