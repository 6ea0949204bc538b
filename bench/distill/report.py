"""The report of `attnbench distill` runs: held-out KL and top-1 agreement curves per student
mechanism, the cost/quality table (a diverged student: status error and why, below it), and the generations.

    render_distill_report([run_dir, ...], out_dir) -> [distill_report.md, plots/distill_kl.png, plots/distill_agreement.png]

Each run's rows are labelled "<run>/<student>" when several runs are given, "<student>" otherwise.
"""

from __future__ import annotations

from pathlib import Path

from attnbench import store
from attnbench.distill.evaluate import GENERATIONS
from attnbench.distill.run import DISTILL_COLUMNS, DISTILL_CSV, SUMMARY_COLUMNS, SUMMARY_CSV
from attnbench.errors import InputError

CURVES = {"kl": ("held-out KL(teacher || student), nats/token", True), "agreement": ("top-1 agreement with the teacher", False)}
TABLE = [
    ("model", "model"), ("mechanism", "mechanism"), ("impl", "impl"), ("steps", "steps"),
    ("kl_zero_shot", "KL zero-shot"), ("kl", "KL"), ("agreement", "agreement"), ("ppl", "ppl"),
    ("attn_flops", "attn GFLOP"), ("forward_ms", "forward ms"), ("peak_mem_mib", "peak MiB"), ("trainable_params", "trained params"),
    ("status", "status"),
]


def render_distill_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Write the plots and distill_report.md for ``run_dirs`` into ``out_dir``; returns the files written."""
    if not run_dirs:
        raise InputError("no distill runs given")
    label = (lambda run, student: f"{run.name}/{student}") if len(run_dirs) > 1 else (lambda run, student: student)
    curves: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for run in run_dirs:
        for row in store.read_rows(run / DISTILL_CSV, DISTILL_COLUMNS):
            if row["split"] == "valid":
                curves.setdefault(label(run, row["student"]), []).append((int(row["step"]), row))
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    written = [_plot(curves, metric, out_dir / "plots" / f"distill_{metric}.png") for metric in CURVES]
    report = out_dir / "distill_report.md"
    report.write_text(_markdown(run_dirs, written, out_dir))
    return [report, *written]


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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(column: str, value: str) -> str:
    if value == "":
        return ""
    if column == "attn_flops":
        return f"{float(value) / 1e9:.3g}"
    if column in ("kl", "kl_zero_shot", "agreement", "ppl", "forward_ms", "peak_mem_mib"):
        return f"{float(value):.4g}"
    return value


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
            "convention); forward ms and peak MiB: the whole model's forward on that batch (peak: CUDA only).", "",
            "| " + " | ".join(title for _, title in TABLE) + " |",
            "|" + "---|" * len(TABLE),
        ]
        if not (run / SUMMARY_CSV).exists():  # a run stopped before its end: its curves still count
            lines[-2:] = ["Unfinished run (no summary.csv): the curves above are every evaluation it recorded."]
        else:
            summary = store.read_rows(run / SUMMARY_CSV, SUMMARY_COLUMNS)
            lines += ["| " + " | ".join(_cell(column, row[column]) for column, _ in TABLE) + " |" for row in summary]
            lines += [f"\nDiverged: {row['message']}." for row in summary if row["status"] == "error"]
        generations = run / f"{GENERATIONS}.md"
        if generations.exists():
            body = generations.read_text().split("\n", 1)[1]  # without its own title
            lines += ["", "### Generations", body.replace("\n## ", "\n#### ")]
        lines.append("")
    return "\n".join(lines)
