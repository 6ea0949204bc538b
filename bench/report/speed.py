"""The speed runs' part of `attnbench report`: speed.csv rows as one frame, the numbers drawn from
them (complexity exponents, speedups, variant costs, the fastest impl) and their figures.

Figures (one set per setup: level, dtype, device, heads, kv_heads, head_dim; one figure per
mode, one panel per mechanism), one colour per impl everywhere, solid causal / dashed bidirectional:
latency vs T (log-log, p20-p80 band), TFLOP/s vs T, peak memory vs T, speedup over a
baseline impl, and the fitted complexity exponent: the slope of log(time per sequence)
against log T over the largest points, with its R^2. Decode rows (T is their context L) get
their own figure instead (bench/report/decode.py): time per step against L with the bandwidth bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnbench import flops, store
from attnbench.timing import within_spread
from attnbench.errors import InputError
from attnbench.report.decode import capacity_figure, decode_figure

NUMERIC = ["batch", "seq", "heads", "kv_heads", "head_dim", "ms_median", "ms_p20", "ms_p80", "first_call_ms",
           "tokens_per_s", "flops", "tflops", "pct_peak", "peak_mem_mib", "params",
           "queries", "bytes", "gbps", "pct_bandwidth", "mem_per_seq_mib"]
SETUP = ["level", "dtype", "device", "heads", "kv_heads", "head_dim"]
SERIES = ["run", "mechanism", "impl", "mode", "causal", "window"]
FIT_POINTS = 3  # the exponent is fitted over this many largest sequence lengths
MIN_FIT_POINTS = 3  # on fewer, no exponent: a line through two points always fits (R^2 = 1 says nothing)

FLOP_CONVENTION = (
    f"{flops.CONVENTION} fwd runs without autograd; "
    "bwd times the backward alone. The exponent is the slope of log(median ms / batch) against "
    "log T over the largest points (time per sequence, so fixed-token sweeps compare fairly)."
)


# ---- loading


def load_speed(run_dirs: list[Path]) -> pd.DataFrame:
    """The speed.csv rows of ``run_dirs`` as one frame with a ``run`` column, numbers parsed."""
    frames = []
    for run in run_dirs:
        rows = store.read_cases(run / store.SPEED_CSV)
        frame = pd.DataFrame(rows, columns=store.SPEED_COLUMNS).assign(run=run.name)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    try:
        for column in NUMERIC:
            df[column] = pd.to_numeric(df[column].replace("", np.nan))
    except ValueError as err:
        raise InputError(f"corrupt speed.csv in {', '.join(str(r) for r in run_dirs)}: {err}") from None
    bad = set(df["status"]) - set(store.STATUSES)
    if bad:
        raise InputError(f"corrupt speed.csv: unknown status {sorted(bad)[0]!r}")
    # a scheme or options the run crossed name the series: rope+alibi... (empty in runs before schema 3)
    df["mechanism"] = df["mechanism"] + df["positions"].map(lambda s: f"+{s}" if s else "") + df["options"].map(lambda o: f" [{o}]" if o else "")
    df["causal"] = df["causal"].map({"True": "causal", "False": "bidirectional"})
    df["window"] = df["window"].replace("", "none")
    return df


def impl_order() -> list[str]:
    """Every registered impl name, registry order: fixes each impl's colour across reports."""
    from attnbench.models.registry import mechanisms

    return list(dict.fromkeys(impl for m in mechanisms().values() for impl in m.impls))


# ---- numbers


def exponents(df: pd.DataFrame) -> pd.DataFrame:
    """Per series of at least two lengths: slope of log(ms per sequence) vs log T over the
    FIT_POINTS largest T, R^2 and the points used; exponent and R^2 are NaN (refused) on fewer
    than MIN_FIT_POINTS points."""
    ok = df[df["status"] == "ok"].assign(ms_per_seq=lambda d: d["ms_median"] / d["batch"])
    out = []
    for key, group in ok.groupby(SETUP + SERIES, dropna=False):
        per_seq = group.groupby("seq")["ms_per_seq"].median().sort_index().tail(FIT_POINTS)
        if len(per_seq) < 2:
            continue
        slope, r2 = _fit(per_seq) if len(per_seq) >= MIN_FIT_POINTS else (np.nan, np.nan)
        out.append({**dict(zip(SETUP + SERIES, key)), "exponent": slope, "r2": r2, "points": len(per_seq),
                    "seq_range": f"{per_seq.index.min()}-{per_seq.index.max()}"})
    return pd.DataFrame(out)


