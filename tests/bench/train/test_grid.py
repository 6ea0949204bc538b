"""`train --positions`: attention forms crossed with position schemes, one model per cell, an
unsupported row (with its reason) per cell that has no meaning, and the grid's figures."""

import csv

from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.models import positions, registry
from attnbench.train import grid
from attnbench.train.report import _load
from attnbench.train.spec import Cell

GRID = ["--attn", "standard,linear", "--positions", "rope,alibi", "--task", "clm", "--preset", "tiny",
        "--seq", "32", "--batch", "2", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_grid_trains_every_valid_cell_and_records_why_the_others_cannot(tmp_path):
    out = tmp_path / "grid"
    result = CliRunner().invoke(app, ["train", *GRID, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "train.csv")
    trained = {(r["attn"], r["positions"]) for r in rows if r["status"] == "ok"}
    assert trained == {("standard", "rope"), ("standard", "alibi"), ("linear", "rope")}
    refused = [r for r in rows if r["status"] == "unsupported"]
    assert [(r["attn"], r["positions"]) for r in refused] == [("linear", "alibi")]
    assert refused[0]["message"] == positions.why_not(registry.get("linear"), "alibi") != ""
    assert {d.name for d in (out / "checkpoints").iterdir()} == {"standard+rope", "standard+alibi", "linear+rope"}
    entropy = _rows(out / "entropy.csv")
    assert {(r["attn"], r["positions"]) for r in entropy} == trained and all(r["status"] == "ok" for r in entropy)
    assert (out / "plots" / "grid.png").stat().st_size > 0 and (out / "plots" / "entropy.png").stat().st_size > 0
    assert "linear+alibi: unsupported" in (out / "train_report.md").read_text()

    again = CliRunner().invoke(app, ["train", *GRID, "--out", str(out), "--resume"])  # nothing left: no row twice
    assert again.exit_code == 0, again.output
    assert _rows(out / "train.csv") == rows


def test_the_heatmap_tables_put_forms_on_rows_and_schemes_on_columns(tmp_path):
    out = tmp_path / "grid"
    assert CliRunner().invoke(app, ["train", *GRID, "--out", str(out)]).exit_code == 0
    train = _load([out]).train
    tables = grid.grid_tables(train)
    loss = tables["final eval loss"]
    assert list(loss.index) == ["standard", "linear"] and list(loss.columns) == ["rope", "alibi"]
    assert loss.isna().sum().sum() == 1 and loss.isna().loc["linear", "alibi"]
    final = [r for r in _rows(out / "train.csv") if r["split"] == "valid" and r["attn"] == "standard" and r["positions"] == "rope"]
    assert loss.loc["standard", "rope"] == float(final[-1]["loss"])


def test_a_grid_of_unsupported_cells_only_is_refused_with_the_reasons(tmp_path):
    result = CliRunner().invoke(app, ["train", "--attn", "linear", "--positions", "alibi", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "nothing to train: linear+alibi: " in result.output
    assert not (tmp_path / "r").exists()


def test_an_unknown_scheme_is_one_line():
    result = CliRunner().invoke(app, ["train", "--attn", "standard", "--positions", "spiral", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown position scheme 'spiral'" in result.output


def test_cells_name_themselves_by_mechanism_and_scheme():
    assert Cell("linear", "rope").name == "linear+rope" and Cell("rope").name == "rope"
    assert Cell("rope").scheme == "rope" and Cell("standard").scheme == "learned"
    assert Cell("rope", "sinusoidal").why_not() is not None and Cell("standard", "none").why_not() is None


def test_the_report_has_inference_throughput_parameter_efficiency_and_a_target_loss(tmp_path):
    out = tmp_path / "grid"
    assert CliRunner().invoke(app, ["train", *GRID, "--out", str(out)]).exit_code == 0
    inference = _rows(out / "inference.csv")
    assert {(r["attn"], r["positions"], r["seq"]) for r in inference} == {
        (a, p, s) for a, p in {("standard", "rope"), ("standard", "alibi"), ("linear", "rope")} for s in ("32", "128")}
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in inference)
    from attnbench.train.report import eval_summary

    notes, table, _ = eval_summary(_load([out]), target_loss=9.0)
    assert "the --target-loss given" in notes[0] and "9" in notes[0]
    assert list(table.columns[-2:]) == ["infer tok/s @L", "infer tok/s @4L"] and (table["steps to target"] != "-").all()
    assert (out / "plots" / "efficiency.png").stat().st_size > 0
