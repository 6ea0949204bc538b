"""The seeds' BERT figure for masked-LM runs: training MLM loss, evaluation MLM loss, training
LM loss (from the clm run of the same models, else masked-token accuracy) and the learning rate;
length extrapolation for MLM runs too."""

import csv

import pytest
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.train import report

SMALL = ["--attn", "standard,alibi", "--preset", "tiny", "--seq", "32", "--batch", "2", "--steps", "4",
         "--eval-every", "2", "--eval-batches", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    for task in ("mlm", "clm"):
        result = CliRunner().invoke(app, ["train", *SMALL, "--task", task, "--out", str(root / task)])
        assert result.exit_code == 0, result.output
    return root


def _titles(run_dirs):
    train = report._load(run_dirs).train
    return [ax.get_title() for ax in report._draw_curves(train).axes if ax.get_title()]


def test_mlm_panels_take_the_lm_loss_of_the_clm_runs_of_the_same_models(runs):
    assert _titles([runs / "mlm", runs / "clm"]) == [
        "training MLM loss", "evaluation MLM loss", "training LM loss (the clm runs of the same models)", "learning rate"]


def test_without_a_clm_run_the_third_panel_is_masked_token_accuracy(runs):
    assert _titles([runs / "mlm"])[2] == "evaluation masked-token accuracy (no clm run of these models)"
    assert _titles([runs / "clm"]) == ["train loss", "eval loss", "eval perplexity", "learning rate"]


def test_mlm_runs_measure_length_extrapolation_on_blocks(runs):
    with open(runs / "mlm" / "extrapolation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    blocks = {(r["attn"], r["factor"]): r for r in rows if r["method"] == "blocks"}
    assert blocks[("alibi", "4")]["status"] == "ok" and float(blocks[("alibi", "4")]["loss"]) > 0
    assert blocks[("standard", "4")]["status"] == "unsupported"  # learned positions end at the trained length
    assert all(r["status"] == "unsupported" for r in rows if r["method"] == "sliding")