def _fit(per_seq: pd.Series) -> tuple[float, float]:
    """Slope and R^2 of the least-squares line through log(ms per sequence) against log T."""
    x, y = np.log(per_seq.index.to_numpy(float)), np.log(per_seq.to_numpy(float))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    return slope, r2


def exponent_table(fits: pd.DataFrame) -> pd.DataFrame:
    """``fits`` as shown in the reports and the terminal: exponent to 2 decimals and R^2 to 3,
    written out as text, or "n/a (N points)" and "n/a" where the fit was refused."""
    refused = fits["exponent"].isna()
    exponent = fits["exponent"].round(2).map("{:.4g}".format).where(~refused, "n/a (" + fits["points"].astype(str) + " points)")
    return fits.assign(exponent=exponent, r2=fits["r2"].round(3).map("{:.4g}".format).where(~refused, "n/a"))


REFERENCE_COLUMNS = {"ms_median": "ref_ms", "ms_p20": "ref_p20", "ms_p80": "ref_p80", "peak_mem_mib": "ref_mem"}


def _beside_reference(df: pd.DataFrame, column: str, reference: str, keys: list[str]) -> pd.DataFrame:
    """The ok rows whose ``column`` is not ``reference``, each joined (on ``keys``) with the
    reference row's ms_median, ms_p20, ms_p80 and peak_mem_mib as ref_ms, ref_p20, ref_p80 and ref_mem."""
    ok = df[df["status"] == "ok"]
    base = ok[ok[column] == reference][keys + list(REFERENCE_COLUMNS)]
    return ok[ok[column] != reference].merge(base.rename(columns=REFERENCE_COLUMNS), on=keys)


