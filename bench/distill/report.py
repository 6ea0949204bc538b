"""The report of `attnbench distill` runs: held-out KL and top-1 agreement curves per student,
the quality/cost Pareto figure (held-out KL and perplexity against one attention layer's
measured time at the reference length, and against a learned mask's density), the density of
each learned mask per layer and head, and the tables: cost and quality (a diverged student:
status error and why; an unsupported cell: why), edge cases and generation metrics, layer time
and memory against length (scale.csv), then the generations.

    render_distill_report([run_dir, ...], out_dir) -> [distill_report.md, plots/distill_*.png]

Each run's students are labelled "<run>/<student>" when several runs are given, "<student>" otherwise.
"""

from __future__ import annotations

from pathlib import Path

from attnbench import store
from attnbench.distill.columns import (
    ADDED_SCALE_COLUMNS, ADDED_SUMMARY_COLUMNS, DENSITY_COLUMNS, DENSITY_CSV, DISTILL_COLUMNS, DISTILL_CSV, EDGE_METRICS, GENERATION_METRICS,
    SCALE_COLUMNS, SCALE_CSV, SUMMARY_COLUMNS, SUMMARY_CSV,
)
from attnbench.distill.generate import GENERATIONS
from attnbench.errors import InputError

REFERENCE_SEQ = 4096  # the Pareto figure's x axis: one layer's forward at this length (else the longest timed)
CURVES = {"kl": ("held-out KL(teacher || student), nats/token", True), "agreement": ("top-1 agreement with the teacher", False)}
TABLE = [
    ("model", "model"), ("student", "student"), ("mechanism", "mechanism"), ("positions", "positions"), ("mask_l1", "mask L1"),
    ("impl", "impl"), ("steps", "steps"), ("kl_zero_shot", "KL zero-shot"), ("kl", "KL"), ("agreement", "agreement"),
    ("ppl", "ppl"), ("density", "density"), ("attn_flops", "attn GFLOP"), ("forward_ms", "forward ms"),
    ("peak_mem_mib", "peak MiB"), ("trainable_params", "trained params"), ("status", "status"),
]
QUALITY_TABLE = [("student", "student"), *((m, m.replace("_", " ")) for m in EDGE_METRICS + GENERATION_METRICS)]
_FLOATS = {"kl", "kl_zero_shot", "agreement", "ppl", "density", "forward_ms", "peak_mem_mib", *EDGE_METRICS, *GENERATION_METRICS}


def render_distill_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Write the plots and distill_report.md for ``run_dirs`` into ``out_dir``; returns the files written."""
    if not run_dirs:
        raise InputError("no distill runs given")
    label = (lambda run, student: f"{run.name}/{student}") if len(run_dirs) > 1 else (lambda run, student: student)
    curves: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for run in run_dirs:
        for row in store.read_rows(run / DISTILL_CSV, DISTILL_COLUMNS):
            if row["split"] == "valid" and row["status"] == "ok":
                curves.setdefault(label(run, row["student"]), []).append((int(row["step"]), row))
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    written = [_plot(curves, metric, out_dir / "plots" / f"distill_{metric}.png") for metric in CURVES]
    students, teachers = _pareto_points(run_dirs, label)
    if students:
        written.append(_plot_pareto(students, teachers, out_dir / "plots" / "distill_pareto.png"))
    masks = {label(run, s): rows for run in run_dirs for s, rows in _densities(run).items()}
    if masks:
        written.append(_plot_densities(masks, out_dir / "plots" / "distill_density.png"))
    report = out_dir / "distill_report.md"
    report.write_text(_markdown(run_dirs, written, out_dir))
    return [report, *written]


def _summary(run: Path) -> list[dict[str, str]]:
    return store.read_rows(run / SUMMARY_CSV, SUMMARY_COLUMNS, added=ADDED_SUMMARY_COLUMNS)


def _scale(run: Path) -> list[dict[str, str]]:
    return store.read_rows(run / SCALE_CSV, SCALE_COLUMNS, added=ADDED_SCALE_COLUMNS) if (run / SCALE_CSV).exists() else []


def _densities(run: Path) -> dict[str, list[dict[str, str]]]:
    """density.csv's rows per student (none for a run without learned masks)."""
    if not (run / DENSITY_CSV).exists():
        return {}
    out: dict[str, list[dict[str, str]]] = {}
    for row in store.read_rows(run / DENSITY_CSV, DENSITY_COLUMNS):
        out.setdefault(row["student"], []).append(row)
    return out


