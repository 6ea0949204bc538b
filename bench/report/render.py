"""`attnbench report`: figures, report.md and a self-contained report.html from one or more runs.

report.md and report.html are rendered from one list of sections, so they say the same: the
runs, then the speed runs' tables and figures (report/speed.py), the training and distillation
runs' (train/report.py, distill/report.py), and quality against speed where both were given
(report/tradeoff.py).
"""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench import store
from attnbench.distill import report as distill_report
from attnbench.errors import InputError
from attnbench.report import tradeoff
from attnbench.report.decode import CROSSOVER_NOTE, crossover_table
from attnbench.report.speed import (
    FLOP_CONVENTION, Figure, exponent_note, exponent_table, exponents, fastest, figures, load_speed, setups,
    speedup_table, speedups, spread_overlaps, variant_costs,
)
from attnbench.train import report as train_report


def resolve_runs(runs: list[Path]) -> list[Path]:
    if not runs:
        return [store.latest_run()]
    for run in runs:
        if not run.is_dir():
            raise InputError(f"no run folder {run}")
        if not any((run / name).exists() for name in store.RUN_CSVS):
            raise InputError(f"{run} holds none of {', '.join(store.RUN_CSVS)}")
    return runs


def _sections(run_dirs: list[Path], df: pd.DataFrame | None, figs: list[Figure], fits: pd.DataFrame,
              baselines: list[str], other: dict[str, list[tuple[str, Any]]]) -> list[tuple[str, Any]]:
    sections: list[tuple[str, Any]] = [("h1", "attnbench report"), ("h2", "Runs")]
    sections.append(("table", pd.DataFrame([_run_summary(run) for run in run_dirs])))
    if df is not None:
        sections += [("h2", "Convention"), ("p", FLOP_CONVENTION)]
        counts = df.groupby(["run", "status"]).size().unstack(fill_value=0).reset_index()
        sections += [("h2", "Status"), ("table", counts)]
        problems = df[df["status"].isin(["error", "oom"])]
        if not problems.empty:
            sections.append(("table", problems[["run", "mechanism", "impl", "level", "mode", "batch", "seq", "status", "message"]]))
        best = fastest(df)
        if not best.empty:
            sections += [("h2", "Fastest impl at the largest T"), ("table", best)]
        for i, base in enumerate(baselines):
            table = speedup_table(df, base)
            if not table.empty:
                sections += [("h2", f"Speedup over {base}"), ("p", f"{base} median / impl median, per case (> 1: faster than {base})."),
                             ("table", table)]
            overlaps = spread_overlaps(df, base)
            if not overlaps.empty:
                sections += [("p", f"{len(overlaps)} of these {len(speedups(df, base))} ratios lie within the timing's spread: "
                                   f"the impl's p20-p80 range overlaps {base}'s, so the medians alone do not order them."),
                             ("table", overlaps)]
            memory = speedup_table(df, base, "memory") if i == 0 else pd.DataFrame()
            if not memory.empty:
                sections += [("h2", f"Peak memory relative to {base}"), ("p", f"impl peak memory / {base}'s (< 1: less memory)."),
                             ("table", memory)]
        costs = variant_costs(df)
        if not costs.empty:
            sections += [("h2", "Cost of each variant over standard"),
                         ("p", "variant median / standard median in the same run and impl (1.10 = 10% slower)."), ("table", costs)]
        decode = df[(df["status"] == "ok") & (df["mode"] == "decode")]
        tables = [crossover_table(rows).assign(setup=setup) for setup, rows in setups(decode)]
        tables = [table for table in tables if not table.empty]
        if tables:
            sections += [("h2", "Decode: where a recurrent state overtakes the KV cache"), ("p", CROSSOVER_NOTE),
                         ("table", pd.concat(tables, ignore_index=True))]
        sections.append(("h2", "Figures"))
        sections += [("figure", fig) for fig in figs]
        if not fits.empty:
            sections += [("h2", "Complexity exponents"), ("p", exponent_note(fits)), ("table", exponent_table(fits))]
    for title, content in other.items():
        sections += [("h2", title), *content]
    return sections


def _tradeoff_section(df: pd.DataFrame, train_runs: list[Path], path: Path) -> list[tuple[str, Any]]:
    """Quality against speed (report/tradeoff.py), where a trained mechanism was also timed."""
    rows = tradeoff.tradeoff_rows(df, train_runs)
    if rows.empty:
        return []
    level, mode = rows["level"].iloc[0], rows["mode"].iloc[0]
    caption = f"Quality against speed (causal {level} {mode})"
    return [("h2", "Quality against speed"),
            ("p", f"Final eval loss of each trained mechanism beside its fastest impl's time per sequence (causal, {level} "
                  f"level, {mode}); lower left is better. A mechanism trained in several runs: the run with the most steps."),
            ("table", tradeoff.tradeoff_table(rows)), ("figure", Figure(tradeoff.tradeoff_figure(rows, path), caption))]


def _run_summary(run: Path) -> dict[str, Any]:
    meta = store.read_meta(run)
    info = meta.get("env", {})
    gpus = info.get("gpus") or []
    return {
        "run": run.name,
        "command": meta.get("command", ""),
        "device": gpus[0]["name"] if gpus else info.get("cpu", ""),
        "torch": info.get("torch", ""),
        "triton": info.get("triton", ""),
        "git": info.get("git", ""),
        "started": meta.get("started", ""),
        "finished": meta.get("finished") or "unfinished",
    }


