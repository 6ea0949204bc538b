"""`attnbench speed` and `list` through typer's CliRunner: one writer per run folder, what a
resume refuses, bad input that creates nothing, and messages as the terminal renders them."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from attnbench import store
from attnbench.speed import sweep
from attnbench.cli import app
from attnbench.models import fla
from attnbench.models.registry import mechanisms

runner = CliRunner()
TINY = ["--heads", "2", "--head-dim", "8", "--device", "cpu", "--batch", "2", "--mode", "fwd"]


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_error_line(result) -> str:
    """The single line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert invoke("speed", "--seq", 8, 16, *TINY, "--impl", "torch", "--out", out).exit_code == 0
    return out


@pytest.fixture
def no_sweep(monkeypatch):
    """A sweep that must not start: running a case fails the test at once (instead of timing
    the default sweep, which is what a wrongly accepted command would do)."""

    def refuse(self, on_step=None):
        raise AssertionError("the sweep started")

    monkeypatch.setattr(sweep.Sweep, "run", refuse)


# ---- one writer per run folder


def test_a_second_writer_is_refused_before_it_touches_the_folder(tmp_path, no_sweep):
    out = tmp_path / "run"
    with store.run_lock(out):
        line = one_error_line(invoke("speed", "--seq", 8, *TINY, "--out", out))
        assert f"{out} is being written by pid {os.getpid()}" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no meta.json of the second writer


def test_a_resume_while_the_run_still_writes_is_refused(finished_run, no_sweep):
    before = {name: (finished_run / name).read_bytes() for name in ("speed.csv", "meta.json")}
    with store.run_lock(finished_run):
        line = one_error_line(invoke("speed", "--resume", "--out", finished_run))
    assert f"is being written by pid {os.getpid()}" in line
    assert {name: (finished_run / name).read_bytes() for name in before} == before
    assert not (finished_run / ".lock").exists()


def test_ctrl_c_prints_the_command_that_resumes_without_losing_or_repeating_a_row(tmp_path, monkeypatch):
    from attnbench import timing

    measure, timed = timing.measure, []

    def ctrl_c_at_the_third(*args, **kwargs):
        timed.append(1)
        if len(timed) == 3:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(timing, "measure", ctrl_c_at_the_third)
    out = tmp_path / "run"
    stopped = invoke("speed", "--seq", 8, 16, *TINY, "--impl", "torch", "--mode", "bwd", "--out", out)
    assert stopped.exit_code == 130, stopped.output
    resume = stopped.output.strip().splitlines()[-1].split()
    assert resume == ["attnbench", "speed", "--resume", "--out", str(out)]
    assert len(store.read_rows(out / store.SPEED_CSV)) == 2
    monkeypatch.setattr(timing, "measure", measure)
    assert invoke(*resume[1:]).exit_code == 0
    rows = store.read_rows(out / store.SPEED_CSV)
    assert sorted((r["mode"], r["seq"]) for r in rows) == [("bwd", "16"), ("bwd", "8"), ("fwd", "16"), ("fwd", "8")]


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(gone.stdout)  # what kill -9 leaves: the file, no process holding it
    result = invoke("speed", "--seq", 8, *TINY, "--impl", "torch", "--out", out)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"pid {gone.stdout.strip()}" in notes[0]
    assert len(store.read_rows(out / "speed.csv")) == 1 and not (out / ".lock").exists()


# ---- what --resume refuses


def test_a_bare_resume_of_a_run_that_died_before_meta_json_is_refused(tmp_path, no_sweep):
    out = tmp_path / "run"
    out.mkdir()  # a run killed in its first seconds: the folder and nothing in it
    line = one_error_line(invoke("speed", "--resume", "--out", out))
    assert "no meta.json" in line and "without --resume" in line
    assert list(out.iterdir()) == []


def test_resume_of_a_folder_that_does_not_exist_creates_nothing(tmp_path, no_sweep):
    out = tmp_path / "never-ran"
    line = one_error_line(invoke("speed", "--resume", "--out", out))
    assert "nothing to resume" in line and not out.exists()


@pytest.mark.parametrize("meta, message", [
    ({"kind": "train", "spec": {"attn": ["rope"]}}, "is a train run, not a speed run: continue it with `attnbench train --resume"),
    ({}, "records no speed spec"),
    ([1, 2], "meta.json is corrupt: not a JSON object"),
])
def test_resume_of_a_folder_holding_no_speed_sweep_is_refused(tmp_path, no_sweep, meta, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps(meta))
    assert message in one_error_line(invoke("speed", "--resume", "--out", out))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]


def test_a_binary_speed_csv_is_one_clean_line(finished_run, no_sweep):
    (finished_run / "speed.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x1b[31mIHDR\xff\xfe,\x07\n")
    line = one_error_line(invoke("speed", "--resume", "--out", finished_run))
    assert str(finished_run / "speed.csv") in line and "line 1" in line
    assert all(" " <= c <= "~" for c in line), ascii(line)


# ---- bad input creates nothing