def speedups(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """For every ok case that the baseline also ran: speedup = baseline median / impl median,
    memory = impl peak memory / baseline peak memory, and within_spread: the two p20-p80 ranges
    overlap, so the medians' order is not outside the timing's own spread (False where a range is missing)."""
    joined = _beside_reference(df, "impl", baseline, ["run", *SETUP, "mechanism", "mode", "causal", "window", "batch", "seq"])
    within = within_spread(joined["ms_p20"], joined["ms_p80"], joined["ref_p20"], joined["ref_p80"])
    return joined.assign(speedup=joined["ref_ms"] / joined["ms_median"], memory=joined["peak_mem_mib"] / joined["ref_mem"],
                         within_spread=within)


def spread_overlaps(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """The speedups over ``baseline`` whose p20-p80 ranges overlap (speedups' within_spread), one row each:
    the case, the impl, the speedup (2 decimals) and both ranges in ms."""
    ratios = speedups(df, baseline)
    inside = ratios[ratios["within_spread"]]
    if inside.empty:
        return pd.DataFrame()

    def span(low: pd.Series, high: pd.Series) -> pd.Series:
        return low.map("{:.4g}".format) + "-" + high.map("{:.4g}".format)

    return inside[CASE_INDEX + ["impl"]].assign(speedup=inside["speedup"].round(2), impl_p20_p80=span(inside["ms_p20"], inside["ms_p80"]),
                                               **{f"{baseline}_p20_p80": span(inside["ref_p20"], inside["ref_p80"])}).reset_index(drop=True)


CASE_INDEX = ["run", "head_dim", "mechanism", "mode", "causal", "window", "seq"]


def _per_case(ratios: pd.DataFrame, value: str) -> pd.DataFrame:
    """``ratios[value]`` as one row per case (CASE_INDEX) and one column per impl, 2 decimals."""
    if ratios.empty:
        return pd.DataFrame()
    wide = ratios.pivot_table(index=CASE_INDEX, columns="impl", values=value, dropna=False).round(2)
    return wide.dropna(how="all").reset_index().rename_axis(columns=None)


def speedup_table(df: pd.DataFrame, baseline: str, value: str = "speedup") -> pd.DataFrame:
    """One row per case, one column per impl: baseline median / impl median (value="speedup"),
    or impl peak memory / baseline peak memory (value="memory")."""
    return _per_case(speedups(df, baseline), value)


def variant_costs(df: pd.DataFrame, reference: str = "standard") -> pd.DataFrame:
    """What each variant costs over the ``reference`` mechanism in the same run and impl:
    one row per case, one column per impl, variant median / reference median."""
    joined = _beside_reference(df, "mechanism", reference, ["run", *SETUP, "impl", "mode", "causal", "batch", "seq"])
    return _per_case(joined.assign(cost=joined["ms_median"] / joined["ref_ms"]), "cost")


def fastest(df: pd.DataFrame) -> pd.DataFrame:
    """At the largest T of each case: the fastest impl, its median ms and TFLOP/s, and the runner-up ratio."""
    ok = df[df["status"] == "ok"]
    keys = ["run", *SETUP, "mechanism", "mode", "causal", "window"]
    rows = []
    for key, group in ok.groupby(keys, dropna=False):
        largest = group[group["seq"] == group["seq"].max()].sort_values("ms_median")
        best = largest.iloc[0]
        runner = largest.iloc[1] if len(largest) > 1 else None
        rows.append({**dict(zip(keys, key)), "T": int(best["seq"]), "fastest": best["impl"],
                     "ms": best["ms_median"], "TFLOP/s": best["tflops"],
                     "next": "" if runner is None else f"{runner['impl']} ({runner['ms_median'] / best['ms_median']:.2f}x)"})
    return pd.DataFrame(rows)


# ---- figures


@dataclass
class Figure:
    path: Path
    caption: str


def slug(value: str) -> str:
    """A value as it may appear in a file name: only letters, digits and ``.+_-`` stay
    ('cuda:0' -> 'cuda0'), so a value read from a CSV never names a folder ('a/b' -> 'ab')."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "", value)


def setups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(slug, rows) per setup; the slug names the files (latency-kernel-bf16-h16-kv16-d64.png)."""
    out = []
    for key, group in df.groupby(SETUP, dropna=False):
        level, dtype, device, heads, kv_heads, head_dim = key
        out.append((slug(f"{level}-{dtype}-{device}-h{heads:g}-kv{kv_heads:g}-d{head_dim:g}"), group))
    return out


def seq_label(value: float, _pos=None) -> str:
    """T as the figures' axes and the tables show it: 512, 1k, 16k (a multiple of 1024 in k)."""
    value = int(round(value))
    return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


def _num_label(value: float, _pos=None) -> str:
    return f"{value:g}"


def _draw(data: pd.DataFrame, y: str, band: tuple[str, str] | None, palette: dict[str, Any], markers: dict[str, str], **_):
    import matplotlib.pyplot as plt

    ax = plt.gca()
    for (impl, causal, run), series in data.groupby(["impl", "causal", "run"]):
        series = series.sort_values("seq")
        style = "-" if causal == "causal" else "--"
        ax.plot(series["seq"], series[y], style, color=palette[impl], marker=markers[run], markersize=4, linewidth=1.6)
        repeated = _repeated(series).to_numpy()
        if band and repeated.any():  # filled between neighbouring lengths that were both timed more than once
            ax.fill_between(series["seq"], series[band[0]], series[band[1]], where=repeated, color=palette[impl],
                            alpha=0.15, linewidth=0)


def _repeated(rows: pd.DataFrame) -> pd.Series:
    """Rows timed more than once. No column counts the repetitions, but a case timed once (on
    CPU a single block of blocked_autorange, on CUDA a call too slow for do_bench to repeat)
    writes p20 == median == p80."""
    return rows["ms_p20"] < rows["ms_p80"]


def _latency_caption(mode: str, rows: pd.DataFrame) -> str:
    """The latency figure's caption: it promises the p20-p80 band only where one is drawn."""
    repeated = _repeated(rows)
    band = "" if not repeated.any() else ", band p20-p80" + ("" if repeated.all() else " where timed more than once")
    return f"{mode}: median latency vs T{band}"


MODE_ORDER = ("fwd", "bwd", "fwdbwd")


def _modes(data: pd.DataFrame) -> list[str]:
    """The training-shaped modes of ``data``, in order (decode has figures of its own)."""
    return [m for m in MODE_ORDER if m in set(data["mode"])]


def _all_modes(data: pd.DataFrame) -> list[str]:
    """Every mode of ``data``: the training-shaped ones in order, then decode."""
    return _modes(data) + sorted(set(data["mode"]) - set(MODE_ORDER))


def _facet(data: pd.DataFrame, y: str, ylabel: str, logy: bool, *, path: Path, palette, markers, title: str,
           band: tuple[str, str] | None = None, hline: float | None = None) -> Path:
    """One panel per mechanism (wrapped, 4 a row), x = T on a log2 axis labelled with the real T."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    mechanisms = list(dict.fromkeys(data["mechanism"]))
    g = sns.FacetGrid(data, col="mechanism", col_order=mechanisms, col_wrap=min(4, len(mechanisms)),
                      height=3.0, aspect=1.35, sharey=False)
    g.map_dataframe(_draw, y=y, band=band, palette=palette, markers=markers)
    seqs = sorted(data["seq"].unique())
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(seqs))
        ax.xaxis.set_major_formatter(FuncFormatter(seq_label))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(_num_label))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if hline is not None:
            ax.axhline(hline, color="0.4", linewidth=1, linestyle=":")
        ax.grid(True, which="major", alpha=0.3)
    g.set_axis_labels("sequence length T", ylabel)
    g.set_titles(col_template="{col_name}")
    handles = {impl: Line2D([], [], color=palette[impl], linewidth=2) for impl in sorted(set(data["impl"]), key=list(palette).index)}
    for causal, style in (("causal", "-"), ("bidirectional", "--")):
        if causal in set(data["causal"]):
            handles[causal] = Line2D([], [], color="0.3", linestyle=style)
    runs = [run for run in markers if run in set(data["run"])]
    if len(runs) > 1:  # a marker per run only where this figure holds several
        handles |= {run: Line2D([], [], color="0.3", marker=markers[run], linestyle="") for run in runs}
    g.add_legend(legend_data=handles, title="")
    g.figure.suptitle(title, y=1.02)
    g.figure.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(g.figure)
    return path


def best_per_sequence(rows: pd.DataFrame) -> pd.DataFrame:
    """Per mechanism, causal and T: the fastest impl's median ms per sequence (ms / batch)."""
    per_seq = rows.assign(ms_per_seq=rows["ms_median"] / rows["batch"]).reset_index(drop=True)
    best = per_seq.loc[per_seq.groupby(["mechanism", "causal", "seq"])["ms_per_seq"].idxmin()]
    return best[["mechanism", "causal", "seq", "impl", "ms_per_seq"]].reset_index(drop=True)


def _crossover_figure(rows: pd.DataFrame, *, path: Path, palette, title: str) -> Path:
    """Log-log time per sequence against T, one line per mechanism (its fastest impl at each T),
    so the lengths where a sub-quadratic mechanism overtakes exact attention read off the crossings."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    best = best_per_sequence(rows)
    mechanisms = list(dict.fromkeys(best.sort_values("ms_per_seq", ascending=False)["mechanism"]))
    colours = dict(zip(mechanisms, sns.color_palette("tab20", len(mechanisms))))
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for (mechanism, causal), line in best.groupby(["mechanism", "causal"]):
        line = line.sort_values("seq")
        ax.plot(line["seq"], line["ms_per_seq"], "-" if causal == "causal" else "--", marker="o", markersize=4,
                color=colours[mechanism], linewidth=1.8, label=mechanism)
        last = line.iloc[-1]
        ax.annotate(f" {mechanism}", (last["seq"], last["ms_per_seq"]), fontsize=8, color=colours[mechanism], va="center")
    seqs = sorted(best["seq"].unique())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(seqs))
    ax.xaxis.set_major_formatter(FuncFormatter(seq_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(seqs[0] / 1.2, seqs[-1] * 2.2)  # room for the labels at the line ends
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms per sequence (fastest impl)")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, ncol=2, frameon=False, loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def _exponent_figure(fits: pd.DataFrame, *, path: Path, palette, title: str) -> Path:
    """Grouped bars: mechanism on x, one bar per impl; rows: mode, columns: causal/bidirectional;
    dotted lines at k = 1 and 2."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from attnbench.models.registry import mechanisms as registered

    order = [i for i in palette if i in set(fits["impl"])]
    present = set(fits["mechanism"])
    mechanisms = [m for m in registered() if m in present] + sorted(present - set(registered()))
    bars = len(mechanisms) * len(order)
    g = sns.catplot(fits, x="mechanism", y="exponent", hue="impl", hue_order=order, row="mode", row_order=_all_modes(fits),
                    col="causal", order=mechanisms, kind="bar", palette=palette, errorbar=None,
                    height=3.0, aspect=min(4.0, max(1.4, 0.07 * bars)), margin_titles=True)
    for ax in g.axes.flat:
        for level in (1.0, 2.0):
            ax.axhline(level, color="0.4", linewidth=1, linestyle=":")
        ax.tick_params(axis="x", labelrotation=30)
    g.set_axis_labels("", "exponent k (time ~ T^k)")
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    g.figure.suptitle(title, y=1.02)
    g.figure.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(g.figure)
    return path


def figures(df: pd.DataFrame, fits: pd.DataFrame, baseline: str, plots: Path) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    plots.mkdir(parents=True, exist_ok=True)
    known = impl_order()
    impls = [i for i in known if i in set(df["impl"])] + sorted(set(df["impl"]) - set(known))
    colours = sns.color_palette("tab10") + sns.color_palette("Dark2")
    palette = {impl: colours[n % len(colours)] for n, impl in enumerate(impls)}  # distinct within a report, in impl order
    markers = {run: "osD^vP*X"[i % 8] for i, run in enumerate(sorted(set(df["run"])))}
    out = []
    ok = df[df["status"] == "ok"]
    for setup, rows in setups(ok):

        def add(name: str, caption: str, draw, *args, **kwargs) -> None:
            path = plots / f"{slug(name)}-{setup}.png"
            out.append(Figure(draw(*args, path=path, palette=palette, title=f"{caption} ({setup})", **kwargs), f"{caption} ({setup})"))

        ratio = speedups(rows, baseline)
        decode = rows[rows["mode"] == "decode"]
        if not decode.empty:
            bound = ", dotted: the bandwidth bound" if decode["pct_bandwidth"].notna().any() else ""
            add("decode", f"decode: time per step vs context L{bound}", decode_figure, decode, seq_label=seq_label)
            add("decode-capacity", "decode: memory per sequence vs L, tokens/s vs batch", capacity_figure, decode, seq_label=seq_label)
        for mode in _modes(rows):
            in_mode, ratio_in_mode = rows[rows["mode"] == mode], ratio[ratio["mode"] == mode] if not ratio.empty else ratio
            add(f"latency-{mode}", _latency_caption(mode, in_mode), _facet, in_mode, "ms_median",
                "median latency (ms)", True, markers=markers, band=("ms_p20", "ms_p80"))
            add(f"tflops-{mode}", f"{mode}: throughput vs T", _facet, in_mode, "tflops", "TFLOP/s", False, markers=markers)
            if in_mode["peak_mem_mib"].notna().any():
                add(f"memory-{mode}", f"{mode}: peak memory vs T", _facet, in_mode[in_mode["peak_mem_mib"].notna()],
                    "peak_mem_mib", "peak memory (MiB)", True, markers=markers)
            if in_mode["mechanism"].nunique() > 1:
                add(f"crossover-{mode}", f"{mode}: time per sequence of each mechanism's fastest impl", _crossover_figure, in_mode)
            if not ratio_in_mode.empty:
                add(f"speedup-{mode}", f"{mode}: speedup over {baseline}", _facet, ratio_in_mode, "speedup",
                    f"speedup over {baseline} (x)", True, markers=markers, hline=1.0)
        setup_fits = fits.merge(rows[SETUP].drop_duplicates(), on=SETUP) if not fits.empty else fits
        fitted = setup_fits[setup_fits["exponent"].notna()] if not setup_fits.empty else setup_fits
        if not fitted.empty:
            add("exponent", _exponent_caption(len(setup_fits) - len(fitted)), _exponent_figure, fitted)
    return out


def exponent_note(fits: pd.DataFrame) -> str:
    """The sentence above the exponent table; it says why a fit reads n/a where one does."""
    note = f"Slope of log(ms per sequence) vs log T over the {FIT_POINTS} largest T."
    if fits["exponent"].isna().any():
        note += f" n/a: fewer than {MIN_FIT_POINTS} lengths to fit (a line passes through two points exactly: R^2 = 1 says nothing)."
    return note


def _exponent_caption(refused: int) -> str:
    """The exponent figure's caption, naming the series it leaves out (n/a in the table)."""
    left_out = f"; n/a for {refused} series fitted on fewer than {MIN_FIT_POINTS} T" if refused else ""
    return f"Fitted exponent k, time per sequence ~ T^k over the {FIT_POINTS} largest T{left_out}"