def _markdown(sections, out_dir: Path) -> str:
    lines = []
    for kind, content in sections:
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "table":
            lines += [_md_table(content), ""]
        elif kind == "figure":
            lines += [f"![{content.caption}]({content.path.relative_to(out_dir).as_posix()})", "", f"*{content.caption}*", ""]
    return "\n".join(lines)


def _md_table(df: pd.DataFrame) -> str:
    cells = df.astype(object).where(df.notna(), "").map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _html(sections) -> str:
    parts = []
    for kind, content in sections:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "table":
            parts.append(content.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0))
        elif kind == "figure":
            data = base64.b64encode(content.path.read_bytes()).decode()
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(content.caption)}">'
                         f"<figcaption>{html.escape(content.caption)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:.85em}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}"
             "th{background:#f4f4f4}img{max-width:100%}figcaption{color:#555;font-size:.9em}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>attnbench report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


# ---- the command


def _other_sections(run_dirs: list[Path], out_dir: Path, target_loss: float | None = None) -> dict[str, list[tuple[str, Any]]]:
    """Tables and figures of the training and distillation runs among ``run_dirs``, by section
    title; each report writes its own <kind>_report.md and plots/*.png into ``out_dir``;
    ``target_loss``: the training table's steps-to-target loss."""
    drawn = {}
    train_runs = [r for r in run_dirs if (r / store.TRAIN_CSV).exists()]
    if train_runs:
        pngs = train_report.render_train_report(train_runs, out_dir, target_loss)
        drawn["Training"] = [*train_report.report_sections(train_runs, target_loss), *_figures(pngs)]
    distill_runs = [r for r in run_dirs if (r / store.DISTILL_CSV).exists()]
    if distill_runs:
        drawn["Distillation"] = _figures(distill_report.render_distill_report(distill_runs, out_dir))
    return drawn


def _figures(paths: list[Path]) -> list[tuple[str, Figure]]:
    return [("figure", Figure(path, path.stem)) for path in paths if path.suffix == ".png"]


def _checked_baselines(df: pd.DataFrame, baselines: list[str] | None, speed_runs: list[Path]) -> list[str]:
    """The impls the speedups divide by (default: sdpa, else torch, else the first impl), each
    one in the runs; and the runs hold something to plot. Raises InputError otherwise."""
    impls = sorted(set(df["impl"]))
    baselines = baselines or [next((b for b in ("sdpa", "torch") if b in impls), impls[0])]
    for baseline in baselines:
        if baseline not in impls:
            raise InputError(f"--baseline {baseline} is not in these runs; impls: {', '.join(impls)}")
    if not (df["status"] == "ok").any():
        raise InputError(f"no ok rows in {', '.join(map(str, speed_runs))}: nothing to plot")
    return baselines


def render_report(runs: list[Path], out: Path | None, baselines: list[str] | None = None,
                  target_loss: float | None = None) -> list[Path]:
    """Write plots/*.png, report.md and report.html; print a summary. Returns the files written.
    ``baselines``: impls the speedup tables divide by; the first one also drives the speedup plots;
    ``target_loss``: the eval loss training runs' steps to convergence count to."""
    from attnbench import console

    run_dirs = resolve_runs(runs)
    for run in run_dirs:
        store.read_meta(run)  # a folder without readable meta.json is no run
    speed_runs = [r for r in run_dirs if (r / store.SPEED_CSV).exists()]
    out_dir = out or (run_dirs[0] if len(run_dirs) == 1 else run_dirs[0].parent / f"report-{datetime.now():%Y%m%d-%H%M%S}")
    df = load_speed(speed_runs) if speed_runs else None
    if df is not None:
        baselines = _checked_baselines(df, baselines, speed_runs)
    store.ensure_writable(out_dir)  # after the input is read: a bad run leaves no folder behind
    figs: list[Figure] = []
    fits = pd.DataFrame()
    if df is not None:
        fits = exponents(df)
        figs = figures(df, fits, baselines[0], out_dir / "plots")
    other = _other_sections(run_dirs, out_dir, target_loss)  # each writes its own plots/ and <kind>_report.md
    sections = _sections(run_dirs, df, figs, fits, baselines or [], other)
    train_runs = [r for r in run_dirs if (r / store.TRAIN_CSV).exists()]
    if df is not None and train_runs:
        tradeoff_section = _tradeoff_section(df, train_runs, out_dir / "plots" / "tradeoff.png")
        sections += tradeoff_section
        figs += [content for kind, content in tradeoff_section if kind == "figure"]
    (out_dir / "report.md").write_text(_markdown(sections, out_dir))
    (out_dir / "report.html").write_text(_html(sections))
    others = [content.path for section in other.values() for kind, content in section if kind == "figure"]
    written = [f.path for f in figs] + others + [out_dir / "report.md", out_dir / "report.html"]
    if df is not None:
        console.out.print(console.frame_table(fastest(df), "fastest impl at the largest T",
                                              keep=("mechanism", "mode", "T", "fastest", "ms", "TFLOP/s", "next")))
        if not fits.empty:
            shown = exponent_table(fits)[["mechanism", "impl", "mode", "causal", "exponent", "r2", "points", "seq_range"]]
            console.out.print(console.frame_table(shown, "complexity exponent (time per sequence ~ T^k)",
                                                  keep=("mechanism", "impl", "mode", "exponent", "r2", "points", "seq_range")))
    console.out.print(f"{len(written)} files -> {out_dir}/ (report.html, report.md, plots/)")
    return written
