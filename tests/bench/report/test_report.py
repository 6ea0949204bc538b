"""Reports from synthetic runs (known exponents), so nothing here depends on this machine's speed."""

import base64
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from attnbench import store
from attnbench.report import speed as report
from attnbench.report import tradeoff
from attnbench.cli import app


def write_run(run, cost, seqs=(256, 512, 1024, 2048), impls=("torch", "sdpa"), tokens=4096, device="cuda"):
    """A speed run whose median ms is cost(impl, seq) * batch, batch = tokens // seq."""
    run.mkdir(parents=True)
    store.write_meta(run, {"schema_version": 1, "command": "attnbench speed", "started": "2025-01-01T00:00:00",
                           "finished": "2025-01-01T00:01:00", "env": {"torch": "x", "gpus": []}})
    with store.RowLog(run / store.SPEED_CSV) as log:
        for mode in ("fwd", "bwd"):
            for impl in impls:
                for seq in seqs:
                    batch = tokens // seq
                    ms = cost(impl, seq) * batch
                    log.append(dict(mechanism="standard", impl=impl, level="kernel", mode=mode, dtype="bf16",
                                    device=device, batch=batch, seq=seq, heads=16, kv_heads=16, head_dim=64,
                                    causal=True, window=None, status="ok", message="", ms_median=ms,
                                    ms_p20=0.9 * ms, ms_p80=1.1 * ms, tokens_per_s=batch * seq / ms * 1e3,
                                    flops=1e9 * seq, tflops=1e9 * seq / ms * 1e-9, peak_mem_mib=seq / 8.0, params=1))
        log.append(dict(mechanism="standard", impl="torch", level="kernel", mode="fwd", dtype="bf16", device=device,
                        batch=1, seq=8192, heads=16, kv_heads=16, head_dim=64, causal=True, window=None,
                        status="oom", message="OutOfMemoryError: CUDA out of memory."))


def quadratic_and_linear(impl, seq):
    return 1e-6 * seq**2 if impl == "torch" else 3e-4 * seq


def test_exponents_recover_the_cost_per_sequence(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear)
    fits = report.exponents(report.load_speed([tmp_path / "run"]))
    by_impl = fits.groupby("impl")["exponent"].agg(["min", "max"])
    assert by_impl.loc["torch"].to_list() == pytest.approx([2.0, 2.0])
    assert by_impl.loc["sdpa"].to_list() == pytest.approx([1.0, 1.0])
    assert fits["r2"].to_numpy() == pytest.approx(np.ones(len(fits)))
    assert set(fits["seq_range"]) == {"512-2048"}  # fitted over the largest points only


def test_exponent_r2_drops_for_a_noisy_series(tmp_path):
    write_run(tmp_path / "run", lambda impl, seq: {256: 1.0, 512: 0.2, 1024: 5.0, 2048: 0.3}[seq])
    fits = report.exponents(report.load_speed([tmp_path / "run"]))
    assert (fits["r2"] < 0.5).all()


def test_speedups_divide_the_baseline(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear)
    ratio = report.speedups(report.load_speed([tmp_path / "run"]), "torch")
    expected = (1e-6 * ratio["seq"] ** 2) / (3e-4 * ratio["seq"])
    assert set(ratio["impl"]) == {"sdpa"}
    # the CSV keeps 6 significant digits: each ms within 5e-6 relative, so the ratio within 1e-5
    assert ratio["speedup"].to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-5)


def test_speedup_table_has_one_column_per_impl_and_memory_ratios(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear)
    df = report.load_speed([tmp_path / "run"])
    table = report.speedup_table(df, "torch")
    assert list(table.columns[-1:]) == ["sdpa"] and len(table) == 2 * 4  # modes x seqs
    fwd = table[table["mode"] == "fwd"].set_index("seq")["sdpa"]
    assert fwd[2048] == pytest.approx(round(1e-6 * 2048**2 / (3e-4 * 2048), 2))
    memory = report.speedup_table(df, "torch", "memory")
    assert (memory["sdpa"] == 1.0).all()  # both impls wrote seq / 8 MiB


