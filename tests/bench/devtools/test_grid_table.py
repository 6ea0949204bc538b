"""The README's grid table from synthetic speed runs: each baseline's time over ours, gaps shown, repeats refused."""

import pytest
import typer
from typer.testing import CliRunner

from attnbench import store
from attnbench.devtools.grid_table import grid_rows, main
from attnbench.errors import InputError
from attnbench.report.speed import load_speed


def write_run(run, ms_of, head_dim, impls=("triton", "sdpa-cudnn"), seqs=(512, 2048)):
    """A speed run at ``head_dim``, causal and bidirectional, fwd: impl's median ms_of(impl, seq, causal)."""
    run.mkdir(parents=True)
    with store.RowLog(run / store.SPEED_CSV) as log:
        for impl in impls:
            for causal in (True, False):
                for seq in seqs:
                    log.append(dict(mechanism="standard", impl=impl, level="kernel", mode="fwd", dtype="bf16",
                                    device="cuda", batch=16384 // seq, seq=seq, heads=2048 // head_dim,
                                    kv_heads=2048 // head_dim, head_dim=head_dim, causal=causal, window=None,
                                    status="ok", message="", ms_median=ms_of(impl, seq, causal)))


def cost(impl, seq, causal):
    return seq / 1000 * (0.5 if causal else 1.0) * (1.25 if impl == "sdpa-cudnn" else 1.0)


def test_rows_carry_each_impls_ms_and_the_baselines_time_over_ours(tmp_path):
    write_run(tmp_path / "d64", cost, 64)
    write_run(tmp_path / "d128", cost, 128)
    header, rule, *rows = grid_rows(load_speed([tmp_path / "d64", tmp_path / "d128"]), "triton", ["sdpa-cudnn"])
    assert header == "| D | mode | mask | T | triton | sdpa-cudnn | vs sdpa-cudnn |" and rule == "|---|---|---|---|---|---|---|"
    assert len(rows) == 2 * 2 * 2  # head dims x masks x lengths
    assert rows[0] == "| 128 | fwd | bidir | 512 | 0.512 | 0.64 | 1.25 |"  # largest head dim first, bidir before causal
    assert rows[3] == "| 128 | fwd | causal | 2k | 1.02 | 1.28 | 1.25 |"
    assert all(row.startswith("| 64 |") for row in rows[4:])


def test_a_case_a_baseline_lacks_shows_a_dash(tmp_path):
    write_run(tmp_path / "run", cost, 64, impls=("triton", "sdpa-cudnn", "flex"))
    df = load_speed([tmp_path / "run"])
    df = df[~((df["impl"] == "flex") & (df["seq"] == 2048))]
    rows = grid_rows(df, "triton", ["sdpa-cudnn", "flex"])[2:]
    assert [row.endswith("| 1.25 | 1.00 |") for row in rows] == [True, False, True, False]  # flex as fast as ours at 512
    assert [row.endswith("| - | 1.25 | - |") for row in rows] == [False, True, False, True]  # none at 2k


def test_a_case_in_two_runs_is_refused(tmp_path):
    write_run(tmp_path / "a", cost, 64)
    write_run(tmp_path / "b", cost, 64)
    with pytest.raises(InputError, match="more than one"):
        grid_rows(load_speed([tmp_path / "a", tmp_path / "b"]), "triton", ["sdpa-cudnn"])


def test_the_command_refuses_a_repeated_run_in_one_line_with_exit_2(tmp_path):
    write_run(tmp_path / "a", cost, 64)
    result = CliRunner().invoke(_app(), [str(tmp_path / "a"), str(tmp_path / "a")])
    assert result.exit_code == 2 and "more than one" in result.output and "Traceback" not in result.output


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(main)
    return app
