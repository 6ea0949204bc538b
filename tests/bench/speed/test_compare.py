"""compare: per-case ratios, the threshold, lost cases, and the exit code."""

import pytest
from typer.testing import CliRunner

from attnbench import store
from attnbench.cli import app


def write(run, ms_by_seq, status_by_seq=None):
    run.mkdir(parents=True)
    with store.RowLog(run / store.SPEED_CSV) as log:
        for seq, ms in ms_by_seq.items():
            status = (status_by_seq or {}).get(seq, "ok")
            log.append(dict(mechanism="standard", impl="sdpa", level="kernel", mode="fwd", dtype="bf16",
                            device="cuda", batch=1, seq=seq, heads=16, kv_heads=16, head_dim=64, causal=True,
                            window=None, status=status, message="", ms_median=ms if status == "ok" else None))
    return run


def compare(base, head, *threshold):
    return CliRunner().invoke(app, ["compare", str(base), str(head), *threshold])


@pytest.mark.parametrize("head_ms, threshold, code", [
    (1.04, "5", 0),   # 4% slower: within 5%
    (1.06, "5", 1),   # 6% slower: a regression
    (1.06, "10", 0),
    (0.50, "5", 0),   # faster is never a regression
])
def test_exit_code_follows_the_threshold(tmp_path, head_ms, threshold, code):
    base = write(tmp_path / "base", {512: 1.0, 1024: 4.0})
    head = write(tmp_path / "head", {512: head_ms, 1024: 4.0})
    result = compare(base, head, "--threshold", threshold)
    assert result.exit_code == code, result.output


def test_a_case_lost_to_oom_is_a_regression(tmp_path):
    base = write(tmp_path / "base", {512: 1.0, 1024: 4.0})
    head = write(tmp_path / "head", {512: 1.0, 1024: 0.0}, {1024: "oom"})
    result = compare(base, head)
    assert result.exit_code == 1 and "lost (oom)" in result.output


def test_cases_in_one_run_only_are_reported_not_compared(tmp_path):
    base = write(tmp_path / "base", {512: 1.0, 2048: 9.0})
    head = write(tmp_path / "head", {512: 1.0, 4096: 30.0})
    result = compare(base, head)
    assert result.exit_code == 0 and "1 case(s) only in BASE, 1 only in HEAD" in result.output


def test_the_ratio_is_head_over_base(tmp_path):
    base = write(tmp_path / "base", {512: 2.0})
    head = write(tmp_path / "head", {512: 3.0})
    result = compare(base, head, "--threshold", "60")
    assert result.exit_code == 0 and "1.5" in result.output


def test_a_csv_path_works_as_well_as_a_folder(tmp_path):
    base = write(tmp_path / "base", {512: 1.0})
    assert compare(base / "speed.csv", base).exit_code == 0


def test_a_run_with_a_case_recorded_twice_compares_its_last_rows(tmp_path):
    run = write(tmp_path / "run", {512: 1.0, 1024: 4.0, 2048: 16.0})
    with store.RowLog(run / store.SPEED_CSV, resume=True) as log:  # a resume racing the first writer
        for row in store.read_rows(run / store.SPEED_CSV)[:2]:
            log.append({**row, "ms_median": 3 * float(row["ms_median"])})
    result = compare(run, run)
    assert result.exit_code == 0, result.output
    assert "2 duplicate row(s)" in result.output and "3 same" in result.output


def test_a_speed_csv_without_rows_is_one_line_and_exit_2(tmp_path):
    base = write(tmp_path / "base", {512: 1.0})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / store.SPEED_CSV).write_bytes(b"")
    result = compare(base, empty)
    assert result.exit_code == 2 and result.output.strip() == f"error: no rows in {empty / store.SPEED_CSV}"