def reference_seq(scale: list[dict[str, str]]) -> int | None:
    """REFERENCE_SEQ when the run timed it, else its longest timed length (None: nothing timed)."""
    seqs = {int(r["seq"]) for r in scale if r["status"] == "ok"}
    return REFERENCE_SEQ if REFERENCE_SEQ in seqs else max(seqs, default=None)


def _pareto_points(run_dirs: list[Path], label) -> tuple[list[dict], list[dict]]:
    """(students, teachers): each finished student's KL, ppl, density and its own impl's layer ms
    at the reference length; each teacher's ppl and layer ms on every impl timed (a teacher
    several runs share is drawn once)."""
    students, teachers, seen = [], [], set()
    for run in run_dirs:
        if not (run / SUMMARY_CSV).exists():
            continue
        scale = _scale(run)
        seq = reference_seq(scale)
        if seq is None:
            continue
        timed = {(r["model"], r["impl"]): float(r["forward_ms"]) for r in scale if r["status"] == "ok" and int(r["seq"]) == seq}
        teacher_path = store.read_meta(run).get("spec", {}).get("teacher")
        for row in _summary(run):
            if row["status"] != "ok":
                continue
            if row["model"] == "teacher":
                if (teacher_path, row["mechanism"], seq) not in seen:
                    seen.add((teacher_path, row["mechanism"], seq))
                    teachers += [{"label": f"teacher ({row['mechanism']}, {impl})", "ms": ms, "seq": seq, "ppl": float(row["ppl"]) if row["ppl"] else None}
                                 for (model, impl), ms in timed.items() if model == "teacher"]
            elif (row["student"], row["impl"]) in timed:
                students.append({
                    "label": label(run, row["student"]), "mechanism": row["mechanism"], "kl": float(row["kl"]),
                    "ppl": float(row["ppl"]) if row["ppl"] else None, "density": float(row["density"]) if row["density"] else None,
                    "ms": timed[(row["student"], row["impl"])], "seq": seq,
                })
    return students, teachers


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other is at least as good as in both coordinates (lower is better), by x."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _plot_pareto(students: list[dict], teachers: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import LogFormatter

    at = "/".join(map(str, sorted({p["seq"] for p in students + teachers})))
    panels = [("ms", "kl", f"one attention layer's forward, ms at T = {at}", "held-out KL(teacher || student), nats/token"),
              ("ms", "ppl", f"one attention layer's forward, ms at T = {at}", "held-out perplexity"),
              ("density", "kl", "fraction of causal key blocks a learned mask keeps", "held-out KL(teacher || student), nats/token")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = dict(zip(sorted({p["mechanism"] for p in students}), sns.color_palette("colorblind", 10) * 3))
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels):
        shown = [p for p in students if p[x] is not None and p[y] is not None and (x != "density" or p["mechanism"] == "learned")]
        for p in shown:
            ax.scatter(p[x], p[y], s=45, color=colours[p["mechanism"]], edgecolor="black", linewidth=0.5, zorder=3)
            ax.annotate(p["label"], (p[x], p[y]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front([(p[x], p[y]) for p in shown])
        if len(front) > 1:
            ax.plot(*zip(*front), color="grey", linestyle="--", linewidth=1, zorder=2, label="Pareto front")
        if x == "ms":  # the teacher's layer on each impl timed: the cost a student must beat
            for i, t in enumerate(teachers):
                ax.axvline(t["ms"], color="black", linestyle=(0, (1, 2 + 2 * i)), linewidth=1, label=t["label"])
                if y == "ppl" and t["ppl"] is not None and i == 0:
                    ax.scatter(t["ms"], t["ppl"], marker="*", s=110, color="black", zorder=4)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        if y == "kl":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Distilled students: quality against cost (lower left is better; dotted: the teacher's layer)")
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}  # once each, below the panels
    fig.tight_layout(rect=(0, 0.07 if legend else 0, 1, 1))
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_densities(masks: dict[str, list[dict[str, str]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(masks), figsize=(3.2 * len(masks) + 1, 3.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], sorted(masks.items())):
        layers, heads = 1 + max(int(r["layer"]) for r in rows), 1 + max(int(r["head"]) for r in rows)
        grid = [[0.0] * heads for _ in range(layers)]
        for r in rows:
            grid[int(r["layer"])][int(r["head"])] = float(r["density"])
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=heads <= 12, fmt=".2f", cbar=ax is axes[0][-1],
                    annot_kws={"fontsize": 7})
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle("Learned masks: fraction of causal key blocks kept on held-out text")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot(curves, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, log_scale = CURVES[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(curves.items()):
        points.sort(key=lambda p: p[0])
        ax.plot([s for s, _ in points], [float(r[metric]) for _, r in points], marker="o", label=name)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("distillation step (0 = zero-shot: attention swapped, no training)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(column: str, value: str) -> str:
    if value == "":
        return ""
    if column == "attn_flops":
        return f"{float(value) / 1e9:.3g}"
    if column in _FLOATS:
        return f"{float(value):.4g}"
    return value


def _table(columns: list[tuple[str, str]], rows: list[dict[str, str]]) -> list[str]:
    return ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(c, row[c]) for c, _ in columns) + " |" for row in rows)]


def _scale_table(scale: list[dict[str, str]]) -> list[str]:
    """Layer forward ms (peak MiB) per model and impl (rows) and length (columns)."""
    seqs = sorted({int(r["seq"]) for r in scale})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in scale:
        text = f"{float(r['forward_ms']):.3g}" + (f" ({float(r['peak_mem_mib']):.0f})" if r["peak_mem_mib"] else "") if r["status"] == "ok" else r["status"]
        if r["density"]:
            text += f", density {float(r['density']):.2f}"
        cells.setdefault((r["model"], r["impl"]), {})[int(r["seq"])] = text
    lines = ["| model | impl | " + " | ".join(f"T = {s}" for s in seqs) + " |", "|" + "---|" * (2 + len(seqs))]
    lines += [f"| {m} | {i} | " + " | ".join(row.get(s, "") for s in seqs) + " |" for (m, i), row in cells.items()]
    return lines


def _markdown(run_dirs: list[Path], plots: list[Path], out_dir: Path) -> str:
    lines = ["# Distillation", ""]
    lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    for run in run_dirs:
        meta = store.read_meta(run)
        spec = meta.get("spec", {})
        lines += [
            f"## {run.name}", "",
            f"Teacher `{spec.get('teacher')}`; {spec.get('steps')} steps, lr {spec.get('lr')}, temperature "
            f"{spec.get('temperature')}, layer MSE {spec.get('layer_mse')}, mask L1 {spec.get('mask_l1')}, "
            f"{'all parameters' if spec.get('train_all') else 'attention only'} trained.", "",
            "Attention FLOPs: the registry's forward model over all layers for one held-out batch (FlashAttention-3 "
            "convention); forward ms and peak MiB: the whole model's forward on that batch (peak: CUDA only); density: "
            "the fraction of causal key blocks a learned mask keeps on the held-out batches.", "",
        ]
        if not (run / SUMMARY_CSV).exists():  # a run stopped before its end: its curves still count
            lines += ["Unfinished run (no summary.csv): the curves above are every evaluation it recorded."]
        else:
            summary = _summary(run)
            lines += _table(TABLE, summary)
            lines += [f"\n{'Diverged' if row['status'] == 'error' else 'Unsupported'} {row['student'] or row['mechanism']}: {row['message']}."
                      for row in summary if row["status"] in ("error", "unsupported")]
            students = [row for row in summary if row["model"] == "student" and row["status"] == "ok"]
            if any(row[m] for row in students for m in EDGE_METRICS):
                lines += ["", "Edge cases (KL and top-1 agreement with the teacher; one token: all padding but the first token; "
                          "repeated: one token repeated T times) and generation metrics (mean over the greedy and sampled "
                          "continuations; fluency ppl: the teacher's perplexity of the continuation):", ""]
                lines += _table(QUALITY_TABLE, [{**row, "student": row["student"] or "teacher"} for row in summary if row["status"] == "ok"])
        scale = _scale(run)
        if scale:
            given = scale[0]["input"] or "x ~ N(0, 1)"  # runs before the input column timed noise
            lines += ["", f"One attention layer (the first block's, trained weights) forward in eval mode on {given} [B, T, C], "
                      "B = 64k tokens // T on CUDA (1k on CPU): median ms (peak MiB beyond the input, CUDA only); a learned "
                      "mask's density is the one it chose there.", ""]
            lines += _scale_table(scale)
        generations = run / f"{GENERATIONS}.md"
        if generations.exists():
            body = generations.read_text().split("\n", 1)[1]  # without its own title
            lines += ["", "### Generations", body.replace("\n## ", "\n#### ")]
        lines.append("")
    return "\n".join(lines)