BAD_INPUTS = {
    "no workers": (["--gpus", "0"], "--gpus must be positive"),
    "budget below one sequence": (["--tokens", "100", "--seq", "512"], "--tokens 100 is less than one sequence of --seq 512"),
    "nothing can run": (["--level", "model-graph", "--mode", "fwd", "--preset", "tiny", "--seq", "8"], "nothing in this sweep can run here.*CUDA"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_creates_nothing(case, tmp_path, no_sweep):
    args, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    line = one_error_line(invoke("speed", *args, "--device", "cpu", "--out", out))
    assert re.search(message, line), line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton runs on this machine")
def test_triton_alone_without_cuda_is_refused_with_the_reason(tmp_path, no_sweep):
    out = tmp_path / "run"
    line = one_error_line(invoke("speed", "--impl", "triton", "--seq", 8, "--out", out))
    assert "nothing in this sweep can run here" in line and "CUDA" in line
    assert not out.exists()


# ---- messages as the terminal shows them (rich markup escaped)


def test_list_shows_the_missing_peer_hint_whole(monkeypatch):
    monkeypatch.setattr("attnbench.catalog.machine_reason", lambda impl: fla.NOT_INSTALLED)
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert "pip install 'attnbench[peers]'" in result.output


def test_speed_shows_why_an_impl_did_not_run_whole(tmp_path, monkeypatch):
    why = sweep.why_unsupported
    monkeypatch.setattr(sweep, "why_unsupported", lambda case, m: fla.NOT_INSTALLED if case.impl == "sdpa" else why(case, m))
    result = invoke("speed", "--seq", 8, *TINY, "--impl", "torch", "sdpa", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert f"not run: sdpa: {fla.NOT_INSTALLED}" in result.output


def test_list_at_80_columns_shows_every_parameter_and_default_whole():
    result = invoke("list", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    for mechanism in mechanisms().values():
        assert any(re.search(rf"\b{mechanism.name}\b", line) for line in lines), mechanism.name
        for name, (default, _) in mechanism.params.items():
            pair = rf"(?<![\w.]){re.escape(name)}\b.*(?<![\w.]){re.escape(str(default))}(?![\w.])"
            assert any(re.search(pair, line) for line in lines), f"{mechanism.name}: {name}={default}"


def test_a_frame_table_shows_bracketed_messages_and_titles_whole():
    import pandas as pd
    from rich.console import Console

    from attnbench import console

    frame = pd.DataFrame({"mechanism": ["linear", "nsa"], "message": [fla.NOT_INSTALLED, ""]})
    screen = Console(record=True, width=200)
    screen.print(console.frame_table(frame, "results/run[2] vs results/run[1]"))
    text = screen.export_text()
    assert fla.NOT_INSTALLED in text and "results/run[2] vs results/run[1]" in text


def test_the_speed_table_shows_eight_impls_whole_at_80_columns():
    from rich.console import Console

    from attnbench.console import speed_table

    impls = ["triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flex", "torch"]
    case = {"mechanism": "standard", "level": "kernel", "mode": "fwd", "causal": "True", "dtype": "bf16", "device": "cuda",
            "heads": "16", "kv_heads": "16", "head_dim": "64", "window": "", "batch": "32", "seq": "512"}
    times = {impl: 0.0937 + i for i, impl in enumerate(impls)}
    times["sdpa-efficient"] = 0.0701  # the star on the widest column
    rows = [{**case, "batch": b, "seq": t, "impl": impl, "status": "ok", "ms_median": str(ms), "message": ""}
            for b, t in (("32", "512"), ("1", "16384")) for impl, ms in times.items()]
    table, _ = speed_table(rows, "run")
    screen = Console(width=80, record=True, file=open(os.devnull, "w"))
    screen.print(table)
    text = screen.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert all(f"{ms:.3g}" in text for ms in times.values()) and "16384" in text and "…" not in text, text
    assert all(part in text for impl in impls for part in impl.split("-")), text


def test_the_speed_table_marks_an_impl_inside_the_fastests_spread():
    from rich.console import Console

    from attnbench.console import speed_table

    case = {"mechanism": "standard", "level": "model", "mode": "fwdbwd", "causal": "True", "dtype": "bf16", "device": "cuda",
            "heads": "8", "kv_heads": "8", "head_dim": "64", "window": "", "batch": "16", "seq": "1024"}
    spreads = {"triton": (24.0, 22.0, 25.1), "sdpa": (27.6, 25.1, 29.2), "torch": (40.0, 39.0, 41.0)}  # sdpa's p20 = triton's p80
    rows = [{**case, "impl": impl, "status": "ok", "message": "", "ms_median": str(m), "ms_p20": str(lo), "ms_p80": str(hi)}
            for impl, (m, lo, hi) in spreads.items()]
    rows.append({**case, "seq": "4096", "impl": "triton", "status": "ok", "message": "", "ms_median": "30"})  # no spread columns
    rows.append({**case, "seq": "4096", "impl": "sdpa", "status": "ok", "message": "", "ms_median": "31"})
    screen = Console(width=120, record=True, file=open(os.devnull, "w"))
    screen.print(speed_table(rows, "run")[0])
    lines = screen.export_text().splitlines()
    assert any("★ 24" in line and "≈ 27.6" in line and "≈ 40" not in line and " 40" in line for line in lines)
    assert any("★ 30" in line and " 31" in line and "≈" not in line for line in lines)  # no ranges: no claim either way