def test_variant_costs_divide_by_standard_in_the_same_impl(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear)
    df = report.load_speed([tmp_path / "run"])
    rope = df.assign(mechanism="rope", ms_median=df["ms_median"] * 1.25)
    costs = report.variant_costs(pd.concat([df, rope]))
    assert set(costs["mechanism"]) == {"rope"} and (costs[["sdpa", "torch"]] == 1.25).all().all()


def test_crossover_takes_each_mechanisms_fastest_impl_per_sequence(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    write_run(tmp_path / "run", quadratic_and_linear)
    df = report.load_speed([tmp_path / "run"])
    df = pd.concat([df, df.assign(mechanism="linear", ms_median=df["ms_median"] * 2)])
    rows = df[(df["status"] == "ok") & (df["mode"] == "fwd")]
    best = report.best_per_sequence(rows).set_index(["mechanism", "seq"])
    # torch (quadratic) wins below T = 300, sdpa (linear) above; ms per sequence, not per batch
    assert best.loc[("standard", 256), "impl"] == "torch" and best.loc[("standard", 2048), "impl"] == "sdpa"
    assert best.loc[("linear", 2048), "ms_per_seq"] == pytest.approx(2 * 3e-4 * 2048, rel=1e-5)
    path = report._crossover_figure(rows, path=tmp_path / "crossover.png", palette={}, title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_report_writes_pngs_markdown_and_self_contained_html(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "results" / "20250101-000000-speed", quadratic_and_linear)
    result = CliRunner().invoke(app, ["report", "--baseline", "torch"])  # default: the latest run
    assert result.exit_code == 0, result.output
    run = tmp_path / "results" / "20250101-000000-speed"
    pngs = sorted("-".join(p.name.split("-")[:2]) for p in (run / "plots").glob("*.png"))
    per_mode = [f"{metric}-{mode}" for metric in ("latency", "memory", "speedup", "tflops") for mode in ("bwd", "fwd")]
    assert pngs == sorted(["exponent-kernel", *per_mode])
    for png in (run / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run / "report.md").read_text()
    assert "FlashAttention-3 convention" in markdown and "plots/latency-" in markdown and "OutOfMemoryError" in markdown
    assert "## Speedup over torch" in markdown and "## Peak memory relative to torch" in markdown
    html = (run / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == len(pngs) and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:4] == b"\x89PNG"
    assert "sdpa" in result.output  # the terminal summary names the fastest impl


def test_a_baseline_not_in_the_run_is_an_input_error(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--baseline", "cutlass"])
    assert result.exit_code == 2 and "impls: sdpa, torch" in result.output


def test_train_runs_go_to_train_report_when_present(tmp_path, monkeypatch):
    from attnbench.train import report as train_report

    run = tmp_path / "train-run"
    run.mkdir()
    store.write_meta(run, {"command": "attnbench train", "started": "2025-01-01T00:00:00"})
    (run / "train.csv").write_text("step,loss\n1,2.0\n")
    drawn = []

    def render_train_report(run_dirs, out_dir, target_loss=None):  # as the real one: out_dir/plots/*.png
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        png = out_dir / "plots" / "loss.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n")
        drawn.append(run_dirs)
        return [png]

    monkeypatch.setattr(train_report, "render_train_report", render_train_report)
    monkeypatch.setattr(train_report, "report_sections", lambda run_dirs, target_loss=None: [])
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert drawn == [[run]]
    assert "plots/loss.png" in (run / "report.md").read_text()


def test_distill_runs_go_to_distill_report(tmp_path, monkeypatch):
    from attnbench.distill import report as distill_report

    run = tmp_path / "distill-run"
    run.mkdir()
    store.write_meta(run, {"command": "attnbench distill", "started": "2025-01-01T00:00:00"})
    (run / "distill.csv").write_text("student,step,kl\nlinear,0,1.0\n")

    def render_distill_report(run_dirs, out_dir):
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        png = out_dir / "plots" / "distill_kl.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n")
        return [png, out_dir / "distill_report.md"]  # only the PNG becomes a figure

    monkeypatch.setattr(distill_report, "render_distill_report", render_distill_report)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    report = (run / "report.md").read_text()
    assert "## Distillation" in report and "plots/distill_kl.png" in report and "distill_report.md)" not in report


def test_load_speed_tolerates_a_run_killed_mid_line(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear)
    csv = tmp_path / "run" / "speed.csv"
    csv.write_bytes(csv.read_bytes()[:-5])
    df = report.load_speed([tmp_path / "run"])
    assert len(df) == 16 and isinstance(df, pd.DataFrame)


def write_train_run(run, final_losses: dict[str, float], steps: int):
    """A training run whose mechanisms end at the given eval losses after ``steps`` steps."""
    from attnbench.train.run import TRAIN_COLUMNS

    run.mkdir(parents=True)
    store.write_meta(run, {"command": "attnbench train", "started": "2025-01-01T00:00:00"})
    with store.RowLog(run / store.TRAIN_CSV, TRAIN_COLUMNS) as log:
        for attn, loss in final_losses.items():
            for step in (steps // 2, steps):
                log.append(dict(attn=attn, step=step, split="valid", loss=loss + (step < steps), status="ok"))


def test_quality_against_speed_pairs_each_trained_mechanism_with_its_fastest_impl(tmp_path):
    write_run(tmp_path / "speed", quadratic_and_linear)  # standard: torch quadratic, sdpa linear per sequence
    write_train_run(tmp_path / "short", {"standard": 9.0}, steps=10)
    write_train_run(tmp_path / "long", {"standard": 3.5, "linear": 4.0}, steps=100)  # linear never timed
    result = CliRunner().invoke(app, ["report", *(str(tmp_path / r) for r in ("speed", "short", "long")), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = report.load_speed([tmp_path / "speed"])
    table = tradeoff.tradeoff_table(tradeoff.tradeoff_rows(rows, [tmp_path / "short", tmp_path / "long"]))
    assert table["mechanism"].tolist() == ["standard"] and table["eval_loss"].tolist() == [3.5]  # the longer run
    assert set(tradeoff.tradeoff_rows(rows, [tmp_path / "long"])["mode"]) == {"fwd"}  # fwd and bwd tie: fwd
    for seq in (256, 2048):  # causal fwd: the cheaper of 1e-6 T^2 (torch) and 3e-4 T (sdpa) per sequence
        ms, impl = min((1e-6 * seq**2, "torch"), (3e-4 * seq, "sdpa"))
        assert table[f"ms/seq at {seq}"].iloc[0] == f"{ms:.3g} ({impl})"
    assert "## Quality against speed" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "plots" / "tradeoff.png").stat().st_size > 0


# ---- issue 20: what the report claims, empty and odd inputs, duplicate cases


def test_an_exponent_on_two_points_is_refused_in_the_table_and_the_figure(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear, seqs=(1024, 2048))  # two lengths: any line fits them
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    fits = report.exponents(report.load_speed([tmp_path / "run"]))
    assert (fits["points"] == 2).all() and fits["exponent"].isna().all() and fits["r2"].isna().all()
    markdown = (tmp_path / "run" / "report.md").read_text()
    exponent_rows = [line for line in markdown.splitlines() if line.endswith("| 2 | 1024-2048 |")]
    assert len(exponent_rows) == len(fits) == 4 and all("| n/a (2 points) | n/a |" in line for line in exponent_rows)
    assert "n/a: fewer than 3 lengths to fit" in markdown
    assert not list((tmp_path / "run" / "plots").glob("exponent-*.png"))  # no bar for a refused fit
    assert "n/a (2 points)" in result.output  # the terminal table too


def test_the_exponent_figure_names_the_fits_it_leaves_out(tmp_path, monkeypatch):
    write_run(tmp_path / "run", quadratic_and_linear)
    df = report.load_speed([tmp_path / "run"]).query("mode == 'fwd'")
    df = df[~((df["impl"] == "sdpa") & (df["seq"] < 1024))]  # sdpa keeps two lengths, torch four
    fits = report.exponents(df)
    assert fits.loc[fits["impl"] == "sdpa", "exponent"].isna().all() and fits.loc[fits["impl"] == "torch", "exponent"].notna().all()
    drawn = []

    def exponent_figure(fitted, *, path, palette, title):
        drawn.append(fitted)
        return path

    monkeypatch.setattr(report, "_exponent_figure", exponent_figure)
    captions = [f.caption for f in report.figures(df, fits, "torch", tmp_path / "plots") if f.path.name.startswith("exponent-")]
    assert len(drawn) == 1 and set(drawn[0]["impl"]) == {"torch"}
    assert len(captions) == 1 and "n/a for 1 series fitted on fewer than 3 T" in captions[0]


def test_the_band_is_promised_and_drawn_only_where_a_case_was_timed_more_than_once(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_run(tmp_path / "run", quadratic_and_linear)
    repeated = report.load_speed([tmp_path / "run"]).query("status == 'ok' and mode == 'fwd'")
    once = repeated.assign(ms_p20=repeated["ms_median"], ms_p80=repeated["ms_median"])  # one block: p20 == median == p80
    assert "band p20-p80" in report._latency_caption("fwd", repeated)
    assert "p20" not in report._latency_caption("fwd", once)
    assert "where" in report._latency_caption("fwd", pd.concat([once[once["impl"] == "torch"], repeated[repeated["impl"] == "sdpa"]]))
    for rows, bands in ((repeated, 2), (once, 0)):  # one band per impl, or none
        plt.figure()
        report._draw(rows, "ms_median", band=("ms_p20", "ms_p80"), palette={"torch": "C0", "sdpa": "C1"}, markers={"run": "o"})
        assert len(plt.gca().collections) == bands
        plt.close()


@pytest.mark.parametrize("content", [b"", (",".join(store.SPEED_COLUMNS) + "\n").encode()], ids=["0-byte", "header-only"])
def test_a_speed_csv_without_rows_is_one_line_and_exit_2(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    store.write_meta(run, {"command": "attnbench speed", "started": "2025-01-01T00:00:00"})
    (run / store.SPEED_CSV).write_bytes(content)
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: no rows in {run / store.SPEED_CSV}"
    assert not (tmp_path / "out").exists()  # nothing created for a bad input


def test_a_slash_in_a_setup_value_stays_in_the_plots_folder(tmp_path):
    write_run(tmp_path / "run", quadratic_and_linear, device="cpu/x")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.exception
    pngs = list((tmp_path / "run" / "plots").iterdir())
    assert pngs and all(p.is_file() and "cpux" in p.name for p in pngs)
    assert report.slug("cuda:0") == "cuda0" and report.slug("../x") == "..x"  # ':' as before; never a folder


def test_a_case_recorded_twice_keeps_its_last_row_with_a_warning(tmp_path, capsys):
    write_run(tmp_path / "run", quadratic_and_linear)
    first = report.load_speed([tmp_path / "run"])
    capsys.readouterr()
    again = store.read_rows(tmp_path / "run" / store.SPEED_CSV)[:3]  # a resume racing the first writer: 3 cases twice
    with store.RowLog(tmp_path / "run" / store.SPEED_CSV, resume=True) as log:
        for row in again:
            log.append({**row, "ms_median": 2 * float(row["ms_median"])})
    df = report.load_speed([tmp_path / "run"])
    assert "3 duplicate row(s)" in capsys.readouterr().err
    assert len(df) == len(first)
    doubled = df.merge(first, on=[*store.CASE_COLUMNS, "run"], suffixes=("", "_first"))
    assert len(doubled) == len(first)
    assert (doubled["ms_median"] == 2 * doubled["ms_median_first"]).sum() == 3  # the later rows won


def write_train_run_with_one_eval(run, steps=50):
    """A training run that logged every step and evaluated once, at its last step."""
    from attnbench.train.run import TRAIN_COLUMNS

    run.mkdir(parents=True)
    store.write_meta(run, {"command": "attnbench train", "started": "2025-01-01T00:00:00"})
    with store.RowLog(run / store.TRAIN_CSV, TRAIN_COLUMNS) as log:
        for step in range(1, steps + 1):
            log.append(dict(attn="rope", step=step, split="train", loss=6.0 - step / steps, lr=1e-3, tokens_per_s=1000.0, status="ok"))
        log.append(dict(attn="rope", step=steps, split="valid", loss=5.25, ppl=190.6, accuracy=0.12, status="ok"))


def test_the_training_report_html_carries_the_eval_loss_table(tmp_path):
    write_train_run(tmp_path / "run", {"standard": 3.5, "rope": 3.25}, steps=100)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    training = html[html.index("<h2>Training</h2>"):]
    header = re.findall(r"<th>([^<]*)</th>", training)
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", training, re.S)[1:]]
    assert header[:3] == ["mechanism", "steps", "eval loss"]
    assert [row[:3] for row in cells] == [["standard", "100", "3.5"], ["rope", "100", "3.25"]]
    assert "Steps to eval loss 3.5" in training
    train_md = (tmp_path / "run" / "train_report.md").read_text()
    assert "| standard | 100 | 3.5 |" in train_md and "| standard | 100 | 3.5 |" in (tmp_path / "run" / "report.md").read_text()


def test_an_eval_panel_with_one_point_draws_a_marker_on_the_runs_step_axis(tmp_path):
    from attnbench.train import report as train_report

    write_train_run_with_one_eval(tmp_path / "run", steps=50)
    train = train_report._load([tmp_path / "run"]).train
    fig = train_report._draw_curves(train)
    eval_loss = next(ax for ax in fig.axes if ax.get_title() == "eval loss")
    (line,) = eval_loss.get_lines()
    assert line.get_marker() not in (None, "", "None", " ") and line.get_markersize() >= 5
    low, high = eval_loss.get_xlim()
    assert low <= 1 and high >= 50  # the run's steps, not 48 to 52 around the one evaluation
    bottom, top = eval_loss.get_ylim()
    assert bottom < 5.25 < top and top / bottom < 2  # a tight axis around the value, not decades


def test_a_ratio_inside_the_timings_spread_is_listed_and_one_outside_is_not(tmp_path):
    # p20-p80 is 0.9-1.1 x the median: sdpa 5% faster overlaps torch's range, 50% faster does not
    write_run(tmp_path / "run", lambda impl, seq: 1.0 if impl == "torch" else (0.95 if seq <= 512 else 0.5))
    df = report.load_speed([tmp_path / "run"])
    ratios = report.speedups(df, "torch")
    assert ratios.set_index(["mode", "seq"])["within_spread"].groupby("seq").all().to_dict() == {256: True, 512: True, 1024: False, 2048: False}
    listed = report.spread_overlaps(df, "torch")
    assert sorted(set(listed["seq"])) == [256, 512] and len(listed) == 2 * 2  # modes x the two close lengths
    row = listed.iloc[0]
    batch = 4096 // row["seq"]
    assert row["speedup"] == pytest.approx(round(1 / 0.95, 2))
    assert row["torch_p20_p80"] == f"{0.9 * batch:.4g}-{1.1 * batch:.4g}"


def test_the_report_says_which_ratios_the_spread_cannot_order(tmp_path):
    write_run(tmp_path / "run", lambda impl, seq: 1.0 if impl == "torch" else (0.95 if seq <= 512 else 0.5))
    assert CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--baseline", "torch"]).exit_code == 0
    text = (tmp_path / "run" / "report.md").read_text()
    assert "4 of these 8 ratios lie within the timing's spread" in text
